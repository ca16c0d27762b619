"""Process-group plumbing in one place: setup and teardown, backend and device choice, the
single-machine launcher, and small helpers for rank 0 and for counting collectives.

A run is one of:
- a plain process: world size 1 (a one-rank group, so the training code has a single path);
- a rank started by ``torchrun`` (or any elastic agent): it joins the group from the environment;
- the CPU simulation: ``launch_local`` starts N ranks through PyTorch's elastic launcher, the engine
  behind ``torchrun``, and each rank then joins like a torchrun rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from syncbn.config import ConfigError, DistConfig

log = logging.getLogger(__name__)


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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"dist.device={config.device} but CUDA is not available on this machine")
    return device


def choose_backend(config: DistConfig, device: torch.device) -> str:
    """``dist.backend`` if set, else NCCL for CUDA devices and Gloo for CPU."""
    backend = config.backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"dist.backend=nccl needs CUDA devices, but this rank runs on {device}")
    return backend


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
    finally:
        dist.destroy_process_group()


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """torchrun's store, under a prefix of its own for each restart of the worker group.

    The elastic agent's store outlives a restart; without the prefix, a restarted rank can read
    the Gloo addresses its peers published before the crash and fail to connect to them.
    """
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def launch_local(entrypoint: Callable[..., Any], args: tuple, nproc: int, max_restarts: int = 0) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` on ``nproc`` local ranks, as ``torchrun --standalone`` would.

    Returns each rank's return value; raises torch's ``ChildFailedError`` if a rank fails for good.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"syncbn-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    return elastic_launch(config, entrypoint)(*args)


def share_cpu_threads() -> None:
    """Split the machine's cores between the local ranks, as torchrun's OMP_NUM_THREADS=1 intends."""
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 vector over all ranks (one collective), in place, and return it."""
    dist.all_reduce(values)
    return values


def broadcast_buffers_from_main(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. unsynchronized BatchNorm statistics), as DDP would."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count the collectives this process issues inside the block, by name (``c10d::allreduce_``...).

    Every c10d collective, from Python or from DDP's C++ reducer, passes through the dispatcher as
    a ``c10d::`` op, so the profiler sees them all, whatever the backend. The counter is filled
    when the block exits.
    """
    counts: Counter = Counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield counts
    counts.update(event.name for event in prof.events() if event.name.startswith("c10d::"))
