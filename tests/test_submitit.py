"""Hydra's submitit launcher (the ``[slurm]`` extra): ``python -m syncbn.train -m
hydra/launcher=submitit_local|submitit_slurm hydra.launcher.tasks_per_node=2 ...`` sends each job of
a multirun as a 2-rank DDP job, locally or to the real SLURM cluster the tests start. Each job has
one run directory (the sweep directory the launching process resolved: its ``${now:}`` travels
with the pickled config to every rank) and trains as ``dist.nproc=2`` does, bit for bit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app import read_metrics, run, strip

SMALL = ["train.epochs=2", "data.train_size=200", "model.hidden=[20]"]
TWO_RANKS = ["hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=5"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> dict[int, list[dict]]:
    """The jobs' references: seeds 0 and 1, each on two simulated ranks."""
    runs = {}
    for seed in (0, 1):
        run_dir = tmp_path_factory.mktemp("simulated") / f"seed{seed}"
        run([sys.executable, "-m", "syncbn.train", "dist.nproc=2", f"seed={seed}", *SMALL, f"hydra.run.dir={run_dir}"])
        runs[seed] = strip(read_metrics(run_dir))
    return runs


def multirun(cwd: Path, launcher: str, **env: str) -> Path:
    """The two-job multirun from ``cwd``, its sweep directory left to the clock: that directory."""
    run([sys.executable, "-m", "syncbn.train", "-m", f"hydra/launcher={launcher}", *TWO_RANKS, "seed=0,1", *SMALL],
        timeout=300, cwd=cwd, **env)
    [sweep_dir] = (cwd / "multirun").glob("*/*")
    return sweep_dir


def assert_each_job_trained_on_two_ranks_as_the_simulation(sweep_dir: Path, two_rank_runs: dict) -> None:
    assert sorted(path.name for path in sweep_dir.iterdir() if not path.name.startswith(".")) == [
        "0", "1", "multirun.yaml"], "one directory per job, not one per rank"
    for seed in (0, 1):
        records = read_metrics(sweep_dir / str(seed))
        assert {record["world_size"] for record in records} == {2}
        assert strip(records) == two_rank_runs[seed]


def test_a_multirun_through_submitit_local_runs_each_job_on_two_ranks_bit_for_bit(tmp_path, two_rank_runs):
    assert_each_job_trained_on_two_ranks_as_the_simulation(multirun(tmp_path, "submitit_local"), two_rank_runs)


def test_a_multirun_through_submitit_slurm_runs_each_job_on_two_ranks_bit_for_bit(cluster, tmp_path, two_rank_runs):
    sweep_dir = multirun(tmp_path, "submitit_slurm", SLURM_CONF=cluster.env["SLURM_CONF"])
    assert_each_job_trained_on_two_ranks_as_the_simulation(sweep_dir, two_rank_runs)


def test_bad_input_is_one_line_before_any_job_is_submitted_and_leaves_nothing(tmp_path):
    """submitit's own report of a job that failed on it took 25 s and 56 lines, and left the sweep's
    directory; a bad launcher key, 74 lines of submitit naming none. Each is checked before."""
    for overrides, line in ((["train.epochs=-3"], "train.epochs must be >= 1, got -3"),
                            (["hydra.launcher.tasks_per_node=-1"], "hydra.launcher.tasks_per_node must be a whole "
                                                                   "number >= 1, got -1")):
        result = run([sys.executable, "-m", "syncbn.train", "-m", "hydra/launcher=submitit_local", *overrides,
                      "seed=0,1"], cwd=tmp_path, check=False)
        assert (result.returncode, result.stderr.splitlines()) == (1, [f"syncbn.train: error: {line}"])
        assert list(tmp_path.iterdir()) == []


def test_a_job_that_fails_on_the_cluster_is_reported_in_one_line_not_waited_for(cluster, tmp_path):
    """The tests' cluster has no accounting, so submitit learns a job's end only from its result:
    a job that ended by exiting left none and was waited for forever. Its error is now its result."""
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0").mkdir(parents=True)
    (sweep_dir / "0" / "metrics.jsonl").write_text('{"epoch": 1}\n')  # metrics without their checkpoint
    result = run([sys.executable, "-m", "syncbn.train", "-m", "hydra/launcher=submitit_slurm", *TWO_RANKS, "seed=0",
                  *SMALL, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, check=False, timeout=120,
                 SLURM_CONF=cluster.env["SLURM_CONF"])
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"syncbn.train: error: a job of the multirun failed: {sweep_dir / '0'} holds 1 line(s) of metrics.jsonl but "
        f"no checkpoint to continue them from; train.resume=false starts over and moves them to "
        f"{sweep_dir / '0' / 'replaced'}")


def test_submitits_signal_checkpoints_at_the_next_step_and_its_requeue_resumes_exactly(cluster, tmp_path):
    """SIGUSR2 (what submitit asks SLURM for before the time limit): the ranks checkpoint at the next
    step, then submitit's own handler requeues the job, which resumes there and ends as the
    uninterrupted 2-rank run, bit for bit."""
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "syncbn.train", "-m", "hydra/launcher=submitit_slurm", *TWO_RANKS,
               "hydra.launcher.max_num_timeout=3", "seed=0", "data.train_size=200", "model.hidden=[20]",
               "train.epochs=20", f"hydra.sweep.dir={sweep_dir}"]
    launcher = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "SLURM_CONF": cluster.env["SLURM_CONF"]},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (sweep_dir / "0" / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    [job] = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    assert cluster.run("scancel", "--signal=USR2", job).returncode == 0
    assert launcher.wait(timeout=240) == 0, launcher.stderr.read()[-2000:]
    log = "".join(path.read_text() for path in (sweep_dir / ".submitit").rglob("*_0_log.out"))
    [stop] = re.findall(r"stopping on SIGUSR2: checkpoint written at epoch (\d+), step (\d+)", log)
    assert re.findall(r"resumed from \S+: epoch (\d+), step (\d+)", log) == [stop] and "Requeued job" in log
    reference = tmp_path / "reference"
    run([sys.executable, "-m", "syncbn.train", "dist.nproc=2", "seed=0", "data.train_size=200", "model.hidden=[20]",
         "train.epochs=20", f"hydra.run.dir={reference}"])
    assert strip(read_metrics(sweep_dir / "0")) == strip(read_metrics(reference))
