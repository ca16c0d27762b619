"""SLURM: a task ``srun`` started is a rank (``syncbn/slurm.py``), and ``launch/slurm.sbatch`` on a
real single-node cluster (``tests/slurm_cluster.py``): the same metrics as the CPU simulation bit for
bit, a requeued job resumed exactly, ``scancel`` ending every rank with a resumable checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import re
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
import slurm_cluster
from app import ROOT, read_metrics, run, strip

from syncbn import slurm
from syncbn.errors import ConfigError

SMALL = ["data.train_size=200", "model.hidden=[20]", "train.checkpoint_every_steps=2"]  # 2 steps an epoch
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
SRUN_TASK = {"SLURM_STEP_NUM_TASKS": "6", "SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
             "SLURM_STEP_TASKS_PER_NODE": "2(x2),1,1", "SLURM_STEP_NODELIST": "gpu[07-09],cpu1",
             "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize("hostlist,first", [
    ("vm", "vm"), ("node07", "node07"), ("node[07-09,12]", "node07"), ("node[12,07-09]", "node12"),
    ("a,b", "a"), ("gpu[3-5]-ib,cpu1", "gpu3-ib"), ("rack[2-3]-n[01-04]", "rack2-n01"), ("x[1],y[2-3]", "x1"),
])
def test_the_rendezvous_host_is_the_first_of_slurms_host_list(hostlist, first):
    assert slurm.first_host(hostlist) == first


@pytest.mark.parametrize("spec,counts", [("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x2),1,4(x1)", [2, 2, 1, 4]),
                                         ("16,8", [16, 8])])
def test_tasks_per_node_expands_slurms_repeat_counts(spec, counts):
    assert slurm.tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["", "2(x)", "x2", "2,(x3)", "2(3)"])
def test_a_tasks_per_node_count_slurm_would_not_write_is_refused_naming_it(spec):
    with pytest.raises(ConfigError, match=re.escape(f"SLURM_STEP_TASKS_PER_NODE={spec} is not SLURM's")):
        slurm.tasks_per_node(spec)


def test_an_srun_task_gets_torchruns_variables_for_its_place():
    assert slurm.torchrun_variables(SRUN_TASK) == {
        "RANK": "4", "WORLD_SIZE": "6", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(29500 + 1234 * 16 % 16_000)}


def test_the_users_rendezvous_address_and_port_are_kept():
    chosen = slurm.torchrun_variables({**SRUN_TASK, "MASTER_ADDR": "head-ib", "MASTER_PORT": "40000"})
    assert (chosen["MASTER_ADDR"], chosen["MASTER_PORT"]) == ("head-ib", "40000")


def test_steps_running_at_once_rendezvous_on_different_ports():
    ports = {slurm.rendezvous_port(job, step) for job in ("7", "8") for step in ("0", "1", "2")}
    assert len(ports) == 6 and all(29500 <= port < 29500 + 16_000 for port in ports)


def test_a_task_of_submitits_local_executor_gets_torchruns_variables_for_its_place():
    task = {"SUBMITIT_LOCAL_NTASKS": "3", "SUBMITIT_LOCAL_GLOBALID": "2", "SUBMITIT_LOCAL_LOCALID": "2",
            "SUBMITIT_LOCAL_JOB_ID": "4321"}
    assert slurm.torchrun_variables(task) == {
        "RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + 4321 * 16 % 16_000)}
    assert slurm.torchrun_variables({**task, "MASTER_PORT": "40000"})["MASTER_PORT"] == "40000"
    assert slurm.torchrun_variables({**task, "RANK": "0"}) == {}


@pytest.mark.parametrize("environ", [
    {}, {key: value for key, value in SRUN_TASK.items() if key != "SLURM_STEP_NUM_TASKS"},  # a batch script's shell
    {**SRUN_TASK, "RANK": "0"},  # torchrun under srun: its own variables
])
def test_only_a_task_srun_started_and_no_agent_numbered_is_translated(environ):
    assert slurm.torchrun_variables(environ) == {}


# The real cluster.

def submit(cluster, run_dir: Path, *overrides: str, wait: bool = True, flags: tuple[str, ...] = (),
           timeout: float = 180) -> str:
    """``sbatch launch/slurm.sbatch`` with the run directory pinned, as a user submits it from the
    repository with the environment active; waits for the job's end unless told not to. Its ID."""
    options = ["--parsable", f"--output={run_dir}.out", f"--chdir={ROOT}", *flags]
    done = cluster.run("sbatch", *options, "launch/slurm.sbatch", *SMALL, *overrides,
                       PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", SYNCBN_RUN_DIR=str(run_dir))
    assert done.stdout.strip(), done.stderr
    job = done.stdout.strip().split(";")[0]
    if wait:  # sbatch --wait polls at growing intervals (seconds): this polls the job itself
        cluster.wait_for(job, ENDED, timeout=timeout)
    return job


def simulated(run_dir: Path, *overrides: str) -> list[dict]:
    """The same run as two ranks of the CPU simulation: its metrics."""
    run([sys.executable, "-m", "syncbn.train", "dist.nproc=2", *SMALL, *overrides, f"hydra.run.dir={run_dir}"])
    return strip(read_metrics(run_dir))


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory) -> list[dict]:
    """The metrics of 3 epochs on two simulated ranks, the reference of the jobs below."""
    return simulated(tmp_path_factory.mktemp("simulated") / "run", "train.epochs=3")


@pytest.fixture(scope="module")
def sixty_epochs(tmp_path_factory) -> list[dict]:
    return simulated(tmp_path_factory.mktemp("simulated") / "run", "train.epochs=60")


@pytest.fixture(scope="module")
def twenty_epochs(tmp_path_factory) -> list[dict]:
    """The metrics of 20 epochs on two simulated ranks, uninterrupted."""
    return simulated(tmp_path_factory.mktemp("simulated") / "run", "train.epochs=20")


def test_two_srun_tasks_train_as_two_simulated_ranks_bit_for_bit(cluster, tmp_path, three_epochs):
    job = submit(cluster, tmp_path / "job", "train.epochs=3")
    assert cluster.state(job) == "COMPLETED", (tmp_path / "job.out").read_text()
    metrics = read_metrics(tmp_path / "job")
    assert {record["world_size"] for record in metrics} == {2}
    assert strip(metrics) == three_epochs


def test_an_impossible_job_is_refused_at_submission_not_left_pending(cluster, tmp_path):
    done = cluster.run("sbatch", f"--ntasks-per-node={os.cpu_count() + 1}", "--wrap=true")
    assert done.returncode != 0 and "More processors requested than permitted" in done.stderr


def test_a_requeued_job_resumes_from_its_checkpoint_exactly(cluster, tmp_path, three_epochs):
    """Rank 1 SIGKILLed at step 3 (after the step-2 checkpoint): srun ends the step and the job
    fails; requeued, the same job (same ID, same directory) resumes and finishes."""
    job = submit(cluster, tmp_path / "job", "train.epochs=3", "fault.kill_rank=1", "fault.kill_at_step=3")
    assert cluster.state(job) == "FAILED"
    ended = Path(f"{tmp_path / 'job'}.out").read_text()
    assert "task 1: Killed" in ended and "syncbn.train:" not in ended and "Error" not in ended, \
        "rank 0, whose collective failed because rank 1 died, ends silently: srun names rank 1"
    assert len(read_metrics(tmp_path / "job")) == 1
    assert cluster.run("scontrol", "requeue", job).returncode == 0
    cluster.wait_for(job, ENDED)
    assert cluster.state(job) == "COMPLETED", (tmp_path / "job.out").read_text()
    assert "resumed from" in (tmp_path / "job.out").read_text()
    assert strip(read_metrics(tmp_path / "job")) == three_epochs


def test_scancel_ends_every_rank_and_leaves_a_checkpoint_that_resumes_exactly(cluster, tmp_path, twenty_epochs):
    run_dir = tmp_path / "job"
    job = submit(cluster, run_dir, "train.epochs=20", wait=False)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and cluster.state(job) in {"PENDING", "RUNNING"}, cluster.state(job)
        time.sleep(0.05)
    assert cluster.run("scancel", job).returncode == 0
    assert cluster.wait_for(job, ENDED, timeout=60) == "CANCELLED"
    deadline = time.monotonic() + 60  # SLURM's KillWait: SIGTERM first, SIGKILL 30 s later
    while ranks_of(run_dir):
        assert time.monotonic() < deadline, f"ranks outlived scancel: {ranks_of(run_dir)}"
        time.sleep(0.1)
    assert 0 < len(read_metrics(run_dir)) < 20
    [line] = [line for line in Path(f"{run_dir}.out").read_text().splitlines() if line.startswith("syncbn")]
    assert re.fullmatch(rf"syncbn\.train: interrupted by SIGTERM at epoch \d+, step \d+ \(the last checkpoint\); "
                        rf"scontrol requeue {job}, or sbatch with SYNCBN_RUN_DIR={re.escape(str(run_dir))}, "
                        rf"resumes from {re.escape(str(run_dir))}", line)
    resumed = submit(cluster, run_dir, "train.epochs=20")
    assert cluster.state(resumed) == "COMPLETED" and "resumed from" in Path(f"{run_dir}.out").read_text()
    assert strip(read_metrics(run_dir)) == twenty_epochs


def started(cluster, run_dir: Path, *overrides: str, flags: tuple[str, ...] = ()) -> str:
    """A job of 20 epochs (unless told otherwise) submitted, once its first checkpoint is written: its ID."""
    job = submit(cluster, run_dir, "train.epochs=20", *overrides, wait=False, flags=flags)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and cluster.state(job) in {"PENDING", "RUNNING"}, cluster.state(job)
        time.sleep(0.05)
    return job


def stops(log: str) -> list[tuple[str, int, int]]:
    """Each stop the ranks agreed on, (signal, epoch, step), from the job's log."""
    return [(m[1], int(m[2]), int(m[3])) for m in
            re.finditer(r"stopping on (\w+): checkpoint written at epoch (\d+), step (\d+), [\d.]+ s after", log)]


def resumes(log: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in re.finditer(r"resumed from \S+: epoch (\d+), step (\d+)", log)]


def restarts(cluster, job: str) -> int:
    return int(cluster.run("scontrol", "show", "job", "-o", job).stdout.split("Restarts=", 1)[1].split()[0])


def test_the_time_limit_warning_checkpoints_at_the_next_step_and_the_job_requeues_itself_exactly(cluster, tmp_path,
                                                                                               twenty_epochs):
    """SIGUSR1 to every task (what --signal sends before the limit): the ranks stop after the same
    step, rank 0 checkpoints there, the batch script requeues the job, which resumes from that step
    (mid-epoch: nothing since it is lost) and ends as the uninterrupted run, bit for bit. The log
    keeps every attempt (--open-mode=append)."""
    run_dir = tmp_path / "job"
    job = started(cluster, run_dir)
    assert cluster.run("scancel", "--signal=USR1", job).returncode == 0
    assert cluster.wait_for(job, ENDED) == "COMPLETED"
    log = Path(f"{run_dir}.out").read_text()
    [(name, epoch, step)] = stops(log)
    assert name == "SIGUSR1" and resumes(log) == [(epoch, step)] and restarts(cluster, job) == 1
    ours = [line for line in log.splitlines() if line.startswith("syncbn")]
    assert ours == [
        f"syncbn.train: stopped by SIGUSR1 (SLURM's warning before the time limit) at epoch {epoch}, step {step} (the "
        f"last checkpoint); launch/slurm.sbatch requeues the job, or scontrol requeue {job}, or sbatch with "
        f"SYNCBN_RUN_DIR={run_dir}, resumes from {run_dir}",
        f"syncbn: job {job} asks to be requeued after attempt 1, to resume from {run_dir}"]
    assert not (run_dir / "requeue").exists()
    assert strip(read_metrics(run_dir)) == twenty_epochs


def trained_an_epoch_since_resuming(cluster, job: str, run_dir: Path, log: Path) -> bool:
    resumed = resumes(log.read_text())
    return bool(resumed) and cluster.state(job) == "RUNNING" and len(read_metrics(run_dir)) > resumed[-1][0]


def test_a_job_preempted_twice_finishes_exactly(cluster, tmp_path, sixty_epochs):
    """A preemption's SIGTERM (scontrol requeue sends it, then requeues the job), twice, each time
    once the attempt has trained an epoch: the ranks checkpoint at the next step and the job resumes
    there, and ends as the uninterrupted run, bit for bit."""
    run_dir, log = tmp_path / "job", Path(f"{tmp_path / 'job'}.out")
    job = started(cluster, run_dir, "train.epochs=60")
    for attempt in (1, 2):
        deadline = time.monotonic() + 120
        while attempt == 2 and not trained_an_epoch_since_resuming(cluster, job, run_dir, log):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        assert cluster.run("scontrol", "requeue", job).returncode == 0
        while len(stops(log.read_text())) < attempt:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
    assert cluster.wait_for(job, ENDED) == "COMPLETED"
    text = log.read_text()
    assert [(epoch, step) for _, epoch, step in stops(text)] == resumes(text) and len(resumes(text)) == 2
    assert {name for name, _, _ in stops(text)} == {"SIGTERM"} and restarts(cluster, job) == 2
    assert strip(read_metrics(run_dir)) == sixty_epochs


def test_a_job_that_cannot_requeue_itself_says_so_and_leaves_a_resumable_directory(cluster, tmp_path, twenty_epochs):
    """--no-requeue: the script says why in one line and exits 75 (EX_TEMPFAIL); the directory's
    checkpoint is the stop's, from which a new submission finishes exactly."""
    run_dir = tmp_path / "job"
    job = started(cluster, run_dir, flags=("--no-requeue",))
    assert cluster.run("scancel", "--signal=USR1", job).returncode == 0
    assert cluster.wait_for(job, ENDED) == "FAILED"
    shown = cluster.run("scontrol", "show", "job", "-o", job).stdout
    assert "ExitCode=75:0" in shown
    last = Path(f"{run_dir}.out").read_text().splitlines()[-1]
    assert last == (f"syncbn: job {job} could not requeue itself (Requested operation is presently disabled for job "
                    f"{job}); sbatch with SYNCBN_RUN_DIR={run_dir} resumes it")
    [(_, epoch, step)] = stops(Path(f"{run_dir}.out").read_text())
    resumed = submit(cluster, run_dir, "train.epochs=20")
    assert cluster.state(resumed) == "COMPLETED"
    assert resumes(Path(f"{run_dir}.out").read_text()) == [(epoch, step)]
    assert strip(read_metrics(run_dir)) == twenty_epochs


@pytest.mark.large
def test_a_job_longer_than_its_time_limit_finishes_through_self_requeue_exactly(cluster, tmp_path):
    """--time=1 (a minute) for a run of about two: SLURM's own warning, 45 s before the limit (give
    or take its 60 s resolution), each attempt; every attempt resumes where the last one stopped, and
    the job ends as the uninterrupted run, bit for bit (about 2 minutes)."""
    run_dir = tmp_path / "job"
    long = ("train.epochs=1200",)
    job = submit(cluster, run_dir, *long, flags=("--time=1", "--signal=USR1@45"), timeout=900)
    assert cluster.state(job) == "COMPLETED"
    log = Path(f"{run_dir}.out").read_text()
    assert len(stops(log)) >= 1 and [(e, s) for _, e, s in stops(log)] == resumes(log)
    assert strip(read_metrics(run_dir)) == simulated(tmp_path / "uninterrupted", *long)


def test_bad_input_or_a_world_size_unlike_the_tasks_is_one_line_and_starts_no_task(cluster, tmp_path):
    """The batch script checks the command once, as rank 0 of the job's tasks, before srun starts one."""
    for overrides, line in ((["train.epochs=-3"], "train.epochs must be >= 1, got -3"),
                            (["dist.nproc=4"], "dist.nproc=4, but srun (the job's tasks: sbatch --nodes x "
                                               "--ntasks-per-node) starts 2 ranks: the launcher decides the world "
                                               "size here; leave dist.nproc out or make it 2")):
        run_dir = tmp_path / f"job{len(overrides[0])}"
        job = submit(cluster, run_dir, *overrides)
        assert cluster.state(job) == "FAILED"
        assert [x for x in Path(f"{run_dir}.out").read_text().splitlines() if x] == [f"syncbn.train: error: {line}"]
        assert not run_dir.exists()


def ranks_of(run_dir: Path) -> list[str]:
    """The command lines of processes still running with ``run_dir`` in them."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(run_dir) in text and "syncbn.train" in text:
            found.append(text)
    return found


@pytest.mark.parametrize("launcher,expected", [
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"}, "1"),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "cpus_per_task": 4}, "4"),
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, None),  # jobs in this process
])
def test_submitits_tasks_get_their_threads_and_an_in_process_multirun_keeps_every_core(monkeypatch, launcher, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    slurm.TaskThreads().on_multirun_start(OmegaConf.create({"hydra": {"launcher": launcher}}))
    assert os.environ.get("OMP_NUM_THREADS") == expected


def test_stopping_the_cluster_ends_its_leftover_job_steps_and_no_other_clusters(tmp_path):
    """An idle slurmstepd (its job cancelled mid-step) outlived the daemons: stop() ends those that carry
    this cluster's SLURM_CONF, and leaves another cluster's alone."""
    stepd = tmp_path / "slurmstepd"
    shutil.copy(shutil.which("sleep"), stepd)
    ours, theirs = (subprocess.Popen([str(stepd), "60"], env={"SLURM_CONF": conf}) for conf in ("/a/slurm.conf", "/b/slurm.conf"))
    try:
        deadline = time.monotonic() + 10
        while slurm_cluster.steps_of("/a/slurm.conf") != [ours.pid]:
            assert time.monotonic() < deadline, slurm_cluster.steps_of("/a/slurm.conf")
            time.sleep(0.05)
        slurm_cluster.Daemons([], "/a/slurm.conf").stop()
        assert ours.wait(timeout=10) == -signal.SIGKILL and theirs.poll() is None
    finally:
        theirs.kill(), theirs.wait()
