"""``python -m syncbn.bench``: the arguments, the cases in order, the JSON and the tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from syncbn import bench, distributed
from syncbn.bench.cases import bench_rank, bench_startup
from syncbn.bench.collectives import collective_cases
from syncbn.bench.settings import CASES, LAYER_SHAPES, STEP_NORMS, STUDY_GLOBAL_BATCH, Settings
from syncbn.bench.study import study_cases
from syncbn.bench.sweep import bench_sweep, plain_sweep
from syncbn.bench.tables import report
from syncbn.training.config import MODELS, NORMS
from syncbn.training.loop import cannot_compile


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
    cases = settings.cases
    startup = [bench_startup(settings, w) for w in settings.world_sizes if w > 1] if "startup" in cases else []
    layer_and_step = []
    if {"layer", "step"} & set(cases):
        for world_size in settings.world_sizes:
            layer_and_step += distributed.launch_local(bench_rank, (settings,), world_size)[0]
    sweeps = []
    if "sweep" in cases:
        sweeps = [bench_sweep(settings, "fused", w, settings.sweep_repeats) for w in settings.world_sizes]
        # The per-run reference once: it takes minutes, and its ratio is several times the goal's.
        sweeps += [bench_sweep(settings, "per-run", w, 1) for w in settings.per_run_world_sizes]
    study = study_cases(settings) if "study" in cases else []
    collective = collective_cases(settings) if "collective" in cases else []
    return dict(command=" ".join(["python -m syncbn.bench", *argv]), machine=machine(),
                backend="nccl" if settings.device == "cuda" else "gloo", settings=asdict(settings),
                results=layer_and_step + startup + sweeps + study + collective)


def parse_args(argv: list[str]) -> tuple[Settings, Path, bool]:
    """``--quick`` changes the defaults; any knob given explicitly still wins."""
    quick = "--quick" in argv
    defaults = Settings.quick() if quick else Settings()
    parser = argparse.ArgumentParser(prog="python -m syncbn.bench", description=bench.__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a small run for everyday use (about three minutes)")
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
    parser.add_argument("--study-models", nargs="*", choices=MODELS, default=defaults.study_models,
                        help="models of the study case's reduced batch-size study (none: no study case)")
    parser.add_argument("--study-norms", nargs="+", choices=NORMS, default=defaults.study_norms)
    parser.add_argument("--study-batches", type=int, nargs="+", default=defaults.study_batches,
                        help="per-device batches of the study case (each must divide the global batch, 64)")
    parser.add_argument("--study-epochs", type=int, default=defaults.study_epochs)
    parser.add_argument("--collective-world-sizes", type=int, nargs="+", default=defaults.collective_world_sizes,
                        help="world sizes of the collective case (all-gather against all-reduce)")
    parser.add_argument("--collective-channels", type=int, nargs="+", default=defaults.collective_channels)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=defaults.cases, help="the cases to run")
    parser.add_argument("--plain-sweep", action="store_true", help="only run the sweep case's plain loop, then exit")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=defaults.device)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench.json"),
                        help="JSON file with every raw figure (outputs/ is git-ignored)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    if args.sweep_repeats < 1:
        parser.error(f"--sweep-repeats must be at least 1, got {args.sweep_repeats}")
    if args.study_epochs < 1:
        parser.error(f"--study-epochs must be at least 1, got {args.study_epochs}")
    if uneven := [b for b in args.study_batches if b < 1 or STUDY_GLOBAL_BATCH % b]:
        parser.error(f"--study-batches must divide the study's global batch of {STUDY_GLOBAL_BATCH}, got {uneven[0]}")
    if small := [w for w in args.collective_world_sizes if w < 2]:
        parser.error(f"--collective-world-sizes must be at least 2 (one rank has no collective), got {small[0]}")
    if small := [c for c in args.collective_channels if c < 1]:
        parser.error(f"--collective-channels must be at least 1, got {small[0]}")
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
