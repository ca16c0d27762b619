"""Hydra's submitit launcher (the ``[slurm]`` extra): ``python -m syncbn.train -m
hydra/launcher=submitit_local|submitit_slurm hydra.launcher.tasks_per_node=2 ...`` sends each job of
a multirun as a 2-rank DDP job, locally or to the real SLURM cluster the tests start. Each job has
one run directory (the sweep directory the launching process resolved: its ``${now:}`` travels
with the pickled config to every rank) and trains as ``dist.nproc=2`` does, bit for bit."""

from __future__ import annotations

import sys
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
