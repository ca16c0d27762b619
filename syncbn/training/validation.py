"""What the schema's types cannot say: every value a run cannot use, refused with a message naming its
key (``validate``), before anything is created."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import fields, is_dataclass

from syncbn.errors import ConfigError
from syncbn.training.config import (BACKENDS, DATASETS, DTYPES, LOGGERS, MODELS, NORMS, OPTIMIZERS, PRECISE_BN,
                                    PRECISIONS, Config, is_sweep, members)

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
                                ("train.precise_bn", config.train.precise_bn, PRECISE_BN),
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
    if norm.group_size is not None:
        if "syncbn" not in {member.norm for member in members(config)}:
            yield f"norm.group_size makes BN groups of synchronized BatchNorm and needs norm=syncbn, got norm={norm.name}"
        elif norm.group_size < 1 or world_size % norm.group_size:
            yield (f"norm.group_size={norm.group_size} must be >= 1 and divide the world size {world_size} "
                   "(the groups are ranks 0..k-1, k..2k-1, ...)")
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


def _sweep_problems(config: Config, world_size: int) -> Iterator[str]:
    sweep = config.sweep
    for key, values in (("weight_scales", sweep.weight_scales), ("norms", sweep.norms), ("seeds", sweep.seeds),
                        ("bn_slices", sweep.bn_slices), ("bn_groups", sweep.bn_groups)):
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
    if any(size < 1 for size in sweep.bn_groups or []):
        yield f"sweep.bn_groups must all be >= 1, got {sweep.bn_groups}"
    yield from _group_problems(config, world_size)
    if not is_sweep(config):
        return
    if config.train.precision == "fp16":
        yield ("train.precision=fp16 trains one network: its gradient scaler skips every member's step when one "
               "member's gradients overflow; a sweep or study takes bf16")
    if config.norm.ghost_slices is not None:
        yield "norm.ghost_slices emulates per-rank BatchNorm in a single run, not in a sweep: leave it null"
    if config.study.per_device_batch is not None:
        yield "the batch-size study (study.per_device_batch) trains single runs: leave sweep.* null"


def _group_problems(config: Config, world_size: int) -> Iterator[str]:
    sweep, norms = config.sweep, {member.norm for member in members(config)}
    if sweep.bn_slices is not None and "bn" not in norms and not (sweep.bn_groups and "syncbn" in norms):
        yield ("sweep.bn_slices sizes the slices of per-rank BatchNorm members (norm=bn or sweep.norms with bn), or "
               "the ranks of sweep.bn_groups: the job has neither")
    if not sweep.bn_groups:
        return
    if "syncbn" not in norms or not sweep.bn_slices:
        yield ("sweep.bn_groups emulates BN groups of synchronized BatchNorm members over ranks of sweep.bn_slices "
               "samples: it needs norm=syncbn (or sweep.norms with syncbn) and sweep.bn_slices")
        return
    if world_size > 1:  # each real rank would group its own slices, not the global batch's
        yield (f"sweep.bn_groups emulates BN groups in one process, the whole global batch its ranks; at {world_size} "
               "ranks leave it out (norm.group_size makes BN groups of real ranks)")
    made = {member.bn_group for member in members(config)}
    lost = [k for k in sweep.bn_groups if k not in made]
    if lost:
        yield (f"sweep.bn_groups={lost[0]}: with no slice size of sweep.bn_slices={sweep.bn_slices} is a group of "
               f"{lost[0]} ranks smaller than train.global_batch_size={config.train.global_batch_size} and a divisor of it")


def _problems(config: Config, world_size: int) -> Iterator[str]:
    """Every value the types allow but a run cannot use, as a message naming the key."""
    yield from _number_problems(config)
    yield from _choice_problems(config)
    yield from _sweep_problems(config, world_size)
    yield from _norm_problems(config, world_size)
    yield from _value_problems(config)
    yield from _world_problems(config, world_size)


def validate(config: Config, world_size: int) -> Config:
    """Check what the schema's types cannot, for a run of ``world_size`` ranks."""
    problem = next(_problems(config, world_size), None)
    if problem is not None:
        raise ConfigError(problem)
    return config
