"""Benchmarks, side by side in one run: SyncBatchNorm against local BatchNorm and the bare collectives.

    python -m syncbn.bench                 # full: world sizes 1, 2, 4 (docs/performance.md)
    python -m syncbn.bench --quick         # everyday check, about a minute
    python -m syncbn.bench --plain-sweep   # only the sweep case's baseline: the plain loop
    python -m syncbn.bench --help          # every knob

Machines are shared and noisy, so absolute times move from run to run; ratios of contenders timed
in the same run, interleaved (A B C A B C ...), after the same warm-up, hold. Each figure is the
median over repeats of the slowest rank's time per call (each repeat times ``iters`` calls).

Cases, each at every world size (ranks are local processes started by torch's elastic launcher):
1. layer: forward + backward of one norm layer, float32, per-rank shapes (25, 100), (100, 100),
   (8, 64, 32, 32) and the same in channels_last. Contenders: ``syncbn.SyncBatchNorm``; local
   ``nn.BatchNorm`` on the same input (the compute floor); ``nn.SyncBatchNorm`` where CUDA is present;
   and the communication floor: the two bare all-gathers of the layer's packed payloads, also timed
   as all-reduces (the measurement behind choosing all-gather).
2. step: one DDP training step of the trainer's MLP (5 norm layers), norm = syncbn / bn / none.
3. startup: what starting W ranks costs a job: launches of W ranks that join a process group and
   leave, in one process. The process's first launch also starts the launcher's forkserver (it is
   the first world size's first launch) and is reported apart.
4. sweep: whole commands, start-up included: the fused sweep (``+experiment=weight_scale_sweep``,
   one job) at each world size and the per-run sweep (``-m +experiment=weight_scale_sweep_per_run``)
   at ``--per-run-world-sizes``, each followed by the plain single-process loop over the same
   networks and epochs (``--plain-sweep``: ``nn.BatchNorm1d`` or no norm, no DDP, one network after
   another, evaluated on the 1000 training and 4000 test digits every epoch).
Collectives per step are counted by the profiler (every ``c10d::`` op), not assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from syncbn import distributed
from syncbn.bench_tables import report
from syncbn.batchnorm import SyncBatchNorm
from syncbn.config import DistConfig, ModelConfig, NormConfig
from syncbn.data import load_mnist5k
from syncbn.functional import _all_gather_single
from syncbn.models import make_mlp
from syncbn.trainer import wrap_ddp

LAYER_SHAPES = {
    "(25,100)": ((25, 100), torch.contiguous_format),
    "(100,100)": ((100, 100), torch.contiguous_format),
    "(8,64,32,32)": ((8, 64, 32, 32), torch.contiguous_format),
    "(8,64,32,32) channels_last": ((8, 64, 32, 32), torch.channels_last),
}
STEP_NORMS = ("syncbn", "bn", "none")


@dataclass
class Settings:
    world_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    shapes: list[str] = field(default_factory=lambda: list(LAYER_SHAPES))
    warmup: int = 10
    repeats: int = 15
    iters: int = 20
    step_norms: list[str] = field(default_factory=lambda: list(STEP_NORMS))
    startup_launches: int = 6
    sweep_scales: int = 16
    sweep_epochs: int = 20
    sweep_repeats: int = 3
    per_run_world_sizes: list[int] = field(default_factory=lambda: [2])
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Settings:
        return cls(world_sizes=[1, 2], shapes=["(25,100)", "(8,64,32,32)"], warmup=3, repeats=5, iters=5,
                   step_norms=["syncbn", "bn"], startup_launches=2, sweep_scales=1, sweep_epochs=1,
                   sweep_repeats=1)


def time_interleaved(contenders: dict[str, Callable[[], None]], settings: Settings, device: torch.device) -> dict:
    """Per contender: the slowest rank's seconds per call, for each repeat (interleaved A B C ...)."""
    for fn in contenders.values():
        for _ in range(settings.warmup):
            fn()
    local = torch.zeros(len(contenders), settings.repeats, dtype=torch.float64)
    for repeat in range(settings.repeats):
        for index, fn in enumerate(contenders.values()):
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            for _ in range(settings.iters):
                fn()
            _sync(device)
            local[index, repeat] = (time.perf_counter() - start) / settings.iters
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return {name: local[index].tolist() for index, name in enumerate(contenders)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _collectives_per_call(fn: Callable[[], None]) -> dict:
    with distributed.count_collectives() as counts:
        fn()
    return dict(counts)


def _layer_pass(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        layer(x).backward(grad)

    return run


def _payloads(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's forward ([count, mean, var], float64) and backward ([sum_dy, sum_dy_xhat]) payloads."""
    return (torch.randn(2 * channels + 1, dtype=torch.float64, device=device),
            torch.randn(2 * channels, dtype=torch.float32, device=device))


def _gather_floor(payloads, world_size: int) -> Callable[[], None]:
    outputs = [p.new_empty(world_size * p.numel()) for p in payloads]

    def run() -> None:
        for out, payload in zip(outputs, payloads):
            _all_gather_single(out, payload)

    return run


def _bn_with_gathers(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, payloads, world_size: int) -> Callable[[], None]:
    """Local BN with the two bare all-gathers where SyncBatchNorm has its collectives: the least any
    synchronized BN can cost, including the ranks' wake-up latency around each collective."""
    outputs = [p.new_empty(world_size * p.numel()) for p in payloads]

    def run() -> None:
        x.grad = None
        y = layer(x)
        _all_gather_single(outputs[0], payloads[0])
        y.backward(grad)
        _all_gather_single(outputs[1], payloads[1])

    return run


def _reduce_floor(payloads) -> Callable[[], None]:
    def run() -> None:
        for payload in payloads:
            dist.all_reduce(payload)

    return run


def bench_layer(name: str, settings: Settings, ctx: distributed.DistContext) -> dict:
    shape, memory_format = LAYER_SHAPES[name]
    channels = shape[1]
    gen = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(shape, generator=gen).to(ctx.device, memory_format=memory_format).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(ctx.device, memory_format=memory_format)
    plain = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](channels).to(ctx.device)
    payloads = _payloads(channels, ctx.device)
    contenders = {
        "syncbn": _layer_pass(SyncBatchNorm(channels).to(ctx.device), x, grad),
        "local_bn": _layer_pass(plain, x, grad),
    }
    if ctx.device.type == "cuda" and ctx.world_size > 1:
        contenders["torch_syncbn"] = _layer_pass(nn.SyncBatchNorm(channels).to(ctx.device), x, grad)
    if ctx.world_size > 1:
        contenders["floor_allgather"] = _gather_floor(payloads, ctx.world_size)
        contenders["floor_allreduce"] = _reduce_floor(payloads)
        contenders["bn_with_gathers"] = _bn_with_gathers(plain, x, grad, payloads, ctx.world_size)
    return dict(
        case="layer", shape=name, world_size=ctx.world_size,
        seconds=time_interleaved(contenders, settings, ctx.device),
        collectives=_collectives_per_call(contenders["syncbn"]),
    )


def bench_step(norm: str, settings: Settings, ctx: distributed.DistContext) -> dict:
    torch.manual_seed(0)
    ddp = wrap_ddp(make_mlp(ModelConfig(weight_scale=0.05), NormConfig(name=norm)), ctx.device, norm == "bn")
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    batch = 100 // ctx.world_size
    images = torch.rand(batch, 1, 28, 28, device=ctx.device)
    labels = torch.randint(0, 10, (batch,), device=ctx.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(images), labels).backward()
        optimizer.step()

    return dict(
        case="step", norm=norm, world_size=ctx.world_size,
        seconds=time_interleaved({norm: step}, settings, ctx.device)[norm],
        collectives=_collectives_per_call(step),
    )


def bench_rank(settings: Settings) -> list[dict]:
    """One rank of the layer and step cases; every rank returns the same (max-over-ranks) figures."""
    distributed.share_cpu_threads()
    with distributed.process_group(DistConfig(device=settings.device, timeout_s=120)) as ctx:
        results = [bench_layer(name, settings, ctx) for name in settings.shapes]
        results += [bench_step(norm, settings, ctx) for norm in settings.step_norms]
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


def _sweep_scales(count: int) -> list[float]:
    return [float(v) for v in np.logspace(0, -4, 16)[:: max(1, 16 // count)][:count]]


def plain_sweep(scales: int, epochs: int) -> None:
    """The baseline: one process, plain nn.BatchNorm1d / no norm, the same models and data, no DDP,
    one network after another, evaluated on the training and test digits every epoch."""
    train, test = load_mnist5k(1000, split_seed=0)
    images, labels = train.tensors
    for norm in ("bn", "none"):
        for scale in _sweep_scales(scales):
            torch.manual_seed(0)
            model = make_mlp(ModelConfig(weight_scale=scale), NormConfig(name=norm, eps=1e-6))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            for epoch in range(epochs):
                order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
                model.train()
                for batch in order.split(100):
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(model(images[batch]), labels[batch]).backward()
                    optimizer.step()
                model.eval()
                with torch.no_grad():
                    for dataset in (train, test):
                        (model(dataset.tensors[0]).argmax(1) == dataset.tensors[1]).double().mean().item()


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def sweep_commands(settings: Settings, mode: str, world_size: int, out_dir: str) -> list[str]:
    """The trainer's sweep command over ``settings``' networks and epochs: fused or per run."""
    scales = _sweep_scales(settings.sweep_scales)
    common = [f"train.epochs={settings.sweep_epochs}", f"dist.nproc={world_size}"]
    if mode == "fused":
        return [sys.executable, "-m", "syncbn.train", "+experiment=weight_scale_sweep",
                f"sweep.weight_scales=[{','.join(map(repr, scales))}]", *common, f"hydra.run.dir={out_dir}"]
    return [sys.executable, "-m", "syncbn.train", "-m", "+experiment=weight_scale_sweep_per_run",
            f"model.weight_scale={','.join(map(repr, scales))}", *common, f"hydra.sweep.dir={out_dir}"]


def bench_sweep(settings: Settings, mode: str, world_size: int, repeats: int) -> dict:
    """Wall time of a sweep command and of the plain loop's command (start-up included in both),
    interleaved ``repeats`` times; ``seconds`` and ``plain_seconds`` are the medians."""
    plain = [sys.executable, "-m", "syncbn.bench", "--plain-sweep", "--sweep-scales", str(settings.sweep_scales),
             "--sweep-epochs", str(settings.sweep_epochs)]
    seconds, plain_seconds = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out_dir:
            seconds.append(_timed(sweep_commands(settings, mode, world_size, out_dir)))
        plain_seconds.append(_timed(plain))
    return dict(case="sweep", mode=mode, world_size=world_size, seconds=statistics.median(seconds),
                plain_seconds=statistics.median(plain_seconds), each_seconds=seconds, each_plain_seconds=plain_seconds,
                networks=2 * settings.sweep_scales, epochs=settings.sweep_epochs)


def machine() -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def run(settings: Settings, argv: list[str]) -> dict:
    # First: the first launch of the process starts the forkserver, and is reported as such.
    startup = [bench_startup(settings, w) for w in settings.world_sizes if w > 1]
    layer_and_step = []
    for world_size in settings.world_sizes:
        layer_and_step += distributed.launch_local(bench_rank, (settings,), world_size)[0]
    sweeps = [bench_sweep(settings, "fused", w, settings.sweep_repeats) for w in settings.world_sizes]
    # The per-run reference once: it takes minutes, and its ratio is several times the goal's.
    sweeps += [bench_sweep(settings, "per-run", w, 1) for w in settings.per_run_world_sizes]
    return dict(command=" ".join(["python -m syncbn.bench", *argv]), machine=machine(),
                backend="nccl" if settings.device == "cuda" else "gloo", settings=asdict(settings),
                results=layer_and_step + startup + sweeps)


def parse_args(argv: list[str]) -> tuple[Settings, Path, bool]:
    """``--quick`` changes the defaults; any knob given explicitly still wins."""
    quick = "--quick" in argv
    defaults = Settings.quick() if quick else Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run for everyday use (about a minute)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=defaults.world_sizes)
    parser.add_argument("--shapes", nargs="+", choices=list(LAYER_SHAPES), default=defaults.shapes)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed calls per contender")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed samples per contender")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="calls per timed sample")
    parser.add_argument("--step-norms", nargs="+", choices=STEP_NORMS, default=defaults.step_norms)
    parser.add_argument("--startup-launches", type=int, default=defaults.startup_launches,
                        help="launches per world size in the startup case (at least 2)")
    parser.add_argument("--sweep-scales", type=int, default=defaults.sweep_scales,
                        help="weight scales in the sweep case (x 2 norms)")
    parser.add_argument("--sweep-epochs", type=int, default=defaults.sweep_epochs)
    parser.add_argument("--sweep-repeats", type=int, default=defaults.sweep_repeats,
                        help="interleaved runs of each fused sweep command and the plain loop (medians reported)")
    parser.add_argument("--per-run-world-sizes", type=int, nargs="*", default=defaults.per_run_world_sizes,
                        help="world sizes of the per-run sweep command (slow: a job per network)")
    parser.add_argument("--plain-sweep", action="store_true", help="only run the sweep case's plain loop, then exit")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=defaults.device)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench.json"),
                        help="JSON file with every raw figure (outputs/ is git-ignored)")
    args = parser.parse_args(argv)
    if args.sweep_repeats < 1:
        parser.error(f"--sweep-repeats must be at least 1, got {args.sweep_repeats}")
    if args.startup_launches < 2:
        parser.error(f"--startup-launches must be at least 2 (the first starts the forkserver), got {args.startup_launches}")
    values = {k: v for k, v in vars(args).items() if k not in ("quick", "out", "plain_sweep")}
    return Settings(**values), args.out, args.plain_sweep


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    settings, out, plain_only = parse_args(argv)
    if plain_only:
        plain_sweep(settings.sweep_scales, settings.sweep_epochs)
        return
    data = run(settings, argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(report(data))
    print(f"\nraw figures: {out}")


if __name__ == "__main__":
    main()
