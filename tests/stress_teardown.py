"""Short runs in a row while busy loops keep every core loaded: each must exit 0.

    python tests/stress_teardown.py 30      # 30 torchrun runs and 30 dist.nproc=2 runs

A finished rank that aborts at teardown (SIGABRT) fails its run; under load it happens more often.
``tests/test_train.py`` runs a few of these on every ``pytest``; docs/reliability.md has the result.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.epochs=1", "data.train_size=200"]


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_cores() -> Iterator[None]:
    """One busy loop per core for the duration of the block."""
    loops = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)]
    for loop in loops:
        loop.start()
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.join()


def commands(run_dir: Path) -> dict[str, tuple[list[str], dict]]:
    return {
        "torchrun": (["bash", "launch/torchrun.sh", "--standalone", "--nproc-per-node=2", "--", *OVERRIDES],
                     {"SYNCBN_RUN_DIR": str(run_dir / "torchrun")}),
        "dist.nproc=2": ([sys.executable, "-m", "syncbn.train", "dist.nproc=2", *OVERRIDES,
                          f"hydra.run.dir={run_dir / 'simulation'}"], {}),
    }


def stress(runs: int, launchers: tuple[str, ...] = ("torchrun", "dist.nproc=2")) -> list[str]:
    """``runs`` runs of each of ``launchers`` under load; a line per failed run."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    failures = []
    with tempfile.TemporaryDirectory() as tmp, busy_cores():
        for index in range(runs):
            for name, (command, extra) in commands(Path(tmp) / f"{index}").items():
                if name not in launchers:
                    continue
                result = subprocess.run(command, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=300)
                if result.returncode != 0:
                    tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
                    failures.append(f"{name} run {index + 1}: exit {result.returncode}: {' | '.join(tail)}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, nargs="?", default=30, help="runs per launcher")
    runs = parser.parse_args(argv).runs
    failures = stress(runs)
    print("\n".join(failures))
    print(f"{len(failures)} failed of {2 * runs} runs ({runs} torchrun, {runs} dist.nproc=2), every core busy")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
