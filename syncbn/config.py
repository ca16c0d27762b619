"""The typed schema behind ``conf/``: Hydra checks every YAML file and override against it.

Values live in ``conf/*.yaml``; this module only says which keys exist and what type each has, so
``train.epochs=abc`` or ``train.epoch=3`` fails before any process starts. ``to_config`` turns the
composed DictConfig into these dataclasses at the boundary, and ``validate`` checks what types cannot.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, is_dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

NORMS = ("syncbn", "bn", "none", "layernorm", "groupnorm")
OPTIMIZERS = ("sgd", "adam")
DATASETS = ("mnist5k", "mnist")


@dataclass
class NormConfig:
    name: str = MISSING
    num_groups: int = 10
    eps: float = 1e-5
    momentum: float = 0.1


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


@dataclass
class TrainConfig:
    epochs: int = 20
    global_batch_size: int = 100
    eval_batch_size: int = 1000
    resume: bool = True
    checkpoint_every_steps: int | None = None


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
class Config:
    seed: int = 0
    norm: NormConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


def register() -> None:
    """Put the schemas in Hydra's ConfigStore; ``conf/`` files name them in their defaults lists."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    store.store(group="norm", name="schema", node=NormConfig)
    store.store(group="optim", name="schema", node=OptimConfig)
    store.store(group="data", name="schema", node=DataConfig)
    store.store(group="model", name="schema", node=ModelConfig)


class ConfigError(ValueError):
    """A configuration value that has the right type but cannot work."""


def validate(config: Config, world_size: int) -> Config:
    """Check what the schema's types cannot, for a run of ``world_size`` ranks."""
    checks = [
        (config.norm.name in NORMS, f"norm must be one of {', '.join(NORMS)}, got {config.norm.name!r}"),
        (config.optim.name in OPTIMIZERS, f"optim must be one of {', '.join(OPTIMIZERS)}, got {config.optim.name!r}"),
        (config.data.name in DATASETS, f"data must be one of {', '.join(DATASETS)}, got {config.data.name!r}"),
        (config.optim.lr > 0, f"optim.lr must be > 0, got {config.optim.lr}"),
        (config.train.epochs >= 1, f"train.epochs must be >= 1, got {config.train.epochs}"),
        (config.model.weight_scale > 0, f"model.weight_scale must be > 0, got {config.model.weight_scale}"),
        (len(config.model.hidden) > 0, "model.hidden must list at least one hidden layer width, got []"),
        (all(w > 0 for w in config.model.hidden), f"model.hidden widths must be > 0, got {config.model.hidden}"),
        (config.dist.nproc >= 1, f"dist.nproc must be >= 1, got {config.dist.nproc}"),
        (config.dist.timeout_s > 0, f"dist.timeout_s must be > 0, got {config.dist.timeout_s}"),
        (config.dist.max_restarts >= 0, f"dist.max_restarts must be >= 0, got {config.dist.max_restarts}"),
        (config.train.checkpoint_every_steps is None or config.train.checkpoint_every_steps >= 1,
         f"train.checkpoint_every_steps must be >= 1 or null, got {config.train.checkpoint_every_steps}"),
        (config.data.train_size is None or config.data.train_size >= 1,
         f"data.train_size must be >= 1 or null (all), got {config.data.train_size}"),
        (config.train.global_batch_size >= world_size,
         f"train.global_batch_size={config.train.global_batch_size} is smaller than the world size {world_size}"),
        (config.train.global_batch_size % world_size == 0,
         f"train.global_batch_size={config.train.global_batch_size} is not divisible by the world size {world_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
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
