"""The benchmark's collective case: the layer's all-gather and all-reduce side by side, W ranks by C
channels, and what ``collective="auto"`` chooses there.

Per (W, C): the time of a layer step (forward + backward of ``SyncBatchNorm(C)`` on (16, C) per rank,
float32) with each collective, and the bytes each rank receives in it, counted by the kernel: Gloo
writes its messages through ``write``, which ``/proc/self/io``'s ``wchar`` adds up, and every byte
a group sends one of its ranks receives, so the group's bytes written over W are the bytes a rank
receives on average (each rank writes what it receives in both of the layer's ring collectives).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from syncbn import distributed
from syncbn.batchnorm import SyncBatchNorm
from syncbn.bench.settings import Settings
from syncbn.bench.timing import layer_pass, time_interleaved
from syncbn.cost import CostModel
from syncbn.training.config import DistConfig

COLLECTIVE_BATCH = 16  # samples per rank
COUNTED_CALLS = 3  # layer steps whose bytes are counted: each moves the same, the mean dilutes the barrier's


def written_bytes() -> int:
    """Bytes this process has written, sockets included (Linux's ``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


def received_bytes(step, calls: int) -> float:
    """Bytes a rank receives per call of ``step``, on average over the group's ranks."""
    dist.barrier()
    start = written_bytes()
    for _ in range(calls):
        step()
    written = torch.tensor([written_bytes() - start], dtype=torch.float64)
    dist.all_reduce(written)
    return written.item() / dist.get_world_size() / calls


def collective_point(channels: int, settings: Settings, ctx: distributed.DistContext,
                     cost_model: CostModel | None = None) -> dict:
    """``auto``: the layer with ``cost_model`` (None: its own default for the device)."""
    gen = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(COLLECTIVE_BATCH, channels, generator=gen).requires_grad_()
    grad = torch.randn(COLLECTIVE_BATCH, channels, generator=gen)
    layers = {name: SyncBatchNorm(channels, collective=name, cost_model=cost_model)
              for name in ("all_gather", "all_reduce", "auto")}
    steps = {name: layer_pass(layer, x, grad) for name, layer in layers.items()}
    for step in steps.values():
        step()  # a first step of each: auto chooses there, and every path is warm
    timed = {name: steps[name] for name in ("all_gather", "all_reduce")}
    return dict(
        case="collective", world_size=ctx.world_size, channels=channels,
        seconds=time_interleaved(timed, settings, ctx.device),
        received_bytes={name: received_bytes(step, COUNTED_CALLS) for name, step in timed.items()},
        chosen=layers["auto"].auto_choice,
    )


def collective_rank(settings: Settings) -> list[dict]:
    distributed.share_cpu_threads()
    with distributed.process_group(DistConfig(device=settings.device, timeout_s=300)) as ctx:
        return [collective_point(channels, settings, ctx) for channels in settings.collective_channels]


def collective_cases(settings: Settings) -> list[dict]:
    """The case at each of ``settings.collective_world_sizes``, ranks started for each."""
    results = []
    for world_size in settings.collective_world_sizes:
        results += distributed.launch_local(collective_rank, (settings,), world_size)[0]
    return results
