"""The typed schema behind ``conf/``: Hydra checks every YAML file and override against it.

Values live in ``conf/*.yaml``; this module only says which keys exist and what type each has, so
``train.epochs=abc`` or ``train.epoch=3`` fails before any process starts. ``to_config`` turns the
composed DictConfig into these dataclasses at the boundary, and ``validate`` checks what types cannot.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, is_dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

NORMS = ("syncbn", "bn", "none", "layernorm", "groupnorm")
OPTIMIZERS = ("sgd", "adam")
DATASETS = ("mnist5k", "mnist")
DTYPES = ("float32", "float64")


@dataclass
class NormConfig:
    name: str = MISSING
    num_groups: int = 10
    eps: float = 1e-5
    momentum: float = 0.1
    ghost_slices: int | None = None  # norm=bn only: emulate this many ranks of per-rank BN in one process


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = "data"
    download: bool = True
    train_size: int | None = 1000
    split_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [100] * 5)
    weight_scale: float = 0.1
    dropout: float = 0.0  # after every hidden block; > 0 makes training draw random numbers


@dataclass
class TrainConfig:
    epochs: int = 20
    global_batch_size: int = 100
    eval_batch_size: int = 1000
    resume: bool = True
    checkpoint_every_steps: int | None = None
    dtype: str = "float32"  # float64: N ranks train like one process to rounding (tests, checks)


@dataclass
class DistConfig:
    nproc: int = 1
    backend: str | None = None
    device: str | None = None
    timeout_s: float = 300.0
    max_restarts: int = 0


@dataclass
class FaultConfig:
    """Fault injection for tests and demos: SIGKILL rank ``kill_rank`` after global step
    ``kill_at_step``, on the first attempt only (TORCHELASTIC_RESTART_COUNT=0)."""

    kill_rank: int | None = None
    kill_at_step: int | None = None


@dataclass
class StudyConfig:
    """The batch-size study (``+experiment=batch_size_study``, see ``syncbn/study.py``): a
    per-device batch becomes a data-parallel world size, run as real ranks up to
    ``max_real_ranks`` and emulated in one process beyond."""

    per_device_batch: int | None = None  # null: an ordinary run, dist.nproc decides the world size
    max_real_ranks: int = 2


@dataclass
class Config:
    seed: int = 0
    norm: NormConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


def register() -> None:
    """Put the schema in Hydra's ConfigStore; ``conf/config.yaml`` names it first in its defaults,
    so every group's node is typed by the dataclass of its field (``norm: NormConfig``...)."""
    ConfigStore.instance().store(name="schema", node=Config)


class ConfigError(ValueError):
    """A configuration value that has the right type but cannot work."""


def _problems(config: Config, world_size: int) -> Iterator[str]:
    """Every value the types allow but a run cannot use, as a message naming the key."""
    for key, value, choices in (("norm", config.norm.name, NORMS), ("optim", config.optim.name, OPTIMIZERS),
                                ("data", config.data.name, DATASETS), ("train.dtype", config.train.dtype, DTYPES)):
        if value not in choices:
            yield f"{key} must be one of {', '.join(choices)}, got {value!r}"
    if config.norm.ghost_slices is not None:
        if config.norm.name != "bn":
            yield f"norm.ghost_slices emulates per-rank BatchNorm and needs norm=bn, got norm={config.norm.name}"
        elif config.norm.ghost_slices < 1 or config.train.global_batch_size % (config.norm.ghost_slices * world_size):
            yield (f"norm.ghost_slices={config.norm.ghost_slices} must be >= 1 and divide the per-rank batch "
                   f"{config.train.global_batch_size}/{world_size}")
    if config.optim.lr <= 0:
        yield f"optim.lr must be > 0, got {config.optim.lr}"
    if config.train.epochs < 1:
        yield f"train.epochs must be >= 1, got {config.train.epochs}"
    if config.model.weight_scale <= 0:
        yield f"model.weight_scale must be > 0, got {config.model.weight_scale}"
    if not 0 <= config.model.dropout < 1:
        yield f"model.dropout must be in [0, 1), got {config.model.dropout}"
    if not config.model.hidden:
        yield "model.hidden must list at least one hidden layer width, got []"
    if any(width < 1 for width in config.model.hidden):
        yield f"model.hidden widths must be >= 1, got {config.model.hidden}"
    if config.data.train_size is not None and config.data.train_size < 1:
        yield f"data.train_size must be >= 1 or null (all), got {config.data.train_size}"
    if config.train.checkpoint_every_steps is not None and config.train.checkpoint_every_steps < 1:
        yield f"train.checkpoint_every_steps must be >= 1 or null, got {config.train.checkpoint_every_steps}"
    if config.dist.timeout_s <= 0:
        yield f"dist.timeout_s must be > 0, got {config.dist.timeout_s}"
    if config.dist.max_restarts < 0:
        yield f"dist.max_restarts must be >= 0, got {config.dist.max_restarts}"
    if config.dist.nproc < 1:
        yield f"dist.nproc must be >= 1, got {config.dist.nproc}"
    elif config.train.global_batch_size < world_size:
        yield f"train.global_batch_size={config.train.global_batch_size} is smaller than the world size {world_size}"
    elif config.train.global_batch_size % world_size:
        yield f"train.global_batch_size={config.train.global_batch_size} is not divisible by the world size {world_size}"


def validate(config: Config, world_size: int) -> Config:
    """Check what the schema's types cannot, for a run of ``world_size`` ranks."""
    problem = next(_problems(config, world_size), None)
    if problem is not None:
        raise ConfigError(problem)
    return config


def _unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    types = typing.get_type_hints(schema)
    unknown = []
    for key, value in node.items():
        if key not in types:
            unknown.append(f"{prefix}{key}")
        elif is_dataclass(types[key]) and isinstance(value, DictConfig):
            unknown += _unknown_keys(value, types[key], f"{prefix}{key}.")
    return unknown


def to_config(cfg: DictConfig) -> Config:
    """The composed Hydra config as typed dataclasses (the ``hydra`` node left out).

    Hydra lets ``+key=value`` add keys the schema lacks; they would be dropped silently here, so
    they are an error instead.
    """
    unknown = _unknown_keys(cfg, Config)
    if unknown:
        raise ConfigError(f"unknown config key {', '.join(unknown)}: syncbn/config.py lists the keys that exist")
    return OmegaConf.to_object(cfg)
