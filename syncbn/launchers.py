"""A multirun checked whole before any of its jobs starts, whichever launcher runs them (Hydra's own,
one job after another; submitit's, locally or on SLURM): every job's config is composed here, in the
launching process, and checked as the direct path checks a single run (``plan.preflight``), with
the world size the launcher will give it, so bad input ends in one line naming the key before the
sweep's directory is made or a job is submitted. The launcher's own keys (``hydra.launcher.*``) are
checked too: submitit would take a negative task count, and fail later, naming none of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from syncbn import endings, plan
from syncbn.errors import ConfigError
from syncbn.training.config import to_config

# submitit's keys (all whole numbers) and their least values, where set (None: submitit's default).
LEAST = {"tasks_per_node": 1, "nodes": 1, "cpus_per_task": 1, "timeout_min": 1, "gpus_per_node": 0, "mem_gb": 0}


def nproc_given(overrides: list[str]) -> bool:
    """Whether a command's overrides set ``dist.nproc`` (``dist.nproc=4``, ``+dist.nproc=4``...)."""
    return any(override.lstrip("+~").partition("=")[0] == "dist.nproc" for override in overrides)


def check_world_size(nproc: int, overrides: list[str], world_size: int, launcher: str) -> None:
    """Where a launcher decides the world size, a ``dist.nproc`` the command gives must agree with it:
    a world size that silently differs from the one asked for trains another experiment (per-rank
    BatchNorm's statistics span W times fewer samples)."""
    if nproc_given(overrides) and nproc != world_size:
        raise ConfigError(f"dist.nproc={nproc}, but {launcher} starts {world_size} ranks: the launcher decides the "
                          f"world size here; leave dist.nproc out or make it {world_size}")


def is_submitit(launcher: DictConfig) -> bool:
    return "submitit" in str(launcher.get("_target_", ""))


def check_launcher(launcher: DictConfig) -> int | None:
    """A submitit launcher's keys; the world size it gives each job (None: not submitit's)."""
    if not is_submitit(launcher):
        return None
    for key, least in LEAST.items():
        value = launcher.get(key)
        if value is not None and value < least:
            raise ConfigError(f"hydra.launcher.{key} must be a whole number >= {least}, got {value}")
    return int(launcher.tasks_per_node) * int(launcher.nodes)


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper will split the command's (its params first)."""
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def check_job(overrides: list[str], launcher_world_size: int | None) -> None:
    """One job as ``train.main`` checks it, with the world size its launcher gives it (None: its own)."""
    cfg = plan.hydra.compose("config", overrides=overrides)
    config = to_config(cfg)
    if launcher_world_size is not None:
        check_world_size(config.dist.nproc, overrides, launcher_world_size,
                         "submitit (hydra.launcher.nodes x hydra.launcher.tasks_per_node)")
    jobs, _ = plan.plan_jobs(config, Path("."), overrides, launcher_world_size)
    for job in jobs:
        plan.preflight(job.config, job.world_size)


class CheckEveryJob(Callback):
    """Hydra callback (every multirun, conf/config.yaml): the whole sweep checked before it starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return  # another sweeper chooses its jobs as it goes: each checks itself
        try:
            world_size = check_launcher(config.hydra.launcher)
            for job in sweep_jobs(config):
                check_job(job, world_size)
        except endings.KNOWN_FAILURES as error:  # Hydra would make a callback's exception a warning, and go on
            print(f"syncbn.train: error: {endings.describe(error)}", file=sys.stderr)
            sys.exit(1)
