"""SLURM: a task ``srun`` started is a rank (``syncbn/slurm.py``), and ``launch/slurm.sbatch`` on a
real single-node cluster (``tests/slurm_cluster.py``): the same metrics as the CPU simulation bit for
bit, a requeued job resumed exactly, ``scancel`` ending every rank with a resumable checkpoint."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
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

def submit(cluster, run_dir: Path, *overrides: str, wait: bool = True) -> str:
    """``sbatch launch/slurm.sbatch`` with the run directory pinned, as a user submits it from the
    repository with the environment active; waits for the job's end unless told not to. Its ID."""
    flags = ["--parsable", f"--output={run_dir}.out", f"--chdir={ROOT}"]
    done = cluster.run("sbatch", *flags, "launch/slurm.sbatch", *SMALL, *overrides,
                       PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", SYNCBN_RUN_DIR=str(run_dir))
    assert done.stdout.strip(), done.stderr
    job = done.stdout.strip().split(";")[0]
    if wait:  # sbatch --wait polls at growing intervals (seconds): this polls the job itself
        cluster.wait_for(job, ENDED)
    return job


def simulated(run_dir: Path, *overrides: str) -> list[dict]:
    """The same run as two ranks of the CPU simulation: its metrics."""
    run([sys.executable, "-m", "syncbn.train", "dist.nproc=2", *SMALL, *overrides, f"hydra.run.dir={run_dir}"])
    return strip(read_metrics(run_dir))


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory) -> list[dict]:
    """The metrics of 3 epochs on two simulated ranks, the reference of the jobs below."""
    return simulated(tmp_path_factory.mktemp("simulated") / "run", "train.epochs=3")


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


def test_scancel_ends_every_rank_and_leaves_a_checkpoint_that_resumes_exactly(cluster, tmp_path):
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
    assert strip(read_metrics(run_dir)) == simulated(tmp_path / "uninterrupted", "train.epochs=20")


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
