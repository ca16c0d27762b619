"""The typed schema behind ``conf/``: Hydra checks every YAML file and override against it.

Values live in ``conf/*.yaml``; this module only says which keys exist and what type each has, so
``train.epochs=abc`` or ``train.epoch=3`` fails before any process starts. ``to_config`` turns the
composed DictConfig into these dataclasses at the boundary, and ``validation.validate`` checks what
types cannot.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, is_dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from syncbn.distributed import DistConfig
from syncbn.errors import ConfigError

NORMS = ("syncbn", "bn", "none", "layernorm", "groupnorm")
OPTIMIZERS = ("sgd", "adam")
DATASETS = ("mnist5k", "mnist")
LOGGERS = ("none", "tensorboard")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = ("float32", "float64")
PRECISE_BN = ("off", "final", "every_epoch")
MODELS = ("mlp", "cnn")
BACKENDS = ("gloo", "nccl")


@dataclass
class NormConfig:
    name: str = MISSING
    num_groups: int = 10
    eps: float = 1e-5
    momentum: float = 0.1
    ghost_slices: int | None = None  # norm=bn only: emulate this many ranks of per-rank BN in one process
    group_size: int | None = None  # norm=syncbn only: BN groups of this many consecutive ranks (null: the world)


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
    precision: str = "fp32"  # bf16 / fp16: autocast over float32 weights (fp16 with a gradient scaler)
    compile: bool = False  # torch.compile the network, then DDP (inductor; on CPU it needs a C++ compiler)
    precise_bn: str = "off"  # final / every_epoch: also evaluate with PreciseBN statistics (syncbn.precise_bn)
    batch_stats_eval: bool = False  # also evaluate with batch statistics, test batches of the global batch size


@dataclass
class LoggerConfig:
    name: str = "none"  # tensorboard: event files in the run directory (the [tensorboard] extra)


@dataclass
class FaultConfig:
    """Fault injection for tests and demos: SIGKILL rank ``kill_rank`` after global step
    ``kill_at_step``, on the first attempt only (TORCHELASTIC_RESTART_COUNT=0)."""

    kill_rank: int | None = None
    kill_at_step: int | None = None


@dataclass
class StudyConfig:
    """The batch-size study (``syncbn/experiments/batch_size.py``): a per-device batch becomes a
    data-parallel world size, run as real ranks up to ``max_real_ranks`` and emulated in one
    process beyond. The lists (``+experiment=batch_size_study``) make it one command of a few fused
    jobs; ``per_device_batch`` (``-m +experiment=batch_size_study_per_run``) one run of it."""

    models: list[str] | None = None
    norms: list[str] | None = None
    per_device_batches: list[int] | None = None  # set: the fused study; null: none
    seeds: list[int] | None = None
    per_device_batch: int | None = None  # null: an ordinary run, dist.nproc decides the world size
    max_real_ranks: int = 2
    # Synchronized BN in BN groups of these many devices (2 or more, dividing W, fewer than W) at each
    # per-device batch, emulated in one process, in the models of bn_group_models (null: every model).
    bn_groups: list[int] | None = None
    bn_group_models: list[str] | None = None


@dataclass
class SweepConfig:
    """A sweep trained as one job (``+experiment=weight_scale_sweep``): every member, a network per
    (norm, weight scale, seed), in one batched model. Any list left null holds the single run's
    value (``norm.name``, ``model.weight_scale``, ``seed``); all three null: an ordinary run."""

    weight_scales: list[float] | None = None
    norms: list[str] | None = None
    seeds: list[int] | None = None  # each member's initial weights; the batch order is ``seed``'s
    # Per-rank BatchNorm members (norm bn) as ranks of this many samples: one member per size, each
    # normalizing slices of that size of its rank's batch (GhostBatchNorm's); null: the whole batch.
    bn_slices: list[int] | None = None
    # Synchronized BatchNorm members (norm syncbn) as BN groups of this many ranks of each slice size
    # of bn_slices (SyncBatchNorm's group_size, emulated): one member per pair whose group is smaller
    # than the batch and divides it, beside the member synchronized over the whole batch.
    bn_groups: list[int] | None = None


@dataclass(frozen=True)
class Member:
    """One network of a job: the weights a standalone run with these values would draw."""

    norm: str
    weight_scale: float
    seed: int
    bn_slice: int | None = None  # per-rank BN over slices of this many samples (None: the whole batch)
    bn_group: int | None = None  # synchronized BN over groups of this many slices (None: the whole batch)

    def record(self) -> dict:
        """What names the member in its metrics."""
        names = dict(norm=self.norm, weight_scale=self.weight_scale, seed=self.seed)
        if self.bn_slice is not None:
            names["bn_slice"] = self.bn_slice
        return names if self.bn_group is None else dict(names, bn_group=self.bn_group)


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
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def is_sweep(config: Config) -> bool:
    sweep = config.sweep
    return any(values is not None for values in (sweep.weight_scales, sweep.norms, sweep.seeds, sweep.bn_slices,
                                                 sweep.bn_groups))


def bn_layouts(config: Config, norm: str) -> list[tuple[int | None, int | None]]:
    """A norm's ``(bn_slice, bn_group)`` members: per-rank BN one per slice size; synchronized BN
    the whole batch, then each BN group (``sweep.bn_groups``) of each slice size that is smaller than
    the batch and divides it; any other norm the whole batch."""
    slices, batch = config.sweep.bn_slices, config.train.global_batch_size
    if norm == "bn":
        return [(size, None) for size in slices or [None]]
    if norm == "syncbn" and config.sweep.bn_groups:
        return [(None, None), *((size, k) for size in slices or [] for k in config.sweep.bn_groups
                                if 0 < size * k < batch and batch % (size * k) == 0)]
    return [(None, None)]


def members(config: Config) -> list[Member]:
    """The networks a job trains, grouped by norm and then slice size and group: a single run's one,
    or a sweep's product (``bn_layouts``: the per-rank BN members by slices, the synchronized ones by groups)."""
    sweep = config.sweep
    norms = sweep.norms if sweep.norms is not None else [config.norm.name]
    scales = sweep.weight_scales if sweep.weight_scales is not None else [config.model.weight_scale]
    seeds = sweep.seeds if sweep.seeds is not None else [config.seed]
    return [Member(norm, float(scale), seed, bn_slice, bn_group) for norm in norms
            for bn_slice, bn_group in bn_layouts(config, norm) for scale in scales for seed in seeds]


def register() -> None:
    """Put the schema in Hydra's ConfigStore; ``conf/config.yaml`` names it first in its defaults,
    so every group's node is typed by the dataclass of its field (``norm: NormConfig``...)."""
    ConfigStore.instance().store(name="schema", node=Config)


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
        raise ConfigError(f"unknown config key {', '.join(unknown)}: syncbn/training/config.py lists the keys that exist")
    return OmegaConf.to_object(cfg)
