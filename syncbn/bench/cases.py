"""The cases run inside the ranks: layer and step; startup, which launches ranks itself."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from syncbn import distributed
from syncbn.batchnorm import SyncBatchNorm
from syncbn.bench.minimum import MinimumSyncBatchNorm
from syncbn.bench.settings import LAYER_SHAPES, Settings
from syncbn.bench.timing import (bn_with_gathers, collectives_per_call, compile_fullgraph, first_calls, gather_floor,
                                 layer_pass, layer_payloads, reduce_floor, time_interleaved)
from syncbn.training.config import DistConfig, ModelConfig, NormConfig
from syncbn.training.models import make_mlp
from syncbn.training.loop import compile_quietly, wrap_ddp


def bench_layer(name: str, settings: Settings, ctx: distributed.DistContext) -> dict:
    shape, memory_format = LAYER_SHAPES[name]
    channels = shape[1]
    gen = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(shape, generator=gen).to(ctx.device, memory_format=memory_format).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(ctx.device, memory_format=memory_format)
    plain_class = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    plain = plain_class(channels).to(ctx.device)
    payloads = layer_payloads(channels, ctx.device)
    contenders = {
        "syncbn": layer_pass(SyncBatchNorm(channels).to(ctx.device), x, grad),
        "local_bn": layer_pass(plain, x, grad),
    }
    compiled = {}
    if settings.compile:
        torch._dynamo.reset()  # this shape's compile time is its own
        plain_compiled = compile_fullgraph(plain_class(channels).to(ctx.device))
        compiled = {
            "syncbn_compiled": layer_pass(compile_fullgraph(SyncBatchNorm(channels).to(ctx.device)), x, grad),
            "local_bn_compiled": layer_pass(plain_compiled, x, grad),
        }
    if ctx.device.type == "cuda" and ctx.world_size > 1:
        contenders["torch_syncbn"] = layer_pass(nn.SyncBatchNorm(channels).to(ctx.device), x, grad)
    compile_seconds = first_calls(compiled, ctx.device)
    if ctx.world_size > 1:
        contenders["floor_allgather"] = gather_floor(payloads)
        contenders["floor_allreduce"] = reduce_floor(payloads)
        contenders["bn_with_gathers"] = bn_with_gathers(plain, x, grad, payloads)
        contenders["bn_inside_gathers"] = bn_with_gathers(plain, x, grad, payloads, in_flight=True)
        contenders["sync_minimum"] = layer_pass(MinimumSyncBatchNorm(channels, ctx.device), x, grad)
        if compiled:
            compiled["bn_compiled_with_gathers"] = bn_with_gathers(plain_compiled, x, grad, payloads)
    # The eager floor timed twice per round: how far apart two copies of one contender come out.
    contenders["floor_again"] = contenders.get("bn_with_gathers", contenders["local_bn"])
    return dict(
        case="layer", shape=name, world_size=ctx.world_size,
        seconds=time_interleaved(contenders | compiled, settings, ctx.device),
        compile_seconds=compile_seconds,
        collectives=collectives_per_call(contenders["syncbn"]),
    )


def bench_step(norm: str, settings: Settings, ctx: distributed.DistContext) -> dict:
    """The trainer's step, eager and (a second DDP model with the same weights) ``torch.compile``d,
    as ``train.compile=true`` runs it."""
    batch = 100 // ctx.world_size
    images = torch.rand(batch, 1, 28, 28, device=ctx.device)
    labels = torch.randint(0, 10, (batch,), device=ctx.device)

    def step_of(compile: bool) -> Callable[[], None]:
        torch.manual_seed(0)
        network = make_mlp(ModelConfig(weight_scale=0.05), NormConfig(name=norm))
        ddp = wrap_ddp(compile_quietly(network) if compile else network, ctx.device, norm == "bn")
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(images), labels).backward()
            optimizer.step()

        return step

    contenders = {"eager": step_of(False)}
    compiled = {}
    if settings.compile:
        torch._dynamo.reset()
        compiled = {"compiled": step_of(True)}
    return dict(
        case="step", norm=norm, world_size=ctx.world_size,
        compile_seconds=first_calls(compiled, ctx.device).get("compiled"),
        seconds=time_interleaved(contenders | compiled, settings, ctx.device),
        collectives=collectives_per_call(contenders["eager"]),
    )


def bench_rank(settings: Settings) -> list[dict]:
    """One rank of the layer and step cases; every rank returns the same (max-over-ranks) figures.
    Compile times are cold: inductor's cache is a new directory."""
    distributed.share_cpu_threads()
    with tempfile.TemporaryDirectory(prefix="syncbn-bench-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # torch itself may have set it: compile times are cold
        with distributed.process_group(DistConfig(device=settings.device, timeout_s=300)) as ctx:
            results = [bench_layer(name, settings, ctx) for name in settings.shapes if "layer" in settings.cases]
            results += [bench_step(norm, settings, ctx) for norm in settings.step_norms if "step" in settings.cases]
    return results


def startup_rank(device: str) -> int:
    with distributed.process_group(DistConfig(device=device, timeout_s=120)) as ctx:
        return ctx.rank


def bench_startup(settings: Settings, world_size: int) -> dict:
    """Seconds per launch of ``world_size`` ranks that join a group and leave: a job's start-up, with
    the launcher's forkserver (what the trainer uses) and, interleaved, spawned ranks (each imports
    torch itself)."""
    seconds: dict[str, list[float]] = {"forkserver": [], "spawn": []}
    for _ in range(settings.startup_launches):
        for method, times in seconds.items():
            start = time.perf_counter()
            distributed.launch_local(startup_rank, (settings.device,), world_size,
                                     start_method=None if method == "forkserver" else method)
            times.append(time.perf_counter() - start)
    return dict(case="startup", world_size=world_size, first_seconds=seconds["forkserver"][0],
                seconds=seconds["forkserver"][1:], spawn_seconds=seconds["spawn"])
