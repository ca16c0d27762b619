"""Benchmarks, side by side in one run: SyncBatchNorm against local BatchNorm and the bare collectives.

    python -m syncbn.bench                 # full: world sizes 1, 2, 4 (docs/performance.md)
    python -m syncbn.bench --quick         # everyday check, about two minutes (compiling most of it)
    python -m syncbn.bench --plain-sweep   # only the sweep case's baseline: the plain loop
    python -m syncbn.bench --help          # every knob

Machines are shared and noisy, so absolute times move from run to run; ratios of contenders timed
in the same run hold when they are timed call by call, interleaved in an order shuffled every round,
and read as medians. Each figure is the median over ``calls`` calls of the slowest rank's time of the
call. A second copy of the floor (``floor_again``) is timed beside it: its ratio to the floor is the
run's own noise, the margin within which two contenders cannot be told apart.

Cases, each at every world size (ranks are local processes started by torch's elastic launcher):
1. layer: forward + backward of one norm layer, float32, per-rank shapes (25, 100), (100, 100),
   (8, 64, 32, 32) and the same in channels_last. Contenders: ``syncbn.SyncBatchNorm``; local
   ``nn.BatchNorm`` on the same input (the compute floor); both again under
   ``torch.compile(fullgraph=True)``; ``nn.SyncBatchNorm`` where CUDA is present; and the
   communication floor: the two bare all-gathers of the layer's packed payloads (also timed as
   all-reduces, the measurement behind choosing all-gather), and local BN, eager and compiled,
   with them in place; eager, also with each collective in flight during the BN work; and the least
   a synchronized BN can be on CPU (``syncbn/bench_minimum.py``).
2. step: one DDP training step of the trainer's MLP (5 norm layers), norm = syncbn / bn / none,
   eager and ``torch.compile``d (as ``train.compile=true``).
3. startup: what starting W ranks costs a job: launches of W ranks that join a process group and
   leave, in one process. The process's first launch also starts the launcher's forkserver (it is
   the first world size's first launch) and is reported apart.
4. sweep (``syncbn/bench_sweep.py``): whole commands, start-up included: the fused sweep at each
   world size and the per-run sweep at ``--per-run-world-sizes``, each followed by the plain
   single-process loop over the same networks and epochs (``--plain-sweep``).
Compile times are each compiled contender's first call, with a cold inductor cache.
Collectives per step are counted by the profiler (every ``c10d::`` op), not assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from syncbn import distributed
from syncbn.batchnorm import SyncBatchNorm
from syncbn.bench_minimum import MinimumSyncBatchNorm
from syncbn.bench_sweep import bench_sweep, plain_sweep
from syncbn.bench_tables import report
from syncbn.config import DistConfig, ModelConfig, NormConfig
from syncbn.functional import start_all_gather
from syncbn.models import make_mlp
from syncbn.trainer import cannot_compile, compile_quietly, wrap_ddp

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
    calls: int = 420
    compile: bool = True
    step_norms: list[str] = field(default_factory=lambda: list(STEP_NORMS))
    startup_launches: int = 6
    sweep_scales: int = 16
    sweep_epochs: int = 20
    sweep_repeats: int = 3
    per_run_world_sizes: list[int] = field(default_factory=lambda: [2])
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Settings:
        return cls(world_sizes=[1, 2], shapes=["(25,100)", "(8,64,32,32)"], warmup=3, calls=25,
                   step_norms=["syncbn", "bn"], startup_launches=2, sweep_scales=1, sweep_epochs=1,
                   sweep_repeats=1)


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


def _compiled(module: nn.Module) -> nn.Module:
    return compile_quietly(module, fullgraph=True, dynamic=False)


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


def _gather(payload: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start a bare all-gather, by the very call the layer makes; returns its wait."""
    return start_all_gather(payload, dist.group.WORLD, "bench")


def _gather_floor(payloads) -> Callable[[], None]:
    return lambda: [_gather(payload)() for payload in payloads]


def _reduce_floor(payloads) -> Callable[[], None]:  # the process group's own call, as the all-gathers
    return lambda: [dist.group.WORLD.allreduce([payload]).wait() for payload in payloads]


def _bn_with_gathers(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, payloads,
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


def bench_layer(name: str, settings: Settings, ctx: distributed.DistContext) -> dict:
    shape, memory_format = LAYER_SHAPES[name]
    channels = shape[1]
    gen = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(shape, generator=gen).to(ctx.device, memory_format=memory_format).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(ctx.device, memory_format=memory_format)
    plain_class = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    plain = plain_class(channels).to(ctx.device)
    payloads = _payloads(channels, ctx.device)
    contenders = {
        "syncbn": _layer_pass(SyncBatchNorm(channels).to(ctx.device), x, grad),
        "local_bn": _layer_pass(plain, x, grad),
    }
    compiled = {}
    if settings.compile:
        torch._dynamo.reset()  # this shape's compile time is its own
        plain_compiled = _compiled(plain_class(channels).to(ctx.device))
        compiled = {
            "syncbn_compiled": _layer_pass(_compiled(SyncBatchNorm(channels).to(ctx.device)), x, grad),
            "local_bn_compiled": _layer_pass(plain_compiled, x, grad),
        }
    if ctx.device.type == "cuda" and ctx.world_size > 1:
        contenders["torch_syncbn"] = _layer_pass(nn.SyncBatchNorm(channels).to(ctx.device), x, grad)
    compile_seconds = first_calls(compiled, ctx.device)
    if ctx.world_size > 1:
        contenders["floor_allgather"] = _gather_floor(payloads)
        contenders["floor_allreduce"] = _reduce_floor(payloads)
        contenders["bn_with_gathers"] = _bn_with_gathers(plain, x, grad, payloads)
        contenders["bn_inside_gathers"] = _bn_with_gathers(plain, x, grad, payloads, in_flight=True)
        contenders["sync_minimum"] = _layer_pass(MinimumSyncBatchNorm(channels, ctx.device), x, grad)
        if compiled:
            compiled["bn_compiled_with_gathers"] = _bn_with_gathers(plain_compiled, x, grad, payloads)
    # The eager floor timed twice per round: how far apart two copies of one contender come out.
    contenders["floor_again"] = contenders.get("bn_with_gathers", contenders["local_bn"])
    return dict(
        case="layer", shape=name, world_size=ctx.world_size,
        seconds=time_interleaved(contenders | compiled, settings, ctx.device),
        compile_seconds=compile_seconds,
        collectives=_collectives_per_call(contenders["syncbn"]),
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
        collectives=_collectives_per_call(contenders["eager"]),
    )


def bench_rank(settings: Settings) -> list[dict]:
    """One rank of the layer and step cases; every rank returns the same (max-over-ranks) figures.
    Compile times are cold: inductor's cache is a new directory."""
    distributed.share_cpu_threads()
    with tempfile.TemporaryDirectory(prefix="syncbn-bench-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # torch itself may have set it: compile times are cold
        with distributed.process_group(DistConfig(device=settings.device, timeout_s=300)) as ctx:
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
    parser.add_argument("--quick", action="store_true",
                        help="a small run for everyday use (about two minutes; 40 s with --no-compile)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=defaults.world_sizes)
    parser.add_argument("--shapes", nargs="+", choices=list(LAYER_SHAPES), default=defaults.shapes)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed calls per contender")
    parser.add_argument("--calls", type=int, default=defaults.calls, help="timed calls per contender")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out the torch.compile'd contenders (and their compile time)")
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
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    if args.sweep_repeats < 1:
        parser.error(f"--sweep-repeats must be at least 1, got {args.sweep_repeats}")
    if args.startup_launches < 2:
        parser.error(f"--startup-launches must be at least 2 (the first starts the forkserver), got {args.startup_launches}")
    if args.compile and not args.plain_sweep and (problem := cannot_compile()):
        parser.error(f"the compiled contenders: torch.compile {problem}; or leave them out with --no-compile")
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
