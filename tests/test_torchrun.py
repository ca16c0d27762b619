"""``python -m syncbn.torchrun`` (``launch/torchrun.sh``): torchrun with the app's one-line reports,
as a user meets them: bad input, a killed rank, a rank's own error, SIGTERM to torchrun."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app import ROOT, free_port, read_metrics, run
from torch.distributed import run as torch_run

from syncbn import torchrun

SMALL = ["data.train_size=200", "model.hidden=[20]", "train.checkpoint_every_steps=2"]  # 2 steps an epoch
ENV = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def launch(run_dir: Path, *overrides: str, torchrun_args=("--nproc-per-node=2",)) -> list[str]:
    return ["bash", "launch/torchrun.sh", "--standalone", *torchrun_args, "--", *SMALL, *overrides]


def attempt(run_dir: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    """The command, which may fail, with its run directory pinned."""
    return subprocess.run(launch(run_dir, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ENV, "SYNCBN_RUN_DIR": str(run_dir)}, **kwargs)


def test_split_cuts_at_the_first_double_dash_only():
    assert torchrun.split(["--standalone", "--", "a=1", "--", "b"]) == (["--standalone"], ["a=1", "--", "b"])
    assert torchrun.split(["--standalone"]) == (["--standalone"], [])
    assert torchrun.split(["--", "a=1"]) == ([], ["a=1"])


def test_the_run_directory_is_the_pinned_one_or_a_fresh_clock_one_with_its_resume_hint():
    assert torchrun.run_dir_of({"SYNCBN_RUN_DIR": "out/a b"}) == (
        Path("out/a b"), "run the same command to resume from out/a b")
    first, hint = torchrun.run_dir_of({})
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", str(first))
    assert hint == f"run the same command with SYNCBN_RUN_DIR={first} to resume"
    assert torchrun.run_dir_of({"SYNCBN_RUN_DIR": ""})[0].parts[0] == "outputs", "empty is unset, not the cwd"
    time.sleep(1e-3)
    assert torchrun.run_dir_of({})[0] != first, "two launches in one second get two directories"


def test_a_hydra_run_dir_among_the_overrides_is_the_run_directory_its_lines_name():
    """The last one, as Hydra reads them; quoted as a shell passes Hydra's quotes on."""
    assert torchrun.run_dir_of({}, ["norm=bn", "hydra.run.dir=out/x", "hydra.run.dir='out/y z'"]) == (
        Path("out/y z"), "run the same command to resume from out/y z")
    assert torchrun.run_dir_of({"SYNCBN_RUN_DIR": "pinned"}, ["hydra.run.dir=out/x"])[0] == Path("pinned")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_ranks_start_is_one_line_naming_the_directory_given(tmp_path, signum):
    """Ctrl-C (to the terminal's whole group: ranks still importing torch too) or SIGTERM to torchrun
    while its ranks start: one line, no rank's traceback, naming the hydra.run.dir the command gave;
    torchrun's log directory in TMPDIR removed."""
    run_dir, tmp = tmp_path / "given", tmp_path / "tmp"
    tmp.mkdir()
    launcher = subprocess.Popen(launch(run_dir, f"hydra.run.dir={run_dir}"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV, "TMPDIR": str(tmp)},
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while len(children(launcher.pid)) < 2:  # the ranks have started (and import torch)
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(launcher.pid, signum) if signum == signal.SIGINT else launcher.send_signal(signum)
    _, stderr = launcher.communicate(timeout=60)
    assert stderr.splitlines() == [f"syncbn.train: interrupted by {signum.name} before the first checkpoint; "
                                   f"{run_dir} has nothing to resume"], stderr
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []


@pytest.mark.parametrize("flags,world_size", [
    (["--nproc-per-node=3"], 3), (["--nproc_per_node", "2"], 2), (["--nnodes=1:1", "--nproc-per-node=4"], 4),
    ([], 1), (["--nnodes=2", "--nproc-per-node=2"], None), (["--nnodes=1:2", "--nproc-per-node=2"], None),
    (["--nproc-per-node=gpu"], None), (["--nproc-per-node=auto"], None),
])
def test_only_a_world_one_node_decides_is_checked_before_torchrun_starts(flags, world_size):
    args = torch_run.parse_args([*flags, "-m", "syncbn.train"])
    assert torchrun.one_node_world_size(args) == world_size


def test_bad_input_is_one_line_and_starts_no_rank(tmp_path):
    """The command is checked once (``--check``), at the world size torchrun will start, before
    torchrun starts a rank each: not a line per rank and torchrun's failure report. A refusal that
    depends on the world size shows the check ran at torchrun's (which spellings of it are read: the
    test of ``one_node_world_size``; every other refusal: tests/test_train_inputs.py)."""
    run_dir = tmp_path / "run"
    result = subprocess.run(["bash", "launch/torchrun.sh", "--standalone", "--nnodes=1", "--nproc_per_node", "3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **ENV, "SYNCBN_RUN_DIR": str(run_dir)})
    assert (result.returncode, result.stderr.splitlines()) == (
        1, ["syncbn.train: error: train.global_batch_size=100 is not divisible by the world size 3"])
    assert not run_dir.exists()


def test_a_dist_nproc_other_than_torchruns_world_size_is_one_line_and_starts_no_rank(tmp_path):
    result = attempt(tmp_path / "run", "dist.nproc=4")
    assert (result.returncode, result.stderr.splitlines()) == (1, [
        "syncbn.train: error: dist.nproc=4, but torchrun (--nnodes x --nproc-per-node) starts 2 ranks: the launcher "
        "decides the world size here; leave dist.nproc out or make it 2"])
    assert not (tmp_path / "run").exists()


def test_a_killed_rank_is_one_line_naming_it_and_not_the_peer_that_failed_after_it(tmp_path):
    """Rank 1 SIGKILLed, no restarts: rank 0's collective then fails (connection reset), which
    must not print its traceback; torchrun's failure box is replaced by the cause."""
    result = attempt(tmp_path, "train.epochs=2", "fault.kill_rank=1", "fault.kill_at_step=1")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert re.fullmatch(r"syncbn\.train: error: rank 1 failed \(signal SIGKILL\): "
                        r"Signal 9 \(SIGKILL\) received by PID \d+", line)


def test_a_rank_error_is_one_line_with_its_cause_naming_the_file_and_leaves_no_partial_checkpoint(tmp_path):
    """Every write past 30 kB fails (RLIMIT_FSIZE, as a full disk) in every rank: rank 0's checkpoint
    write fails; torchrun's reader gets its error, as the CPU simulation's launcher does."""
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = attempt(tmp_path, "train.epochs=1", preexec_fn=small_files)
    assert (result.returncode, result.stderr.splitlines()) == (1, [
        f"syncbn.train: error: rank 0 failed (exit code 1): CheckpointError: cannot write the checkpoint "
        f"{tmp_path / '.checkpoint.pt.tmp'} (File too large); the last complete one is kept"])
    assert not (tmp_path / ".checkpoint.pt.tmp").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_sigterm_to_torchrun_is_one_line_exit_143_and_the_same_command_resumes(tmp_path):
    """SIGTERM to the launcher (a scheduler's stop) after the first checkpoint: every rank stops, one
    line says where and how to resume (the directory has a space: the hint must still work), exit
    143; the same command then finishes the run with every epoch once."""
    run_dir = tmp_path / "a run"
    command = launch(run_dir, "train.epochs=6")
    env = {**os.environ, **ENV, "SYNCBN_RUN_DIR": str(run_dir)}
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + 90
    while not (run_dir / "checkpoint.pt").exists() and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint in 90 s"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # bash exec'd python: this is the launcher itself
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 143, stderr
    [line] = stderr.splitlines()
    assert re.fullmatch(rf"syncbn\.train: interrupted by SIGTERM at epoch \d+, step \d+ \(the last checkpoint\); "
                        rf"run the same command to resume from {re.escape(str(run_dir))}", line)
    stopped_at = len(read_metrics(run_dir))
    assert stopped_at < 6
    run(command, timeout=300, SYNCBN_RUN_DIR=str(run_dir))
    assert [record["epoch"] for record in read_metrics(run_dir)] == list(range(1, 7))


def children(pid: int) -> list[str]:
    """The command lines of ``pid``'s child processes."""
    found = []
    with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # the process ended meanwhile
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # this child ended meanwhile
                found.append(Path(f"/proc/{child}/cmdline").read_text().replace("\0", " "))
    return found


def test_sigterm_while_the_command_is_checked_is_one_line_exit_143_and_leaves_nothing(tmp_path):
    """Before torchrun has started (and put in its own signal handling), SIGTERM still ends in the
    app's line, and the check's directory is not left behind."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(launch(run_dir, "train.epochs=1"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, **ENV, "SYNCBN_RUN_DIR": str(run_dir)})
    deadline = time.monotonic() + 60
    while not any("--check" in child for child in children(launcher.pid)):
        assert launcher.poll() is None and time.monotonic() < deadline, "the check never started"
        time.sleep(0.01)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=60)
    assert (launcher.returncode, stderr.splitlines()) == (143, [
        f"syncbn.train: interrupted by SIGTERM before the first checkpoint; {run_dir} has nothing to resume"])
    assert not run_dir.exists()


def test_the_rendezvous_of_another_node_gone_is_one_line_saying_where_training_stopped(tmp_path, capsys):
    """Two nodes, the one holding the rendezvous stopped: the other's agent loses its store; torch
    printed its store client's traceback."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    with pytest.raises(SystemExit) as ended, torchrun.peers_gone(tmp_path, "run the same command"):
        raise RendezvousConnectionError("The connection to the C10d store has failed.")
    assert ended.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"syncbn.train: error: the rendezvous with the other nodes is gone (RendezvousConnectionError): every node "
        f"stopped before the first checkpoint; {tmp_path} has nothing to resume"]


def test_a_node_whose_peers_never_join_ends_after_the_join_timeout_in_one_line(tmp_path):
    """launch/multinode.sh with NNODES=2 started once (the other node's launcher died before the
    rendezvous): JOIN_TIMEOUT_S=5 ends it in 5 s plus start-up (measured: 10 s on 2 cores), not
    torch's 600."""
    run_dir = tmp_path / "run"
    env = {**ENV, "HEAD": f"localhost:{free_port()}", "NNODES": "2", "RUN_ID": "alone", "JOIN_TIMEOUT_S": "5",
           "SYNCBN_RUN_DIR": str(run_dir)}
    start = time.monotonic()
    done = run(["bash", "launch/multinode.sh", "train.epochs=1"], timeout=120, check=False, **env)
    assert time.monotonic() - start < 60
    assert (done.returncode, done.stderr.splitlines()) == (1, [
        "syncbn.train: error: the other nodes did not join the rendezvous within its join timeout (JOIN_TIMEOUT_S "
        f"of launch/multinode.sh, 600 s by default): training stopped before the first checkpoint; {run_dir} has "
        "nothing to resume"])


def worker_of(launcher: int, deadline: float) -> int:
    """The pid of the worker a node's torchrun (its own process, bash exec'd it) started."""
    while time.monotonic() < deadline:
        for line in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
            if "syncbn.train" in Path(f"/proc/{line}/cmdline").read_text() and \
                    "--check" not in Path(f"/proc/{line}/cmdline").read_text():
                return int(line)
        time.sleep(0.05)
    raise AssertionError("no worker started")


def test_a_node_whose_rank_hangs_ends_once_the_other_node_has_failed(tmp_path):
    """Two nodes of one rank; the rank of the node that started first (it holds the rendezvous's
    store) is SIGSTOPped mid-run. The other's rank fails at dist.timeout_s and its node ends; the
    hung one's agent saw only its own worker, still running, and waited forever (found by the chaos
    run); now it sees the rendezvous closed, stops its worker (SIGKILL after torch's 30 s grace) and
    ends in one line. Measured: about 50 s from the stop."""
    run_dir = tmp_path / "run"
    env = {**ENV, "HEAD": f"localhost:{free_port()}", "NNODES": "2", "RUN_ID": "hung", "OMP_NUM_THREADS": "1",
           "SYNCBN_RUN_DIR": str(run_dir)}
    command = ["bash", "launch/multinode.sh", "train.epochs=200", "dist.timeout_s=5", "data.train_size=400",
               "model.hidden=[20]"]
    first = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(1)
    second = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        worker = worker_of(first.pid, time.monotonic() + 60)
        deadline = time.monotonic() + 60
        while not (run_dir / "checkpoint.pt").exists():
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.1)
        os.kill(worker, signal.SIGSTOP)
        stopped = time.monotonic()
        second.communicate(timeout=60)
        _, stderr = first.communicate(timeout=90)
        assert time.monotonic() - stopped < 80
        assert first.returncode == 1 and len(stderr.splitlines()) == 1, stderr
        assert stderr.startswith("syncbn.train: error: the rendezvous with the other nodes is gone "
                                 "(RendezvousClosedError): every node stopped at epoch "), stderr
    finally:
        for node in (first, second):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)


def test_a_killed_torchrun_leaves_no_cpp_log_of_its_ranks(tmp_path):
    """SIGKILL of torchrun as its ranks start (found by the chaos run): they dial the store it held, and each printed
    c10d's C++ errors, a store client's timeout with 40 stack frames; the wrapper leaves c10d's C++
    logs out, so what the ranks print is nothing or their one line each."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(launch(run_dir, "train.epochs=200", "dist.timeout_s=5", "data.train_size=400",
                                       "model.hidden=[20]"),
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, **ENV, "SYNCBN_RUN_DIR": str(run_dir)})
    try:
        worker_of(launcher.pid, time.monotonic() + 90)  # killed in their start-up: they still dial its store
        launcher.kill()
        _, stderr = launcher.communicate(timeout=90)  # the ranks hold the pipe until they end
        assert not [line for line in stderr.splitlines() if line.startswith(("[E", "[W", "frame #", "Exception"))], stderr
        assert len(stderr.splitlines()) <= 2, stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
