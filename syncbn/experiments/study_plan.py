"""How the batch-size study executes: which world size, processes and norm each per-device batch
gets, as the few fused jobs of ``+experiment=batch_size_study`` or as one run of the per-run study.

At global batch B a per-device batch b means W = B / b devices. Up to ``study.max_real_ranks``
the study runs W real Gloo ranks (``real``; W = 1 included). Beyond, it computes in one process
what W ranks compute: per-rank BatchNorm normalizes each slice of b samples of the batch on its
own (``ghost``: GhostBatchNorm's slices, proven equal to real ranks), and every other norm gives
at W ranks what it gives on the global batch (``one-process``): synchronized BN *is* BatchNorm
over the global batch, and LayerNorm, GroupNorm and no norm work per sample.

The fused study trains, for each model, one job at each real W > 1 whose members are the norms
that involve the other ranks (synchronized and per-rank BN) and every seed, and one job at W = 1
for every other row: every norm and seed, and per-rank BN once per per-device batch it emulates
(``sweep.bn_slices``). LayerNorm, GroupNorm and no norm compute at W = 2 what they compute at
W = 1, so real ranks would only repeat them; the per-run study (the reference) still runs them
there. Each job's directory gets ``study.json``: the CSV rows it gives and which member computes each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from syncbn.distributed import launched
from syncbn.errors import ConfigError
from syncbn.training.config import MODELS, NORMS, Config, StudyConfig, SweepConfig

LAYOUT_FILE = "study.json"


def execution(world_size: int, norm: str, max_real_ranks: int) -> str:
    if world_size <= max_real_ranks:
        return "real"
    return "ghost" if norm == "bn" else "one-process"


@dataclass(frozen=True)
class Layout:
    """How one run of the per-run study executes: W = ``world_size`` devices of ``per_device_batch`` each."""

    per_device_batch: int
    world_size: int
    execution: str  # real | ghost | one-process

    def apply(self, config: Config) -> Config:
        """``config`` with the processes and ghost slices that execute this layout."""
        return replace(
            config,
            dist=replace(config.dist, nproc=self.world_size if self.execution == "real" else 1),
            norm=replace(config.norm, ghost_slices=self.world_size if self.execution == "ghost" else None),
        )

    def save(self, config: Config, run_dir: Path) -> Path:
        path = run_dir / LAYOUT_FILE
        run = dict(norm=config.norm.name, model=config.model.name, seed=config.seed, epochs=config.train.epochs)
        group, samples = span(config.norm.name, self.per_device_batch, self.world_size)
        path.write_text(json.dumps(dict(run, **asdict(self), group_size=group, bn_span=samples)) + "\n")
        return path


@dataclass(frozen=True)
class StudyJob:
    """One fused job of the study: its directory's name, its config and the rows it gives."""

    name: str
    config: Config
    rows: list[dict] = field(default_factory=list)  # the CSV's layout columns, and "member": its record's names

    @property
    def world_size(self) -> int:
        return self.config.dist.nproc

    def save(self, run_dir: Path) -> Path:
        path = run_dir / LAYOUT_FILE
        path.write_text(json.dumps(dict(epochs=self.config.train.epochs, rows=self.rows)) + "\n")
        return path


def study_lists(config: Config) -> tuple[list[str], list[str], list[int], list[int]]:
    """The fused study's models, norms, per-device batches and seeds; a list left null holds the
    single run's value."""
    study = config.study
    return (study.models or [config.model.name], study.norms or [config.norm.name], study.per_device_batches or [],
            study.seeds if study.seeds is not None else [config.seed])


def _list_problems(study: StudyConfig) -> Iterator[str]:
    for key in ("models", "norms", "per_device_batches", "seeds"):
        values = getattr(study, key)
        if values is not None and not values:
            yield f"study.{key} must list at least one value, or be null, got []"
        elif values is not None and len(set(values)) < len(values):
            yield f"study.{key} lists a value twice: {values}"
    for key, choices in (("models", MODELS), ("norms", NORMS)):
        unknown = [name for name in getattr(study, key) or [] if name not in choices]
        if unknown:
            yield f"study.{key}: each must be one of {', '.join(choices)}, got {unknown[0]!r}"
    if study.per_device_batches is None and (study.models or study.norms or study.seeds):
        yield "study.models, norms and seeds are lists of the fused study: set study.per_device_batches too"
    if study.per_device_batches is not None and study.per_device_batch is not None:
        yield "study.per_device_batches (the fused study) and study.per_device_batch (one run of the per-run study): set one"


def _problems(config: Config) -> Iterator[str]:
    study, batch = config.study, config.train.global_batch_size
    if study.max_real_ranks < 1:  # a value of its own, in an ordinary run too
        yield f"study.max_real_ranks must be >= 1, got {study.max_real_ranks}"
    yield from _list_problems(study)
    yield from _group_problems(config)
    key = "study.per_device_batches" if study.per_device_batches is not None else "study.per_device_batch"
    batches = study.per_device_batches or ([study.per_device_batch] if study.per_device_batch is not None else [])
    if not batches:
        return
    uneven = [b for b in batches if b < 1 or batch % b]
    if uneven:
        yield f"{key}={uneven[0]} must divide train.global_batch_size={batch}"
    if config.dist.nproc != 1 or launched():
        yield f"{key} sets the world size itself: leave dist.nproc at 1 and start it without torchrun"
    if config.norm.ghost_slices is not None:
        yield f"{key} sets norm.ghost_slices itself: leave it null"
    if study.per_device_batches is not None and any(v is not None for v in asdict(config.sweep).values()):
        yield "study.per_device_batches makes its jobs' members itself: leave sweep.* null"
    if config.data.train_size is None or config.data.train_size % batch:
        # A ragged end would leave the W real ranks uneven batches that W equal slices cannot emulate.
        yield (f"the batch-size study needs data.train_size divisible by train.global_batch_size={batch}, "
               f"so that every step splits into equal per-device batches; got {config.data.train_size}")
    models, norms, _, _ = study_lists(config)
    if "bn" in norms and "mlp" in models and 1 in batches:
        yield "norm=bn with model=mlp normalizes over the per-device batch and needs 2 samples or more, got 1"
    if not uneven:
        yield from _idle_groups(config)


def _group_problems(config: Config) -> Iterator[str]:
    """``study.bn_groups`` and ``study.bn_group_models``: they make rows of the fused study's syncbn
    (none where it has none, or where a model is not among the study's)."""
    study = config.study
    if study.per_device_batches is None and (study.bn_groups is not None or study.bn_group_models is not None):
        yield "study.bn_groups and study.bn_group_models make rows of the fused study: set study.per_device_batches too"
    for key in ("bn_groups", "bn_group_models"):
        values = getattr(study, key)
        if values is not None and (not values or len(set(values)) < len(values)):
            yield f"study.{key} must list distinct values, or be null, got {values}"
    if any(k < 2 for k in study.bn_groups or []):
        yield f"study.bn_groups must all be >= 2 (a group of 1 is per-rank BN, norm bn), got {study.bn_groups}"
    unknown = [model for model in study.bn_group_models or [] if model not in MODELS]
    if unknown:
        yield f"study.bn_group_models: each must be one of {', '.join(MODELS)}, got {unknown[0]!r}"


def _idle_groups(config: Config) -> Iterator[str]:
    """Some k may find no world size (the experiment's defaults with fewer per-device batches): only a
    list none of whose k makes a group, in a study whose syncbn and models would have groups, is refused."""
    study = config.study
    models, norms, _, _ = study_lists(config)
    if "syncbn" not in norms or not set(models) & set(study.bn_group_models or models):
        return  # no group would be made anyway (a study of other norms or models keeps the defaults)
    worlds = [config.train.global_batch_size // b for b in study.per_device_batches or [] if b > 0]
    if study.bn_groups and all(k >= 2 and not any(k < w and w % k == 0 for w in worlds) for k in study.bn_groups):
        yield (f"study.bn_groups={study.bn_groups} makes no BN group: no world size of study.per_device_batches "
               f"({', '.join(map(str, worlds))} devices) is a larger multiple of any of them")


def check(config: Config) -> None:
    problem = next(_problems(config), None)
    if problem is not None:
        raise ConfigError(problem)


def plan(config: Config) -> Layout | None:
    """The layout of a per-run study run, or None for any other run (``study.per_device_batch`` null)."""
    check(config)
    if config.study.per_device_batch is None:
        return None
    world_size = config.train.global_batch_size // config.study.per_device_batch
    return Layout(config.study.per_device_batch, world_size,
                  execution(world_size, config.norm.name, config.study.max_real_ranks))


def _job(name: str, config: Config, world_size: int, norms: list[str], seeds: list[int],
         rows: list[dict], bn_slices: list[int] | None = None) -> StudyJob:
    job = replace(config, study=StudyConfig(max_real_ranks=config.study.max_real_ranks),
                  sweep=SweepConfig(norms=norms, seeds=seeds, bn_slices=bn_slices),
                  dist=replace(config.dist, nproc=world_size))
    return StudyJob(name, job, rows)


RANK_NORMS = ("syncbn", "bn")  # the norms whose computation involves the other ranks


def span(norm: str, b: int, world_size: int, group_size: int | None = None) -> tuple[int | None, int | None]:
    """``(group_size, bn_span)``: how many devices share each BatchNorm statistic, and over how many
    samples it is taken (per-rank BN: 1 and b; synchronized BN: its group, or the world); none for a
    norm without batch statistics."""
    if norm == "bn":
        return 1, b
    if norm == "syncbn":
        return group_size or world_size, b * (group_size or world_size)
    return None, None


def _emulated_row(layout: dict, norm: str, b: int, seed: int, batch: int, norms: list[str],
                  group_size: int | None = None) -> dict:
    """A row the W = 1 job gives. Per-rank BN over the whole batch (W = 1) is synchronized BN at
    W = 1, the same ``F.batch_norm`` call: a syncbn member, where the job has one, gives both rows.
    BN groups of k devices of b samples: a synchronized member over groups of k slices of b."""
    world_size = batch // b
    if group_size is not None:
        member = dict(norm="syncbn", seed=seed, bn_slice=b, bn_group=group_size)
    elif norm != "bn":
        member = dict(norm=norm, seed=seed)
    elif world_size == 1 and "syncbn" in norms:
        member = dict(norm="syncbn", seed=seed)
    else:
        member = dict(norm="bn", seed=seed, bn_slice=b)
    emulated = "ghost" if group_size is not None else execution(world_size, norm, max_real_ranks=1)
    group, samples = span(norm, b, world_size, group_size)
    return dict(layout, norm=norm, per_device_batch=b, world_size=world_size, group_size=group, bn_span=samples,
                seed=seed, execution=emulated, member=member)


def _w1_job(name: str, config: Config, seeds: list[int], rows: list[dict]) -> StudyJob:
    """The W = 1 job training the members ``rows`` name."""
    norms = list(dict.fromkeys(row["member"]["norm"] for row in rows))
    slices = sorted({row["member"]["bn_slice"] for row in rows if "bn_slice" in row["member"]}, reverse=True)
    groups = sorted({row["member"]["bn_group"] for row in rows if "bn_group" in row["member"]})
    job = _job(name, config, 1, norms, seeds, rows, slices or None)
    return replace(job, config=replace(job.config, sweep=replace(job.config.sweep, bn_groups=groups or None)))


def _grouped_rows(config: Config, model: str, layout: dict, batches: list[int], seeds: list[int]) -> list[dict]:
    """The rows of BN groups: each k of ``study.bn_groups`` smaller than W that divides it, at every b."""
    study, batch = config.study, config.train.global_batch_size
    if not study.bn_groups or model not in (study.bn_group_models or [model]) or "syncbn" not in study_lists(config)[1]:
        return []
    return [_emulated_row(layout, "syncbn", b, seed, batch, ["syncbn"], k) for b in sorted(batches, reverse=True)
            for k in study.bn_groups if k < batch // b and (batch // b) % k == 0 for seed in seeds]


def fused_jobs(config: Config, model_configs: dict[str, Config]) -> list[StudyJob]:
    """The fused study's jobs (``model_configs``: the study's config with each model chosen): per
    model, real ranks for the norms that involve them at each W up to ``study.max_real_ranks``,
    and one job at W = 1 for every other row."""
    check(config)
    models, norms, batches, seeds = study_lists(config)
    batch, max_real = config.train.global_batch_size, config.study.max_real_ranks
    on_ranks = [norm for norm in norms if norm in RANK_NORMS]
    real_sizes = sorted({batch // b for b in batches if 1 < batch // b <= max_real})
    jobs = []
    for model in models:
        model_config = model_configs[model]
        layout = dict(model=model, epochs=config.train.epochs)
        emulated = [_emulated_row(layout, norm, b, seed, batch, norms) for b in sorted(batches, reverse=True)
                    for norm in norms for seed in seeds if not (norm in on_ranks and batch // b in real_sizes)]
        emulated += _grouped_rows(config, model, layout, batches, seeds)
        if emulated:
            jobs.append(_w1_job(f"{model}-w1", model_config, seeds, emulated))
        for world_size in real_sizes if on_ranks else []:
            b = batch // world_size
            rows = [dict(layout, norm=norm, per_device_batch=b, world_size=world_size,
                         **dict(zip(("group_size", "bn_span"), span(norm, b, world_size))), seed=seed,
                         execution="real", member=dict(norm=norm, seed=seed)) for norm in on_ranks for seed in seeds]
            jobs.append(_job(f"{model}-w{world_size}", model_config, world_size, on_ranks, seeds, rows))
    return jobs
