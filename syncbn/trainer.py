"""The training loop on one rank: DDP over the group, seeded global batches, metrics per epoch,
checkpoints to resume from.

Every rank runs ``fit``; only rank 0 writes (``metrics.jsonl``, checkpoints) and logs. The global
batch of each step is the same set of samples whatever the world size (``data.RankBatches``: the
W local batches of step k together are positions [k B, (k + 1) B) of one seeded permutation, every
sample once per epoch, no padding), and each rank's loss is its share of the global batch's mean,
so DDP's average of the ranks' gradients is the gradient of that mean, even where the local
batches differ in size. With SyncBatchNorm, N ranks therefore train like one process.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from syncbn import checkpoint, data
from syncbn.config import Config, FaultConfig, OptimConfig, members
from syncbn.distributed import DistContext, all_reduce_sum, broadcast_buffers_from_main, gather_rows
from syncbn.models import build_network

log = logging.getLogger(__name__)

# torch 2.14 renamed DDP's broadcast_buffers to forward_sync_buffers (the old name warns).
_SYNC_BUFFERS = next(
    name for name in ("forward_sync_buffers", "broadcast_buffers")
    if name in inspect.signature(DistributedDataParallel).parameters
)


def make_optimizer(config: OptimConfig, params) -> torch.optim.Optimizer:
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def wrap_ddp(model: nn.Module, device: torch.device, sync_buffers: bool) -> DistributedDataParallel:
    """``sync_buffers`` for plain per-rank BN: DDP's default rank-0 broadcast of the buffers, which is
    what users of unsynchronized BN get. SyncBatchNorm's running statistics are equal on every rank
    already, and broadcasting them would cost one collective per step for nothing."""
    return DistributedDataParallel(
        model.to(device),
        device_ids=[device] if device.type == "cuda" else None,
        **{_SYNC_BUFFERS: sync_buffers},
    )


def cannot_compile() -> str | None:
    """Why torch.compile's inductor cannot build on this CPU process, or None if it can."""
    if not any(map(shutil.which, ("c++", "g++", "clang++"))):
        return "needs a C++ compiler for torch.compile's inductor (c++, g++ or clang++ on PATH): none found"
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability == "default":
        return ("cannot build with ATEN_CPU_CAPABILITY=default: inductor's C++ uses ATen's vector code, which that "
                "level leaves out")
    if capability:  # measured: avx2 on this AVX-512 machine, a compiled float64 run's loss went non-finite
        return (f"is not reliable with ATEN_CPU_CAPABILITY={capability}: inductor's C++ does not follow it "
                "(unset it to compile)")
    return None


def compile_quietly(module: nn.Module, **options) -> nn.Module:
    """``module.compile(**options)``: torch.compile in place (the same module, ``state_dict`` keys and
    all), without two warnings every rank would print that ask nothing of the user: dynamo skipping
    DDP's profiler label, and inductor's note that a CPU machine has no CUDA."""
    for name in ("torch._dynamo.variables.ctx_manager", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    module.compile(**options)
    return module


def member_logits(output: torch.Tensor) -> torch.Tensor:
    """Logits as ``[members, B, classes]``: a single run's network is a job of one member."""
    return output if output.dim() == 3 else output.unsqueeze(0)


def member_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each member's cross-entropy summed over this rank's batch (which may be empty), ``[members]``.
    The members' sum is the loss to minimize: its gradient for each member's parameters is exactly
    that member's own, whatever the others' losses are (even not finite: d(sum)/d(loss_m) is 1)."""
    size = logits.size(0)
    losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(size), reduction="none")
    return losses.view(size, labels.numel()).sum(1)


@torch.no_grad()
def count_correct(model: nn.Module, dataset: TensorDataset, ctx: DistContext, batch_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """``[correct per member..., seen]`` on this rank's shard (every W-th sample) of ``dataset``, in eval mode."""
    model.eval()
    images, labels = (t[ctx.rank :: ctx.world_size] for t in dataset.tensors)
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = images[start : start + batch_size].to(ctx.device, dtype)
        predicted = member_logits(model(batch)).argmax(dim=-1)
        correct = correct + (predicted == labels[start : start + batch_size].to(ctx.device)).sum(dim=1)
    correct = torch.as_tensor(correct, dtype=torch.float64, device=ctx.device)
    return torch.cat([correct.reshape(-1), correct.new_tensor([len(labels)])])


def weights_digest(model: nn.Module) -> int:
    """48 bits of a SHA-256 of every parameter and buffer's bytes: equal on two ranks exactly when
    their states are (whatever the CPU; float sums could round differently), exact in a float64."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:6], "big")


def fault_step(fault: FaultConfig, rank: int) -> int | None:
    """The global step after which this rank is to SIGKILL itself: only on the launcher's first attempt."""
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0
    return fault.kill_at_step if first_attempt and fault.kill_rank == rank else None


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


class FrozenMembers:
    """Members that diverged, held as they were when they stopped: their rows of every parameter and
    running statistic are put back after each step, so neither the optimizer (momentum, Adam's
    moments, weight decay) nor their own non-finite gradients change them, as a run that diverged
    trains no further. Their values never reach another member: every operation that mixes values
    (the batched matmuls, each channel's statistics, DDP's all-reduce, elementwise optimizers) keeps
    members apart."""

    def __init__(self, model: nn.Module, frozen: list[int], size: int):
        self.saved = []
        if not frozen or len(frozen) == size:  # none, or all: training stops
            return
        for tensor, rows in model.member_tensors():
            local = [index for index, member in enumerate(rows) if member in frozen]
            if local:
                index = torch.tensor(local, device=tensor.device)
                self.saved.append((tensor, index, tensor.detach().index_select(0, index)))

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, index, values in self.saved:
            tensor.index_copy_(0, index, values)


class MetricsLog:
    """``metrics.jsonl`` in the run directory: one JSON object per epoch, written by rank 0 only."""

    def __init__(self, run_dir: Path | None, ctx: DistContext, history: list[dict]):
        self.path = run_dir / "metrics.jsonl" if run_dir is not None and ctx.is_main else None
        if self.path is not None:
            self.path.write_text("".join(json.dumps(record) + "\n" for record in history))

    def append(self, records: list[dict]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))


class Training:
    """One rank's run: built from config, resumable from the run directory's checkpoint."""

    def __init__(self, config: Config, ctx: DistContext, run_dir: Path | None):
        self.config, self.ctx, self.run_dir = config, ctx, run_dir
        torch.manual_seed(config.seed)
        self.members = members(config)
        self.train_set, self.test_set = data.load(config.data)
        sync_buffers = any(member.norm == "bn" for member in self.members)
        network = build_network(config)
        if config.train.compile:
            # The network, in place, inside DDP: one graph of the whole network (DDP's optimizer splits
            # it at gradient buckets). Compiling the DDP wrapper instead would compile only the frames
            # of user code under it: an nn.Sequential's layers would run eager, each SyncBatchNorm alone.
            compile_quietly(network)
        self.model = wrap_ddp(network, ctx.device, sync_buffers)
        self.dtype = next(self.model.parameters()).dtype  # train.dtype; the batches are cast to it
        self.optimizer = make_optimizer(config.optim, self.model.parameters())
        self.batches = data.RankBatches(len(self.train_set), config.train.global_batch_size, ctx.world_size,
                                        ctx.rank, config.seed)
        self.signature = checkpoint.signature(config, ctx.world_size, self.model.module)
        self.progress = Progress()
        if run_dir is not None and config.train.resume:
            self._resume()
        self._check_ranks_agree()
        # Resumed, a run has been through its fault already: the same command, fault keys and all,
        # continues instead of killing the same rank at the same step again.
        self.kill_at_step = fault_step(config.fault, ctx.rank) if self.progress.global_step == 0 else None
        self.frozen = FrozenMembers(self.model.module, self.progress.diverged, len(self.members))
        self.metrics = MetricsLog(run_dir, ctx, self.progress.history)

    def _resume(self) -> None:
        state = checkpoint.load(self.run_dir)
        if state is None:
            return
        checkpoint.check_compatible(state, self.signature, self.run_dir)
        self.model.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        checkpoint.restore_rng_states(state["rng"])
        if self.ctx.is_main:
            log.info("resumed from %s: epoch %d, step %d", checkpoint.newest(self.run_dir), self.progress.epoch, self.progress.step)

    def _check_ranks_agree(self) -> None:
        """Every rank must start where the others do. A run directory that each node reads on its
        own (no shared filesystem) can hand ranks different checkpoints, or none: one collective
        compares where each stands and a digest of its weights, and all stop with the same error."""
        if self.ctx.world_size == 1:
            return
        progress = self.progress
        mine = torch.tensor([progress.epoch, progress.step, weights_digest(self.model.module)], dtype=torch.float64,
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

    def save_checkpoint(self) -> None:
        if self.run_dir is None or not self.ctx.is_main:
            return
        checkpoint.save(self.run_dir, dict(
            signature=self.signature,
            model=self.model.module.state_dict(),
            optimizer=self.optimizer.state_dict(),
            progress=asdict(self.progress),
            rng=checkpoint.rng_states(),
        ))

    def _epoch_totals(self) -> torch.Tensor:
        """This rank's ``[loss sum per member..., samples]`` at the start of (what is left of) the
        epoch: the group's partial sums from a mid-epoch checkpoint sit on rank 0, so the epoch's
        all-reduce counts them once."""
        progress, size = self.progress, len(self.members)
        start = torch.zeros(size + 1, dtype=torch.float64, device=self.ctx.device)
        if self.ctx.is_main and progress.loss_sums is not None:
            start.copy_(torch.tensor([*progress.loss_sums, progress.samples], dtype=torch.float64))
        return start

    def _checkpoint_mid_epoch(self, totals: torch.Tensor) -> torch.Tensor:
        group_totals = all_reduce_sum(totals.clone())
        self.progress.loss_sums, self.progress.samples = group_totals[:-1].tolist(), int(group_totals[-1].item())
        self.save_checkpoint()
        return group_totals if self.ctx.is_main else torch.zeros_like(totals)

    def train_epoch(self) -> torch.Tensor:
        """Train the rest of the current epoch (all of it, unless resumed mid-epoch); returns this
        rank's ``[loss sum, samples]``."""
        progress, every = self.progress, self.config.train.checkpoint_every_steps
        self.model.train()
        totals = self._epoch_totals()
        images_all, labels_all = self.train_set.tensors
        for index in self.batches.epoch(progress.epoch)[progress.step :]:
            images = images_all[index].to(self.ctx.device, self.dtype, non_blocking=True)
            labels = labels_all[index].to(self.ctx.device, non_blocking=True)
            loss_sums = member_loss_sums(member_logits(self.model(images)), labels)
            self.optimizer.zero_grad(set_to_none=True)
            # DDP averages the W ranks' gradients: each rank's share of the global mean, times W.
            share = self.ctx.world_size / self.batches.global_size(progress.step)
            (loss_sums.sum() * share).backward()
            self.optimizer.step()
            self.frozen.restore()
            totals += torch.cat([loss_sums.detach().double(), totals.new_tensor([labels.numel()])])
            progress.step += 1
            progress.global_step += 1
            if every and progress.global_step % every == 0:
                totals = self._checkpoint_mid_epoch(totals)
            if progress.global_step == self.kill_at_step:
                log.warning("fault injection: killing rank %d after step %d", self.ctx.rank, progress.global_step)
                os.kill(os.getpid(), signal.SIGKILL)
        return totals

    def evaluate(self, totals: torch.Tensor) -> list[dict]:
        """Each member's whole-set metrics from every rank's shard and loss sums: one all-reduce."""
        if any(member.norm == "bn" for member in self.members):
            broadcast_buffers_from_main(self.model)
        batch, size = self.config.train.eval_batch_size, len(self.members)
        local = torch.cat([
            totals,
            count_correct(self.model, self.train_set, self.ctx, batch, self.dtype),
            count_correct(self.model, self.test_set, self.ctx, batch, self.dtype),
        ])
        loss_sums, samples, train_correct, train_seen, test_correct, test_seen = all_reduce_sum(local).split(
            [size, 1, size, 1, size, 1])
        metrics = []
        for member in range(size):
            loss = loss_sums[member].item() / samples.item()
            metrics.append(dict(
                train_acc=(train_correct[member] / train_seen).item(),
                test_acc=(test_correct[member] / test_seen).item(),
                train_loss=loss if math.isfinite(loss) else None,
                diverged=not math.isfinite(loss),
            ))
        return metrics

    def finish_epoch(self, totals: torch.Tensor, start: float) -> list[dict]:
        """The epoch's records of the members still training; a member whose loss is no longer
        finite is recorded as diverged and frozen."""
        progress = self.progress
        metrics, seconds = self.evaluate(totals), time.perf_counter() - start
        records = []
        for index, member in enumerate(self.members):
            if index in progress.diverged:
                continue
            records.append(dict(norm=member.norm, weight_scale=member.weight_scale, seed=member.seed,
                                world_size=self.ctx.world_size, epoch=progress.epoch, **metrics[index], seconds=seconds))
            if metrics[index]["diverged"]:
                progress.diverged.append(index)
        progress.history += records
        if any(record["diverged"] for record in records):
            self.frozen = FrozenMembers(self.model.module, progress.diverged, len(self.members))
        # When every member has diverged there is nothing more to learn: mark the run finished, so a
        # resume does not retrain it.
        finished = len(progress.diverged) == len(self.members)
        progress.epoch = self.config.train.epochs + 1 if finished else progress.epoch + 1
        progress.step, progress.loss_sums, progress.samples = 0, None, 0
        # The checkpoint first: killed between the two, the resumed run rewrites metrics.jsonl from
        # the checkpoint's history; the other way round, metrics would outlive their checkpoint.
        self.save_checkpoint()
        self.metrics.append(records)
        return records

    def log_epoch(self, records: list[dict]) -> None:
        if not self.ctx.is_main:
            return
        epoch, epochs = records[0]["epoch"], self.config.train.epochs
        if len(self.members) > 1:
            log.info(epoch_summary(records, epochs))
        elif records[0]["diverged"]:
            log.warning("epoch %d: the training loss is not finite; the run diverged and stops here", epoch)
        else:
            record = records[0]
            log.info("epoch %d/%d  train_acc %.4f  test_acc %.4f  train_loss %.4f  (%.2fs)", epoch, epochs,
                     record["train_acc"], record["test_acc"], record["train_loss"], record["seconds"])

    def fit(self) -> list[dict]:
        epochs = self.config.train.epochs
        show_bar = self.ctx.is_main and sys.stderr.isatty()
        with logging_redirect_tqdm(), tqdm(total=epochs, initial=self.progress.epoch - 1, disable=not show_bar, unit="epoch") as bar:
            while self.progress.epoch <= epochs:
                start = time.perf_counter()
                self.log_epoch(self.finish_epoch(self.train_epoch(), start))
                bar.update()
        return self.progress.history


def epoch_summary(records: list[dict], epochs: int) -> str:
    """One line for an epoch of many members: accuracy ranges, and who diverged."""
    training = [r for r in records if not r["diverged"]]
    line = f"epoch {records[0]['epoch']}/{epochs}  {len(records)} networks"
    for key in ("train_acc", "test_acc"):
        values = sorted(r[key] for r in training)
        if values:
            line += f"  {key} {values[0]:.3f}-{values[-1]:.3f} (median {values[len(values) // 2]:.3f})"
    diverged = [f"{r['norm']} scale {r['weight_scale']:.3g} seed {r['seed']}" for r in records if r["diverged"]]
    if diverged:
        line += f"  diverged, frozen: {', '.join(diverged)}"
    return line + f"  ({records[0]['seconds']:.2f}s)"


def fit(config: Config, ctx: DistContext, run_dir: Path | None = None) -> list[dict]:
    """Train ``config`` on this rank of the group (resuming from ``run_dir``'s checkpoint if any);
    returns the per-epoch metrics, the same on every rank."""
    return Training(config, ctx, run_dir).fit()
