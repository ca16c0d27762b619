"""Process-group plumbing in one place: setup and teardown, backend and device choice, the
single-machine launcher, and small helpers for rank 0 and for counting collectives.

A run is one of:
- a plain process: world size 1 (a one-rank group, so the training code has a single path);
- a rank started by ``torchrun`` (or any elastic agent): it joins the group from the environment;
- the CPU simulation: ``launch_local`` starts N ranks through PyTorch's elastic launcher, the engine
  behind ``torchrun``, and each rank then joins like a torchrun rank.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from syncbn.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistConfig:
    """``dist.*`` of the app's config (``conf/config.yaml`` says what each key does); the bench
    builds one directly."""

    nproc: int = 1
    backend: str | None = None
    device: str | None = None
    timeout_s: float = 300.0
    max_restarts: int = 0


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True in a process started by torchrun or the elastic launcher (they set these variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def planned_world_size(config: DistConfig) -> int:
    """The world size this run will have: torchrun's when launched by it, else ``dist.nproc``."""
    return int(os.environ["WORLD_SIZE"]) if launched() else config.nproc


def choose_device(config: DistConfig, local_rank: int) -> torch.device:
    """``dist.device`` if set (``cuda`` means this rank's GPU), else ``cuda:LOCAL_RANK`` with CUDA, else CPU."""
    if config.device is None:
        use_cuda = torch.cuda.is_available() and config.backend != "gloo"
        return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    try:
        device = torch.device("cuda", local_rank) if config.device == "cuda" else torch.device(config.device)
    except RuntimeError as error:
        raise ConfigError(f"dist.device={config.device} is not a device name torch knows ({error})") from error
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"dist.device must be cpu, cuda or cuda:N, got {config.device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"dist.device={config.device} but CUDA is not available on this machine")
    return device


def choose_backend(config: DistConfig, device: torch.device) -> str:
    """``dist.backend`` if set, else NCCL for CUDA devices and Gloo for CPU."""
    backend = config.backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"dist.backend=nccl needs CUDA devices, but this rank runs on {device}")
    return backend


def local_processes(world_size: int) -> int:
    """The ranks of this run on this machine: torchrun's per-node count, else all of them."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def available_memory() -> int | None:
    """Bytes of memory free for new processes (Linux's MemAvailable), or None where it is not known."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    found = [int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
    return found[0] if found else None


def check(config: DistConfig) -> None:
    """Fail on an impossible backend/device choice before any process starts."""
    choose_backend(config, choose_device(config, 0))


@contextlib.contextmanager
def process_group(config: DistConfig) -> Iterator[DistContext]:
    """Join (or, for a plain process, create) the process group; always tear it down."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = choose_device(config, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = choose_backend(config, device)
    timeout = timedelta(seconds=config.timeout_s)
    if launched():
        dist.init_process_group(backend, store=_attempt_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        yield DistContext(rank, local_rank, world_size, device)
        dist.barrier()  # finished ranks leave together: none tears down while a peer still works
    finally:
        dist.destroy_process_group()


def skip_teardown_at_exit() -> None:
    """Let a process whose work is done and written leave without the interpreter's teardown.

    DDP keeps a reference to the Gloo process group that ``destroy_process_group`` cannot drop
    (measured on torch 2.14: after DDP, its worker threads ``pt_gloo_runloop`` x2 and
    ``gloo_tcp_loop`` still run at exit). Tearing the interpreter and C++ statics down around
    running threads now and then aborts a finished rank (``terminate called without an active
    exception``, SIGABRT), and torchrun then reports the whole run as failed. So the order is:
    collectives done, group destroyed, then, once the process starts to exit (a launcher's rank
    first hands its return value back), logs and streams flushed and ``os._exit(0)``. Call it only
    on success: the exit status it gives is 0.
    """
    atexit.register(exit_now)


def exit_now(status: int = 0) -> NoReturn:
    """Leave at once, skipping the interpreter's teardown (see ``skip_teardown_at_exit``)."""
    stop_rank_server()
    leave(status)


def leave(status: int) -> NoReturn:
    """A rank's way out while its launcher lives on: logs and streams flushed, then ``os._exit``,
    touching nothing the launcher owns (its rank server, and the temporary directory of its socket,
    which a forked rank's ``stop_rank_server`` would remove under it)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """torchrun's store, under a prefix of its own for each restart of the worker group.

    The elastic agent's store outlives a restart; without the prefix, a restarted rank can read
    the Gloo addresses its peers published before the crash and fail to connect to them.
    """
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


MONITOR_INTERVAL_S = 0.1  # how often the launcher looks at its ranks


def leave_after_the_launcher_looks() -> None:
    """For a rank that fails: wait a few of the launcher's polls before ending. A rank whose peer was
    killed fails milliseconds later (its collective sees the connection reset), and the launcher
    reports the first ending it sees in a poll; waiting lets that be the peer's death, the cause."""
    time.sleep(5 * MONITOR_INTERVAL_S)


def record_failure(error: BaseException) -> None:
    """Tell the launcher why this rank fails, in the error file it reads (torch's format).

    Written aside and renamed: the launcher stops the other ranks as soon as one fails, and a rank
    stopped halfway through its write (or whose write fails, on a full disk) would leave a file the
    launcher cannot parse, which ends the launcher itself with a traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    report = {"message": {"message": f"{type(error).__name__}: {error}",
                          "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}
    aside = f"{path}.{os.getpid()}.tmp"
    try:
        Path(aside).write_text(json.dumps(report))
        os.replace(aside, path)
    except OSError:
        Path(aside).unlink(missing_ok=True)


def first_failure(error: ChildFailedError) -> tuple[int, ProcessFailure]:
    """The rank whose failure caused the others.

    Once a rank fails, the launcher stops the rest with SIGTERM and records them too, each dated by
    its own error file in whole seconds. A rank whose collective failed because its peer died wrote
    that file milliseconds after the death, yet can carry an earlier second than the launcher's
    record of the death; so a rank the launcher stopped is a cause only if every rank was stopped.
    """
    causes = {rank: failure for rank, failure in error.failures.items() if failure.exitcode != -signal.SIGTERM}
    if not causes:
        return error.get_first_failure()
    rank = min(causes, key=lambda rank: causes[rank].timestamp)
    return rank, causes[rank]


def launch_local(entrypoint: Callable[..., Any], args: tuple, nproc: int, max_restarts: int = 0,
                 start_method: str | None = None) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` on ``nproc`` local ranks, as ``torchrun --standalone`` would.

    Returns each rank's return value; raises torch's ``ChildFailedError`` if a rank fails for good.
    ``start_method``: the forkserver of ``warm_start_method`` unless given (the benchmark compares).
    The ranks end as soon as this process does, however it ends (``die_with``).
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

    quiet_launcher()
    log_dir = elastic_log_dir()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"syncbn-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=MONITOR_INTERVAL_S,
        start_method=start_method or warm_start_method(),
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
    )
    rank = functools.update_wrapper(functools.partial(_rank_of, os.getpid(), entrypoint), entrypoint)  # its name in errors
    # torch's launcher writes each rank's error file into the temporary directory and leaves it there
    # when a rank is killed: inside this launch's own directory, it goes with it.
    tempdir, tempfile.tempdir = tempfile.tempdir, log_dir
    try:
        return elastic_launch(config, rank)(*args)
    finally:
        tempfile.tempdir = tempdir
        shutil.rmtree(log_dir, ignore_errors=True)


def elastic_log_dir() -> str:
    """A temporary directory for the launcher's per-rank error files, this launch's, removed when it
    ends (left alone, torch's launcher leaves one in /tmp per launch). One a killed launcher left
    behind (its pid in the name, no longer alive) is removed by the next launch."""
    for stale in [*Path(tempfile.gettempdir()).glob("syncbn-elastic-*-*"),
                  *Path(tempfile.gettempdir()).glob("syncbn-rs-*-*")]:
        owner = stale.name.split("-")[2]
        if owner.isdigit() and not Path("/proc", owner).exists():
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"syncbn-elastic-{os.getpid()}-")


def _rank_of(launcher: int, entrypoint: Callable[..., Any], *args: Any) -> Any:
    die_with(launcher)
    return entrypoint(*args)


def die_with(pid: int) -> None:
    """End this process the moment process ``pid`` ends. A rank whose launcher was killed (even with
    SIGKILL, which it cannot pass on) would otherwise train on, writing into a run directory that
    its launcher's lock no longer guards, and wait forever at the end for a launcher that is gone.
    A thread waits on a pidfd of ``pid``, which becomes readable when ``pid`` exits; the rank's
    last complete checkpoint is on disk (written aside, then renamed), so SIGKILL loses nothing
    but the steps since it."""
    try:
        launcher = os.pidfd_open(pid)
    except ProcessLookupError:  # gone before this rank got here
        os.kill(os.getpid(), signal.SIGKILL)
        return

    def watch() -> None:
        select.select([launcher], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="syncbn-die-with-launcher", daemon=True).start()


def warm_start_method() -> str:
    """Ranks forked from a server that has torch and syncbn imported already.

    A spawned rank imports torch itself: about 2.5 s per job at 2 ranks on 2 cores, paid again by
    every run of a sweep. The forkserver is started once per process (the first launch pays the
    import) and forks each rank from there: measured 0.2-0.5 s per launch of 2 ranks after it
    (``python -m syncbn.bench``, case startup). Fork-safe: the server itself only imports (no
    threads, no OpenMP pool); the module run as ``__main__`` is left out, since each rank runs it
    again as ``__mp_main__`` and it must not be in ``sys.modules`` already under its own name.
    """
    # The rank server's socket lives in multiprocessing's temporary directory: named for this process,
    # so that one a killed launcher left behind is removed by the next launch (``elastic_log_dir``).
    # Its socket's path must fit AF_UNIX's 108 bytes: a long TMPDIR gives way to /tmp (as Python 3.12's
    # multiprocessing does).
    config = multiprocessing.process.current_process()._config
    if "tempdir" not in config:
        base = tempfile.gettempdir() if len(tempfile.gettempdir()) <= 60 else "/tmp"
        config["tempdir"] = tempfile.mkdtemp(prefix=f"syncbn-rs-{os.getpid()}-", dir=base)
        atexit.register(shutil.rmtree, config["tempdir"], True)
    # torch._dynamo: DDP's constructor imports it, 1.5 s here.
    preload = ["torch", "torch._dynamo", "syncbn.rank_server",
               *sorted(name for name in sys.modules if name.startswith("syncbn."))]
    multiprocessing.set_forkserver_preload(preload)
    return "forkserver"


def stop_rank_server() -> None:
    """For a process that leaves with ``os._exit`` once its ranks are done: stop the forkserver now
    (left alone it would notice, then spend a second tearing down its torch, holding the command's
    output open), and remove the temporary directory of its socket, which multiprocessing removes
    only at an ordinary interpreter exit. A no-op where this process started no server: a rank
    that fails leaves through here, and its launcher's server serves the launcher's next job."""
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
    # A rank inherits its launcher's config, this directory's name with it: only its maker removes it.
    temporary = multiprocessing.process.current_process()._config.get("tempdir")
    if temporary and Path(temporary).name.startswith(f"syncbn-rs-{os.getpid()}-"):
        shutil.rmtree(temporary, ignore_errors=True)


def quiet_launcher() -> None:
    """The launcher's own warnings (each signal it forwards, each rank it stops) only repeat what
    the app reports in one line; its errors still show, but for the traceback it logs of a failed
    rank (10 lines), which the app's line names with its cause. Ranks it stops mid-step leave
    semaphores for multiprocessing's resource tracker to free, which it does, with a warning."""
    for name in [*logging.root.manager.loggerDict, "torch.multiprocessing.spawn"]:
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing")):
            logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    leaked = "ignore:resource_tracker:UserWarning"
    filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    if leaked not in filters:  # once, not once per run of a sweep
        os.environ["PYTHONWARNINGS"] = ",".join([*filters, leaked])
    # The ranks' c10d C++ warnings and errors (a peer that stopped answering: lines with its socket's
    # addresses, a store client's timeout with 40 stack frames, before the app's line says which rank
    # failed and why), as launch/torchrun.sh does; read when a process imports torch: the rank server
    # does, after this.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")


def share_cpu_threads() -> None:
    """``OMP_NUM_THREADS`` threads if set (torchrun sets 1 for several local ranks), else the
    machine's cores split between the local ranks. One rank per node on a shared machine (nodes
    simulated on localhost) needs the variable: each rank would take every core."""
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    threads = os.environ.get("OMP_NUM_THREADS") or (os.cpu_count() or 1) // local_world_size
    torch.set_num_threads(max(1, int(threads)))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 vector over all ranks (one collective), in place, and return it."""
    dist.all_reduce(values)
    return values


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every rank's ``values`` (same shape everywhere) as the rows of one tensor, on every rank."""
    rows = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, values)
    return torch.stack(rows)


def broadcast_buffers_from_main(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. unsynchronized BatchNorm statistics), as DDP would."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
