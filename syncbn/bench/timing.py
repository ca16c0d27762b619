"""Timing contenders call by call, interleaved, and the contenders the layer case builds."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from syncbn import counting
from syncbn.bench.settings import Settings
from syncbn.comm import start_all_gather
from syncbn.training.loop import compile_quietly


def time_interleaved(contenders: dict[str, Callable[[], None]], settings: Settings, device: torch.device) -> dict:
    """Per contender: the slowest rank's seconds of each of ``settings.calls`` timed calls.

    Calls are timed one by one, every contender once per round, in an order shuffled every round (the
    same on every rank): contenders share the machine's slow and quiet moments, and none always runs
    after another (what ran before a call changes its time by several percent here). On CUDA each
    call is synchronized before its time is read. Read the lists by their medians: a sample of many
    calls in a row is at the mercy of the moments it hits, and a call-by-call median is not
    (docs/performance.md measures both ways against ``floor_again``)."""
    fns = list(contenders.values())
    for _ in range(settings.warmup):
        for fn in fns:
            fn()
    order = torch.Generator().manual_seed(0)
    seconds = torch.zeros(len(fns), settings.calls, dtype=torch.float64)
    dist.barrier()
    for call in range(settings.calls):
        for index in torch.randperm(len(fns), generator=order).tolist():
            start = time.perf_counter()
            fns[index]()
            _sync(device)
            seconds[index, call] = time.perf_counter() - start
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    # To 0.1 us, far finer than calls vary: every call is kept, and the JSON stays small.
    return {name: [round(t, 7) for t in seconds[index].tolist()] for index, name in enumerate(contenders)}


def first_calls(contenders: dict[str, Callable[[], None]], device: torch.device) -> dict:
    """Seconds of each contender's first call, the slowest rank's: for a compiled one, its compile time."""
    return _slowest_rank_seconds(contenders, 1, device)


def _slowest_rank_seconds(contenders: dict[str, Callable[[], None]], calls: int, device: torch.device) -> dict:
    """Each contender's seconds per call over ``calls`` calls in a row, the slowest rank's."""
    seconds = torch.zeros(len(contenders), dtype=torch.float64)
    for index, fn in enumerate(contenders.values()):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        seconds[index] = (time.perf_counter() - start) / calls
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return dict(zip(contenders, seconds.tolist()))


def compile_fullgraph(module: nn.Module) -> nn.Module:
    return compile_quietly(module, fullgraph=True, dynamic=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def collectives_per_call(fn: Callable[[], None]) -> dict:
    with counting.count_collectives() as counts:
        fn()
    return dict(counts)


def layer_pass(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        layer(x).backward(grad)

    return run


def layer_payloads(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's forward ([count, mean, var], float64) and backward ([sum_dy, sum_dy_xhat]) payloads."""
    return (torch.randn(2 * channels + 1, dtype=torch.float64, device=device),
            torch.randn(2 * channels, dtype=torch.float32, device=device))


def _gather(payload: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start a bare all-gather, by the very call the layer makes; returns its wait."""
    return start_all_gather(payload, dist.group.WORLD, "bench")


def gather_floor(payloads) -> Callable[[], None]:
    return lambda: [_gather(payload)() for payload in payloads]


def reduce_floor(payloads) -> Callable[[], None]:  # the process group's own call, as the all-gathers
    return lambda: [dist.group.WORLD.allreduce([payload]).wait() for payload in payloads]


def bn_with_gathers(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, payloads,
                     in_flight: bool = False) -> Callable[[], None]:
    """Local BN with the two bare all-gathers where SyncBatchNorm has its collectives: the least any
    synchronized BN can cost, including the ranks' wake-up latency around each collective. With
    ``in_flight``, each collective starts before the BN work and is waited for after it: what the
    work costs while the payloads travel (the layer computes ``a * dy`` there)."""

    def run() -> None:
        x.grad = None
        wait = _gather(payloads[0]) if in_flight else None
        y = layer(x)
        (wait or _gather(payloads[0]))()
        wait = _gather(payloads[1]) if in_flight else None
        y.backward(grad)
        (wait or _gather(payloads[1]))()

    return run
