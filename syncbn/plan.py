"""What a command trains, planned and checked before anything starts: its jobs (the whole command, or
the fused batch-size study's), each checked as the direct path checks a run. ``syncbn.train`` runs
them; ``syncbn.launchers`` checks a multirun's every job with the same functions before any starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra

from syncbn import distributed
from syncbn.experiments import batch_size, study_plan, weight_scale
from syncbn.training import data, loop, models, tracking
from syncbn.training.config import Config, is_sweep, to_config
from syncbn.training.validation import validate
from syncbn.training.resume import nothing_to_resume


def preflight(config: Config, world_size: int) -> None:
    """Everything that can be checked before the run takes its directory, each part checking what
    it owns: the values, backend and device, the model's size, compiling, the data and its batches."""
    validate(config, world_size)
    distributed.check(config.dist)
    models.check(config, world_size, distributed.local_processes(world_size), distributed.available_memory())
    loop.check(config.train)
    tracking.check(config.logger)
    data.check(config, world_size)


@dataclass(frozen=True)
class Job:
    """What one training of the command trains, and where: the whole command, or one of the fused
    batch-size study's jobs (a directory each); ``describe`` writes its ``study.json``, if any."""

    config: Config
    world_size: int
    run_dir: Path
    describe: Callable[[Path], Path] | None = None


def with_model(overrides: list[str], model: str) -> Config:
    """The command's config with ``model`` chosen instead: the user's overrides, then the model's
    group (of two choices of a group, Hydra takes the later)."""
    return to_config(hydra.compose("config", overrides=[*overrides, f"model={model}"]))


def plan_jobs(config: Config, run_dir: Path, overrides: list[str],
              launcher_world_size: int | None = None) -> tuple[list[Job], Callable[[Path], list[dict]] | None]:
    """The command's jobs (``overrides``: the command's own; ``launcher_world_size``: the world size a
    launcher of a multirun will give it, where the command's own config does not decide it), and
    what summarizes them at the end (None: nothing)."""

    def world_size(config: Config) -> int:
        return launcher_world_size or distributed.planned_world_size(config.dist)

    validate(config, world_size(config))  # the values first, then what they plan
    study_plan.check(config)
    if config.study.per_device_batches is not None:
        models = {model: with_model(overrides, model) for model in study_plan.study_lists(config)[0]}
        jobs = study_plan.fused_jobs(config, models)
        return [Job(job.config, job.world_size, run_dir / job.name, job.save) for job in jobs], batch_size.summarize
    layout = study_plan.plan(config)
    if layout is not None:
        config = layout.apply(config)
    job = Job(config, world_size(config), run_dir,  # a study's layout decides the world size
              functools.partial(layout.save, config) if layout is not None else None)
    return [job], weight_scale.summarize if is_sweep(config) else None


def finished(jobs: list[Job]) -> list[str | None]:
    """For each job, why it has nothing left to train (its checkpoint says so), or None."""
    return [nothing_to_resume(job.config, job.world_size, job.run_dir) for job in jobs]
