"""The typed schema behind ``conf/``: Hydra checks every YAML file and override against it.

Values live in ``conf/*.yaml``; this module only says which keys exist and what type each has, so
``train.epochs=abc`` or ``train.epoch=3`` fails before any process starts. ``to_config`` turns the
composed DictConfig into these dataclasses at the boundary, and ``validate`` checks what types cannot.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass

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
MODELS = ("mlp", "cnn")
BACKENDS = ("gloo", "nccl")


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
    precision: str = "fp32"  # bf16 / fp16: autocast over float32 weights (fp16 with a gradient scaler)
    compile: bool = False  # torch.compile the network, then DDP (inductor; on CPU it needs a C++ compiler)


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


@dataclass(frozen=True)
class Member:
    """One network of a job: the weights a standalone run with these values would draw."""

    norm: str
    weight_scale: float
    seed: int
    bn_slice: int | None = None  # per-rank BN over slices of this many samples (None: the whole batch)

    def record(self) -> dict:
        """What names the member in its metrics."""
        names = dict(norm=self.norm, weight_scale=self.weight_scale, seed=self.seed)
        return names if self.bn_slice is None else dict(names, bn_slice=self.bn_slice)


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
    return any(values is not None for values in (sweep.weight_scales, sweep.norms, sweep.seeds, sweep.bn_slices))


def members(config: Config) -> list[Member]:
    """The networks a job trains, grouped by norm and then slice size: a single run's one, or a
    sweep's product (``sweep.bn_slices`` multiplies the per-rank BN members only)."""
    sweep = config.sweep
    norms = sweep.norms if sweep.norms is not None else [config.norm.name]
    scales = sweep.weight_scales if sweep.weight_scales is not None else [config.model.weight_scale]
    seeds = sweep.seeds if sweep.seeds is not None else [config.seed]
    return [Member(norm, float(scale), seed, bn_slice) for norm in norms
            for bn_slice in (sweep.bn_slices or [None] if norm == "bn" else [None]) for scale in scales for seed in seeds]


def register() -> None:
    """Put the schema in Hydra's ConfigStore; ``conf/config.yaml`` names it first in its defaults,
    so every group's node is typed by the dataclass of its field (``norm: NormConfig``...)."""
    ConfigStore.instance().store(name="schema", node=Config)


SEEDS = ("seed", "data.split_seed", "sweep.seeds", "study.seeds")
SEED_LIMIT = 2**32  # seeds: [0, 2^32), what every generator seeded here takes
INT_LIMIT = 2**31  # every other whole number: sizes and counts beyond int32 are no run's
MAX_TIMEOUT_S = 30 * 24 * 3600.0


def numbers(node, prefix: str = "") -> Iterator[tuple[str, object, list]]:
    """Every number in the config as ``(key, value, its numbers)``, a list's items together: read
    from the dataclasses themselves, so a key added to the schema is checked without being listed."""
    for item in fields(node):
        key, value = f"{prefix}{item.name}", getattr(node, item.name)
        if is_dataclass(value):
            yield from numbers(value, f"{key}.")
            continue
        found = [v for v in (value if isinstance(value, list) else [value])
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if found:
            yield key, value, found


def _number_problems(config: Config) -> Iterator[str]:
    for key, value, found in numbers(config):
        if any(isinstance(v, float) and not math.isfinite(v) for v in found):
            yield f"{key} must be {'finite numbers' if isinstance(value, list) else 'a finite number'}, got {value}"
        elif key in SEEDS and not all(0 <= v < SEED_LIMIT for v in found):
            yield f"{key} must be in [0, 2^32), got {value}"
        elif key not in SEEDS and any(isinstance(v, int) and abs(v) >= INT_LIMIT for v in found):
            yield f"{key} must be below 2^31 in size, got {value}"
    if math.isfinite(config.dist.timeout_s) and config.dist.timeout_s > MAX_TIMEOUT_S:
        yield f"dist.timeout_s must be at most {MAX_TIMEOUT_S:.0f} (30 days), got {config.dist.timeout_s}"


def _choice_problems(config: Config) -> Iterator[str]:
    for key, value, choices in (("norm", config.norm.name, NORMS), ("optim", config.optim.name, OPTIMIZERS),
                                ("data", config.data.name, DATASETS), ("model.name", config.model.name, MODELS),
                                ("train.dtype", config.train.dtype, DTYPES), ("logger", config.logger.name, LOGGERS),
                                ("train.precision", config.train.precision, PRECISIONS),
                                ("dist.backend", config.dist.backend, (None, *BACKENDS))):
        if value not in choices:
            yield f"{key} must be one of {', '.join(c for c in choices if c)}, got {value!r}"


def _norm_problems(config: Config, world_size: int) -> Iterator[str]:
    norm = config.norm
    if norm.eps <= 0:
        yield f"norm.eps must be > 0, got {norm.eps}"
    if not 0 <= norm.momentum <= 1:
        yield f"norm.momentum must be in [0, 1] (the weight of each new batch in the running statistics), got {norm.momentum}"
    if norm.num_groups < 1:
        yield f"norm.num_groups must be >= 1, got {norm.num_groups}"
    elif "groupnorm" in {member.norm for member in members(config)}:
        if any(width % norm.num_groups for width in config.model.hidden):
            yield f"norm.num_groups={norm.num_groups} must divide every width of model.hidden={config.model.hidden}"
    if norm.ghost_slices is not None:
        if norm.name != "bn":
            yield f"norm.ghost_slices emulates per-rank BatchNorm and needs norm=bn, got norm={norm.name}"
        elif norm.ghost_slices < 1 or config.train.global_batch_size % (norm.ghost_slices * world_size):
            yield (f"norm.ghost_slices={norm.ghost_slices} must be >= 1 and divide the per-rank batch "
                   f"{config.train.global_batch_size}/{world_size}")


def _value_problems(config: Config) -> Iterator[str]:
    model, optim, train, dist = config.model, config.optim, config.train, config.dist
    checks = [
        (optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}"),
        (optim.momentum >= 0, f"optim.momentum must be >= 0, got {optim.momentum}"),
        (optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}"),
        (train.epochs >= 1, f"train.epochs must be >= 1, got {train.epochs}"),
        (train.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {train.eval_batch_size}"),
        (model.weight_scale > 0, f"model.weight_scale must be > 0, got {model.weight_scale}"),
        (0 <= model.dropout < 1, f"model.dropout must be in [0, 1), got {model.dropout}"),
        (bool(model.hidden), "model.hidden must list at least one hidden layer width, got []"),
        (all(width >= 1 for width in model.hidden), f"model.hidden widths must be >= 1, got {model.hidden}"),
        (config.data.train_size is None or config.data.train_size >= 1,
         f"data.train_size must be >= 1 or null (all), got {config.data.train_size}"),
        (train.checkpoint_every_steps is None or train.checkpoint_every_steps >= 1,
         f"train.checkpoint_every_steps must be >= 1 or null, got {train.checkpoint_every_steps}"),
        (train.precision == "fp32" or train.dtype == "float32",
         f"train.precision={train.precision} lowers float32 work: it needs train.dtype=float32, got {train.dtype}"),
        (dist.timeout_s > 0, f"dist.timeout_s must be > 0, got {dist.timeout_s}"),
        (dist.max_restarts >= 0, f"dist.max_restarts must be >= 0, got {dist.max_restarts}"),
    ]
    yield from (message for ok, message in checks if not ok)


def _world_problems(config: Config, world_size: int) -> Iterator[str]:
    batch, fault = config.train.global_batch_size, config.fault
    if config.dist.nproc < 1:
        yield f"dist.nproc must be >= 1, got {config.dist.nproc}"
    elif batch < world_size:
        yield f"train.global_batch_size={batch} is smaller than the world size {world_size}"
    elif batch % world_size:
        yield f"train.global_batch_size={batch} is not divisible by the world size {world_size}"
    if (fault.kill_rank is None) != (fault.kill_at_step is None):
        yield "fault.kill_rank and fault.kill_at_step go together: set both or neither"
    elif fault.kill_rank is not None and not 0 <= fault.kill_rank < world_size:
        yield f"fault.kill_rank={fault.kill_rank} is not a rank of this run (0 to {world_size - 1})"
    elif fault.kill_at_step is not None and fault.kill_at_step < 1:
        yield f"fault.kill_at_step must be >= 1, got {fault.kill_at_step}"


def _sweep_problems(config: Config) -> Iterator[str]:
    sweep = config.sweep
    for key, values in (("weight_scales", sweep.weight_scales), ("norms", sweep.norms), ("seeds", sweep.seeds),
                        ("bn_slices", sweep.bn_slices)):
        if values is not None and not values:
            yield f"sweep.{key} must list at least one value, or be null (the single run's value), got []"
        elif values is not None and len(set(values)) < len(values):
            yield f"sweep.{key} lists a value twice: {values}"
    unknown = [name for name in sweep.norms or [] if name not in NORMS]
    if unknown:
        yield f"sweep.norms: each must be one of {', '.join(NORMS)}, got {unknown[0]!r}"
    if any(scale <= 0 for scale in sweep.weight_scales or []):
        yield f"sweep.weight_scales must all be > 0, got {sweep.weight_scales}"
    if any(size < 1 for size in sweep.bn_slices or []):
        yield f"sweep.bn_slices must all be >= 1 (samples per slice), got {sweep.bn_slices}"
    if sweep.bn_slices is not None and not any(member.norm == "bn" for member in members(config)):
        yield "sweep.bn_slices sizes the slices of per-rank BatchNorm members: the job has none (norm=bn or sweep.norms with bn)"
    if not is_sweep(config):
        return
    if config.train.precision == "fp16":
        yield ("train.precision=fp16 trains one network: its gradient scaler skips every member's step when one "
               "member's gradients overflow; a sweep or study takes bf16")
    if config.norm.ghost_slices is not None:
        yield "norm.ghost_slices emulates per-rank BatchNorm in a single run, not in a sweep: leave it null"
    if config.study.per_device_batch is not None:
        yield "the batch-size study (study.per_device_batch) trains single runs: leave sweep.* null"


def _problems(config: Config, world_size: int) -> Iterator[str]:
    """Every value the types allow but a run cannot use, as a message naming the key."""
    yield from _number_problems(config)
    yield from _choice_problems(config)
    yield from _sweep_problems(config)
    yield from _norm_problems(config, world_size)
    yield from _value_problems(config)
    yield from _world_problems(config, world_size)


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
        raise ConfigError(f"unknown config key {', '.join(unknown)}: syncbn/training/config.py lists the keys that exist")
    return OmegaConf.to_object(cfg)
