"""``launch/gpu_check.sh``: the CUDA path checked on whatever GPUs this machine has, in one command
and under 10 minutes, ending in a short report to send back (``gpu_check_report.md``).

    launch/gpu_check.sh                 # from a clone with the test extra installed

Steps, each under its own time limit: the tests marked ``cuda`` (the layer against
``torch.nn.SyncBatchNorm`` on NCCL, ranks sharing one GPU over Gloo, DDP training on CUDA against
CPU in float64), then the benchmark's quick cases on CUDA: the layer and training step beside torch's
SyncBatchNorm, and, with 2 or more GPUs, the all-gather against the all-reduce on NCCL (what the NCCL
cost model of ``syncbn/cost.py`` assumes). Without CUDA it says so in one line and exits 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    limit_s: int


@dataclass(frozen=True)
class Outcome:
    step: Step
    status: str  # passed, failed (exit N), timed out
    seconds: float
    tail: str


def plan(gpus: int) -> list[Step]:
    """The steps for a machine with ``gpus`` CUDA devices (at least one)."""
    if gpus < 1:
        raise SystemExit("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check")
    world_sizes = ["1", "2"] if gpus >= 2 else ["1"]  # NCCL takes a GPU per rank
    # Both collectives on NCCL, at as many of 2, 4 and 8 ranks as there are GPUs: what the NCCL cost
    # model (syncbn/cost.py) assumes, measured.
    collective_world_sizes = [str(w) for w in (2, 4, 8) if w <= gpus]
    cases = ["startup", "layer", "step", "sweep", "study"] + (["collective"] if collective_world_sizes else [])
    return [
        Step("cuda tests", [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p",
                            "no:cacheprovider"], 360),
        Step("bench on cuda", [sys.executable, "-m", "syncbn.bench", "--quick", "--no-compile", "--device", "cuda",
                               "--world-sizes", *world_sizes, "--per-run-world-sizes", "--study-models",
                               "--cases", *cases, *(["--collective-world-sizes", *collective_world_sizes]
                                                    if collective_world_sizes else []),
                               "--out", "gpu_check_bench.json"], 200),
    ]


def run_step(step: Step) -> Outcome:
    started = time.monotonic()
    try:
        done = subprocess.run(step.command, capture_output=True, text=True, timeout=step.limit_s)
        status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as timeout:
        status = f"timed out after {step.limit_s} s"
        output = "".join(part.decode() if isinstance(part, bytes) else part or "" for part in (timeout.stdout, timeout.stderr))
    tail = "\n".join(output.strip().splitlines()[-25:])
    return Outcome(step, status, time.monotonic() - started, tail)


def machine() -> str:
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"
    return (f"{torch.cuda.device_count()} x {', '.join(names) or 'no GPU'}; torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, NCCL {nccl}")


def report(machine_line: str, outcomes: list[Outcome]) -> str:
    lines = ["# syncbn GPU check", "", f"Machine: {machine_line}", "", "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {o.step.name} | {o.status} | {o.seconds:.0f} |" for o in outcomes]
    for outcome in outcomes:
        lines += ["", f"## {outcome.step.name}: {outcome.status}", "", "```", f"$ {' '.join(outcome.step.command)}",
                  outcome.tail, "```"]
    verdict = "all passed" if all(o.status == "passed" for o in outcomes) else "SOME STEPS FAILED"
    lines += ["", f"Verdict: {verdict}. Send this file with an issue on the project's tracker."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="launch/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=Path("gpu_check_report.md"))
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    outcomes = [run_step(step) for step in plan(gpus)]
    text = report(machine(), outcomes)
    args.report.write_text(text)
    print(text)
    print(f"wrote {args.report}")
    sys.exit(0 if all(o.status == "passed" for o in outcomes) else 1)


if __name__ == "__main__":
    main()
