"""Device and backend choice, checked before any process starts, free memory, and a rank ending with
its launcher (the launching itself is tested end to end in test_train.py, and on Gloo groups everywhere)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from syncbn import distributed
from syncbn.distributed import DistConfig
from syncbn.errors import ConfigError


@pytest.mark.parametrize("device,backend,expected", [
    (None, None, (torch.device("cpu"), "gloo")), (None, "gloo", (torch.device("cpu"), "gloo")),
    ("cpu", None, (torch.device("cpu"), "gloo")), ("cpu", "gloo", (torch.device("cpu"), "gloo")),
])
def test_without_cuda_ranks_run_on_the_cpu_with_gloo(device, backend, expected):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the defaults pick it (the GPU check covers that)")
    config = DistConfig(device=device, backend=backend)
    chosen = distributed.choose_device(config, 1)
    assert (chosen, distributed.choose_backend(config, chosen)) == expected
    distributed.check(config)


@pytest.mark.parametrize("device,backend,message", [
    ("tpu0", None, "dist.device=tpu0 is not a device name torch knows ("),
    ("meta", None, "dist.device must be cpu, cuda or cuda:N, got meta"),  # a device torch knows, no run's
    ("xpu", None, "dist.device must be cpu, cuda or cuda:N, got xpu"),
    ("cuda", None, "dist.device=cuda but CUDA is not available on this machine"),
    ("cuda:1", "gloo", "dist.device=cuda:1 but CUDA is not available on this machine"),
    ("cpu", "nccl", "dist.backend=nccl needs CUDA devices, but this rank runs on cpu"),
    (None, "nccl", "dist.backend=nccl needs CUDA devices, but this rank runs on cpu"),
])
def test_a_device_or_backend_this_machine_cannot_give_is_refused_naming_it(device, backend, message):
    if torch.cuda.is_available() and "CUDA" in message + (backend or ""):
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError) as refusal:
        distributed.check(DistConfig(device=device, backend=backend))
    assert str(refusal.value).startswith(message) and "\n" not in str(refusal.value)


def test_the_planned_world_size_is_torchruns_when_launched_and_dist_nproc_otherwise(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched() and distributed.planned_world_size(DistConfig(nproc=3)) == 3
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "5"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, value)
    assert not distributed.launched(), "torchrun sets all four"
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.launched() and distributed.planned_world_size(DistConfig(nproc=3)) == 5


def test_local_processes_are_torchruns_per_node_count_else_every_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed.local_processes(4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.local_processes(4) == 2


def test_available_memory_is_linuxs_mem_available_and_none_where_unknown(monkeypatch, tmp_path):
    found = distributed.available_memory()
    expected = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable:")) * 1024
    assert found is not None and abs(found - expected) < 2**30
    monkeypatch.setattr(distributed, "Path", lambda _: tmp_path / "no-meminfo")
    assert distributed.available_memory() is None
    (tmp_path / "no-meminfo").write_text("MemTotal: 1 kB\n")
    assert distributed.available_memory() is None


def _dies_with(pid: int) -> subprocess.Popen:
    """A process that calls ``die_with(pid)``, says so, then waits a minute."""
    code = f"import sys, time; from syncbn.distributed import die_with; die_with({pid}); print('watching', flush=True); time.sleep(60)"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@pytest.mark.processes
def test_a_process_ends_the_moment_the_one_it_dies_with_ends():
    launcher = subprocess.Popen(["sleep", "60"])
    rank = _dies_with(launcher.pid)
    assert rank.stdout.readline() == "watching\n"
    launcher.kill()
    launcher.wait()
    assert rank.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.processes
def test_a_process_whose_launcher_is_already_gone_ends_at_once():
    gone = subprocess.Popen(["true"])
    gone.wait()
    rank = _dies_with(gone.pid)
    assert rank.wait(timeout=30) == -signal.SIGKILL and rank.stdout.read() == ""


def failure(tmp_path, rank: int, exitcode: int, second: int | None) -> ProcessFailure:
    """A rank's failure as torch's launcher records it, dated by its error file (none: dated now)."""
    error_file = tmp_path / f"error_{rank}.json"
    if second is not None:
        error_file.write_text(json.dumps({"message": {"message": f"RuntimeError: rank {rank}",
                                                      "extraInfo": {"timestamp": str(second)}}}))
    return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(error_file))


@pytest.mark.parametrize("ranks,first", [
    # (exit code, error file's second) per rank
    ({0: (-signal.SIGTERM, 10), 1: (-signal.SIGKILL, None)}, 1),  # stopped by the launcher after its peer died
    ({0: (1, 10), 1: (-signal.SIGTERM, 9)}, 0),
    ({0: (1, 12), 1: (1, 11), 2: (-signal.SIGTERM, 10)}, 1),  # the earliest of the failures not stopped
    ({0: (-signal.SIGTERM, 12), 1: (-signal.SIGTERM, 11)}, 1),  # every rank stopped: torch's first
])
def test_the_first_failure_is_the_earliest_rank_the_launcher_did_not_stop(tmp_path, ranks, first):
    failures = {rank: failure(tmp_path, rank, exitcode, second) for rank, (exitcode, second) in ranks.items()}
    rank, chosen = distributed.first_failure(ChildFailedError("train", failures))
    assert (rank, chosen) == (first, failures[first])


def test_a_failing_rank_leaves_the_launcher_a_file_it_reads_and_nothing_beside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    try:
        raise RuntimeError("the cause")
    except RuntimeError as error:
        distributed.record_failure(error)
    read = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(tmp_path / "error.json"))
    assert read.message["message"] == "RuntimeError: the cause"
    assert 'raise RuntimeError("the cause")' in read.message["extraInfo"]["py_callstack"]
    assert abs(read.timestamp - time.time()) < 5
    assert [path.name for path in tmp_path.iterdir()] == ["error.json"]


def test_an_error_file_that_cannot_be_written_is_left_absent_not_half_written(tmp_path, monkeypatch):
    """A full disk (every write past 100 bytes fails: RLIMIT_FSIZE) leaves no file the launcher would
    fail to parse, and nothing aside; without a launcher, nothing is written."""
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    code = "from syncbn import distributed; distributed.record_failure(RuntimeError('x' * 1000)); print('ended')"
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json")}
    done = subprocess.run([sys.executable, "-c", code], env=env, preexec_fn=small_files, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout, list(tmp_path.iterdir())) == (0, "ended\n", []), done.stderr
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    distributed.record_failure(RuntimeError("no launcher"))
    assert list(tmp_path.iterdir()) == []


def test_a_launchs_log_directory_left_by_a_killed_launcher_is_removed_by_the_next_and_a_live_ones_kept(
        tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(distributed.tempfile, "tempdir", None)  # read TMPDIR again
    dead = tmp_path / "syncbn-elastic-999999999-abc"
    alive = tmp_path / f"syncbn-elastic-{os.getppid()}-def"
    foreign = tmp_path / "syncbn-elastic-notapid-x"
    for directory in (dead, alive, foreign):
        directory.mkdir()
    mine = Path(distributed.elastic_log_dir())
    assert mine.parent == tmp_path and mine.name.startswith(f"syncbn-elastic-{os.getpid()}-")
    assert not dead.exists() and alive.exists() and foreign.exists()


STOP_FROM_A_RANK = """
import multiprocessing, os
from pathlib import Path
from syncbn import distributed
distributed.warm_start_method()
directory = Path(multiprocessing.process.current_process()._config["tempdir"])
child = os.fork()
if child == 0:  # a rank: its launcher's config, the directory's name in it
    distributed.stop_rank_server()
    os._exit(0)
os.waitpid(child, 0)
kept = directory.is_dir()
distributed.stop_rank_server()
print(kept, directory.exists())
"""


def test_a_rank_leaving_through_stop_rank_server_leaves_its_launchers_socket_directory_alone():
    """A failed rank leaves by ``exit_now``: its launcher's server, socket and all, must outlive it
    for the launcher's next job (the directory went, and every later launch of the process failed)."""
    done = subprocess.run([sys.executable, "-c", STOP_FROM_A_RANK], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "False"], done.stderr


def test_the_rank_servers_children_are_silent_only_when_their_launcher_is_gone(capsys):
    """A rank the server starts unpickles its launcher's semaphores; where the launcher has ended and
    unlinked them, that FileNotFoundError says nothing (the launcher's line does); others print."""
    from syncbn import rank_server

    def semaphore_gone():
        import multiprocessing.synchronize as synchronize
        class Lock:
            __setstate__ = synchronize.SemLock.__setstate__
        Lock().__setstate__((0, 1, 1, "/nonexistent-semaphore"))

    for raising, printed in ((semaphore_gone, False), (lambda: open("/nonexistent/file"), True)):
        try:
            raising()
        except Exception:
            rank_server.quiet_when_orphaned(*sys.exc_info())
        assert bool(capsys.readouterr().err) == printed
