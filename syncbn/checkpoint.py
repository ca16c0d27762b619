"""Checkpoints that let a killed run continue bit-exactly: written atomically by rank 0, read by all.

A checkpoint holds the model (SyncBatchNorm's running statistics included), the optimizer, where
training stands (epoch, step within it, the epoch's partial loss sums), every RNG state and the
metrics so far. ``save`` writes a temporary file, fsyncs it, moves the previous checkpoint aside
and renames the new one into place, so a crash at any moment leaves a complete checkpoint:
``checkpoint.pt`` or, between the two renames, ``checkpoint.prev.pt``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


class CheckpointError(RuntimeError):
    """A checkpoint in the run directory that this run cannot continue from."""


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        python=random.getstate(),
        numpy=(numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
    )


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, state: dict) -> Path:
    """Write ``state`` as the run's latest checkpoint, keeping the one before it."""
    latest, temporary = run_dir / LATEST, run_dir / f".{LATEST}.tmp"
    with temporary.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if latest.exists():
        os.replace(latest, run_dir / PREVIOUS)
    os.replace(temporary, latest)
    _fsync_dir(run_dir)
    return latest


def load(run_dir: Path) -> dict | None:
    """The newest complete checkpoint in ``run_dir``, or None if it has none."""
    for name in (LATEST, PREVIOUS):
        path = run_dir / name
        if path.exists():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise CheckpointError(f"{path} cannot be read ({reason}); move it away or pass train.resume=false") from error
    return None


def signature(model: torch.nn.Module, norm: str, world_size: int) -> dict:
    """What a checkpoint must match to be continued: world size, norm, dtype, every tensor's shape."""
    return dict(
        world_size=world_size,
        norm=norm,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        shapes={name: tuple(t.shape) for name, t in model.state_dict().items()},
    )


def check_compatible(state: dict, expected: dict, run_dir: Path) -> None:
    found = state["signature"]
    where = f"the checkpoint in {run_dir}"
    advice = "use another run directory (hydra.run.dir=...) or train.resume=false"
    if found["world_size"] != expected["world_size"]:
        raise CheckpointError(
            f"{where} was written at world size {found['world_size']}, this run has {expected['world_size']}; {advice}"
        )
    if found["norm"] != expected["norm"]:
        raise CheckpointError(f"{where} was written with norm={found['norm']}, this run has norm={expected['norm']}; {advice}")
    if found.get("dtype", "float32") != expected["dtype"]:
        raise CheckpointError(
            f"{where} was written with train.dtype={found.get('dtype', 'float32')}, this run has "
            f"train.dtype={expected['dtype']}; {advice}"
        )
    theirs, ours = found["shapes"], expected["shapes"]
    if theirs != ours:
        name = next(n for n in sorted(set(theirs) | set(ours)) if theirs.get(n) != ours.get(n))
        raise CheckpointError(
            f"{where} holds a model of another shape ({name}: {theirs.get(name)} there, {ours.get(name)} here); {advice}"
        )
