"""Checkpoints that let a killed run continue bit-exactly: written atomically by rank 0, read by all.

A checkpoint holds the model (SyncBatchNorm's running statistics included), the optimizer, where
training stands (epoch, step within it, the epoch's partial loss sums), every RNG state and the
metrics so far. ``save`` writes a temporary file, fsyncs it, moves the previous checkpoint aside
and renames the new one into place, so a crash at any moment leaves a complete checkpoint:
``checkpoint.pt`` or, between the two renames, ``checkpoint.prev.pt``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import io
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from syncbn.training.config import Config

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
LOCK = ".lock"
RANK_LOCK = ".rank.lock"
REPLACED = "replaced"  # where a fresh start moves the run it replaces
# Not part of a run: the locks, the directory's log of every command run in it, replaced runs.
NOT_THE_RUN = (LOCK, RANK_LOCK, "train.log", REPLACED)
PARTS = ("signature", "model", "optimizer", "progress", "rng")
FORMAT = 2  # 2: per-member loss sums and diverged members (the fused sweep)


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
    """Write ``state`` as the run's latest checkpoint, keeping the one before it. A write that fails
    (a full disk, a file-size limit) names the file and takes its partial file away."""
    latest, temporary = run_dir / LATEST, run_dir / f".{LATEST}.tmp"
    # Serialized in memory first: torch.save's own writer reports a failed write without the OS's
    # reason ("unexpected pos 704 vs 598"); a plain write says "No space left on device".
    serialized = io.BytesIO()
    torch.save(state, serialized)
    try:
        with temporary.open("wb") as f:
            f.write(serialized.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write the checkpoint {temporary} ({error.strerror or error}); the last "
                              "complete one is kept") from error
    if latest.exists():
        os.replace(latest, run_dir / PREVIOUS)
    os.replace(temporary, latest)
    _fsync_dir(run_dir)
    return latest


def newest(run_dir: Path) -> Path | None:
    """``checkpoint.pt``, or ``checkpoint.prev.pt`` where a save stopped between its two renames."""
    return next((run_dir / name for name in (LATEST, PREVIOUS) if (run_dir / name).exists()), None)


def load(run_dir: Path) -> dict | None:
    """The newest complete checkpoint in ``run_dir`` (the file ``newest`` names), or None if it has none."""
    path = newest(run_dir)
    if path is None:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path} cannot be read ({reason}); move it away or pass train.resume=false") from error
    missing = [part for part in PARTS if not isinstance(state, dict) or part not in state]
    if missing:
        raise CheckpointError(f"{path} is a torch file but not a syncbn checkpoint (a {type(state).__name__} "
                              f"without {', '.join(missing)}); move it away or pass train.resume=false")
    return state


def set_aside(run_dir: Path) -> Path | None:
    """For a fresh start (``train.resume=false``) in a directory that holds a run: move that run's
    files into ``replaced/<time>/`` and return where, or None if there was nothing to move.

    The new run writes nothing before the move is done, so a kill during it leaves part of the old
    run, which a rerun continues from its latest checkpoint, refuses (metrics without a checkpoint:
    ``require_checkpoint_for``) or moves on. The previous checkpoint goes first, then the latest:
    never is the previous one left to be resumed in place of the latest."""
    order = {PREVIOUS: 0, LATEST: 1}
    found = sorted((path for path in run_dir.iterdir() if path.name not in NOT_THE_RUN),
                   key=lambda path: (order.get(path.name, 2), path.name))
    if not found:
        return None
    target = run_dir / REPLACED / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    target.mkdir(parents=True)
    for path in found:
        path.rename(target / path.name)
    _fsync_dir(run_dir)
    return target


def require_checkpoint_for(run_dir: Path) -> None:
    """Refuse to start over, silently, in a directory whose metrics have no checkpoint to continue
    from (deleted, or an earlier fresh start killed in the middle of moving the old run aside)."""
    metrics = run_dir / "metrics.jsonl"
    epochs = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    if epochs:
        raise CheckpointError(f"{run_dir} holds {epochs} line(s) of metrics.jsonl but no checkpoint to continue them "
                              f"from; train.resume=false starts over and moves them to {run_dir / REPLACED}")


# What a run may change when it continues a checkpoint: how long it trains, how often it saves,
# how patient it is, where the data and devices are, fault injection, tracking. Every other key decides what
# is trained (model, norm, optim, data, seed, batch sizes, dtype...) and must match.
MAY_CHANGE = ("train.epochs", "train.resume", "train.checkpoint_every_steps", "train.eval_batch_size", "train.compile",
              "dist.", "data.root", "data.download", "fault.", "study.max_real_ranks", "logger.")


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings(config: Config) -> dict:
    """The configuration keys that decide what is trained, flattened (``optim.lr``...)."""
    return {key: value for key, value in _flatten(asdict(config)).items() if not key.startswith(MAY_CHANGE)}


def signature(config: Config, world_size: int, model: torch.nn.Module) -> dict:
    """What a checkpoint must match to be continued: the settings, the world size, every tensor's shape."""
    return dict(
        format=FORMAT,
        world_size=world_size,
        settings=settings(config),
        shapes={name: tuple(t.shape) for name, t in model.state_dict().items()},
    )


def _differences(found: dict, expected: dict) -> list[str]:
    their_format = found.get("format", 1)  # format 1 had no key
    if their_format != expected["format"]:
        made_by = "an older" if their_format < expected["format"] else "a newer"
        return [f"checkpoint format {their_format} there ({made_by} syncbn), {expected['format']} here"]
    theirs, ours = found["settings"], expected["settings"]
    changed = [f"{key}={theirs[key]} there, {ours.get(key)} here" for key in sorted(theirs) if theirs[key] != ours.get(key)]
    if found["world_size"] != expected["world_size"]:
        changed.append(f"world size {found['world_size']} there, {expected['world_size']} here")
    if not changed and found["shapes"] != expected["shapes"]:
        name = next(n for n in sorted(set(found["shapes"]) | set(expected["shapes"]))
                    if found["shapes"].get(n) != expected["shapes"].get(n))
        changed.append(f"a model of another shape ({name}: {found['shapes'].get(name)} there, "
                       f"{expected['shapes'].get(name)} here)")
    return changed


def check_compatible(state: dict, expected: dict, run_dir: Path) -> None:
    """Refuse, naming every difference, a checkpoint this configuration would not have written."""
    changed = _differences(state["signature"], expected)
    if changed:
        raise CheckpointError(
            f"the checkpoint in {run_dir} was trained with other settings: {'; '.join(changed)}. Keep them to "
            "resume, or use another run directory (hydra.run.dir=...) or train.resume=false"
        )


def nothing_left(state: dict, epochs: int, run_dir: Path) -> str | None:
    """Why a checkpointed run has nothing more to train (diverged, or done), else None."""
    history, trained = state["progress"]["history"], state["progress"]["epoch"] - 1
    last_epoch = [record for record in history if record["epoch"] == history[-1]["epoch"]]
    if last_epoch and all(record["diverged"] for record in last_epoch):
        what = "a run that diverged" if len(last_epoch) == 1 else "a sweep whose every network diverged, the last"
        return f"{run_dir} holds {what} at epoch {history[-1]['epoch']}: nothing to train (train.resume=false starts over)"
    if trained >= epochs:
        return f"{run_dir} has trained {trained} epochs of train.epochs={epochs}: nothing to train (raise train.epochs to go on)"
    return None


def _sweep(cfg: DictConfig) -> list[str]:
    """What makes a multirun the sweep it is: its overrides and sweeper lists, less what may change
    on resume (a rerun of the same sweep with more epochs continues each of its runs)."""
    overrides = [o for o in cfg.hydra.overrides.task if not o.lstrip("+~").startswith(MAY_CHANGE)]
    params = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params) if params else {}
    return sorted([*overrides, *(f"{key}={value}" for key, value in params.items())])


class OneSweepPerDirectory(Callback):
    """Hydra callback (every multirun, conf/config.yaml): a sweep directory holds one sweep. Before
    Hydra writes ``multirun.yaml``, a directory that holds another sweep's is refused, so its
    summary and figure never mix two sweeps and its record stays the one its runs were trained with."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not str(config.hydra.sweep.dir).strip():
            _refuse("hydra.sweep.dir is empty: name a directory for the sweep, or leave the key out")
        sweep_dir = Path(config.hydra.sweep.dir)
        record = sweep_dir / "multirun.yaml"
        if not record.exists():
            return
        there, here = _sweep(OmegaConf.load(record)), _sweep(config)
        if there != here:
            only = lambda a, b: " ".join(o for o in a if o not in b) or "nothing"  # noqa: E731
            _refuse(f"{sweep_dir} holds another sweep ({only(there, here)} there, {only(here, there)} here): rerun "
                    "that sweep to resume it, or pick another hydra.sweep.dir")


def _refuse(message: str) -> NoReturn:
    """End the command from a Hydra callback, whose exceptions Hydra turns into warnings and goes on."""
    print(f"syncbn.train: error: {message}", file=sys.stderr)
    sys.exit(1)


@contextlib.contextmanager
def claim(run_dir: Path, lock: str = LOCK) -> Iterator[None]:
    """Hold ``run_dir`` for this run: a second run that asks for it while this one lives is refused.

    An exclusive ``flock`` on ``run_dir/.lock``, taken atomically and let go by the kernel when the
    process ends, however it ends; the file says which process holds it. The CPU simulation's rank 0
    writes from a process of its own and holds ``RANK_LOCK`` the same way, so a run is refused
    while a rank of an earlier one still lives, even once that rank's launcher is gone.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with _locked(run_dir, lock):
        if lock == LOCK:
            with _locked(run_dir, RANK_LOCK):
                pass
        yield


@contextlib.contextmanager
def _locked(run_dir: Path, name: str) -> Iterator[None]:
    with open(run_dir / name, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise CheckpointError(f"{run_dir} belongs to a run still going ({holder}); wait for it or pick another "
                                  "hydra.run.dir") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        yield
