"""Where training stands, saved and restored: the resume policy of a run directory.

A run resumes from its directory's newest checkpoint when ``train.resume`` is true and the
checkpoint was written by the same configuration (``checkpoint.check_compatible``); every rank
must then stand at the same place, which one collective checks before the first step.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from syncbn.distributed import DistContext, gather_rows
from syncbn.training import checkpoint
from syncbn.training.config import Config
from syncbn.training.members import build_network

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands; every checkpoint holds it."""

    epoch: int = 1
    step: int = 0
    global_step: int = 0
    loss_sums: list[float] | None = None  # per member, the epoch's so far (None: none yet)
    samples: int = 0
    diverged: list[int] = field(default_factory=list)  # members whose loss stopped being finite
    history: list[dict] = field(default_factory=list)


def weights_digest(model: nn.Module) -> int:
    """48 bits of a SHA-256 of every parameter and buffer's bytes: equal on two ranks exactly when
    their states are (whatever the CPU; float sums could round differently), exact in a float64."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:6], "big")


def nothing_to_resume(config: Config, world_size: int, run_dir: Path) -> str | None:
    """Check the checkpoint this run would resume from; returns why there is nothing to train, if so."""
    if not config.train.resume:
        return None
    state = checkpoint.load(run_dir)
    if state is None:
        checkpoint.require_checkpoint_for(run_dir)
        return None
    checkpoint.check_compatible(state, checkpoint.signature(config, world_size, build_network(config)), run_dir)
    return checkpoint.nothing_left(state, config.train.epochs, run_dir)


class Checkpoints:
    """One rank's view of the run directory's checkpoints: what it resumes from, and what it saves
    (rank 0 only; ``run_dir`` None: a run that keeps nothing)."""

    def __init__(self, run_dir: Path | None, ctx: DistContext, signature: dict, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
        self.run_dir, self.ctx, self.signature, self.model, self.optimizer = run_dir, ctx, signature, model, optimizer
        self.scaler = scaler

    def resume(self) -> Progress:
        """The progress of the newest checkpoint, with the model, optimizer and RNG states it holds
        restored; a fresh ``Progress`` where there is none."""
        state = checkpoint.load(self.run_dir)
        if state is None:
            return Progress()
        checkpoint.check_compatible(state, self.signature, self.run_dir)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # fp16's loss scale and its growth count; empty where the scaler is off
            self.scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        checkpoint.restore_rng_states(state["rng"])
        if self.ctx.is_main:
            log.info("resumed from %s: epoch %d, step %d", checkpoint.newest(self.run_dir), progress.epoch, progress.step)
        return progress

    def check_ranks_agree(self, progress: Progress) -> None:
        """Every rank must start where the others do. A run directory that each node reads on its
        own (no shared filesystem) can hand ranks different checkpoints, or none: one collective
        compares where each stands and a digest of its weights, and all stop with the same error."""
        if self.ctx.world_size == 1:
            return
        mine = torch.tensor([progress.epoch, progress.step, weights_digest(self.model)], dtype=torch.float64,
                            device=self.ctx.device)
        ranks = gather_rows(mine).cpu()
        if torch.equal(ranks, ranks[:1].expand_as(ranks)):
            return
        where = ", ".join(f"rank {r} at epoch {int(row[0])}, step {int(row[1])}" for r, row in enumerate(ranks))
        if torch.equal(ranks[:, :2], ranks[:1, :2].expand(len(ranks), 2)):
            where += ", with different weights"
        raise checkpoint.CheckpointError(
            f"the ranks did not resume the same state ({where}): every node must see the same run directory "
            "(hydra.run.dir on a shared filesystem)"
        )

    def save(self, progress: Progress) -> None:
        if self.run_dir is None or not self.ctx.is_main:
            return
        checkpoint.save(self.run_dir, dict(
            signature=self.signature,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            progress=asdict(progress),
            rng=checkpoint.rng_states(),
        ))
