"""Shared by the tests that compose the app's config or run it as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from syncbn.training.config import Config, register, to_config

ROOT = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str) -> Config:
    """``conf/config.yaml`` with ``overrides``, as typed dataclasses."""
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def run(args: list[str], timeout: float = 180, cwd: Path = ROOT, check: bool = True, **env) -> subprocess.CompletedProcess:
    """``args`` in ``cwd`` (the repository root), with this interpreter's scripts first on PATH; must
    succeed unless ``check`` is False."""
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)
    assert not check or result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def strip(records: list[dict]) -> list[dict]:
    """The metrics without wall time."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def why_not_compiled() -> str | None:
    """Why the compiled tests cannot run here: found without ``loop.cannot_compile``, which they
    also test (a skip computed by the code under test would hide that code's breakage)."""
    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        return "no C++ compiler for inductor on PATH"
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        return f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}: inductor's C++ does not follow it"
    return None


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run ``python -m syncbn.train ARGS`` in this process; its exit code and stderr."""
    from syncbn import train  # the app registers its config schema on import: only where it runs

    monkeypatch.setattr(sys, "argv", ["syncbn.train", *args])
    # What the app sets for its own process (--check's and --debug's variables, a rank's place read
    # from SLURM's) would otherwise stay for every later test: a subprocess inheriting
    # SYNCBN_CHECK_ONLY=1 checks its config and exits 0 without training.
    environment = dict(os.environ)
    code = 0
    try:
        train.cli()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        os.environ.clear()
        os.environ.update(environment)
    return code, capsys.readouterr().err


def live_processes(group: int) -> list[str]:
    """The processes of a process group that are still running (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            pid_command, fields = stat.read_text().rsplit(")", 1)
            state, _, pgrp = fields.split()[:3]
            if int(pgrp) == group and state != "Z":
                found.append(pid_command + ")")
    return found
