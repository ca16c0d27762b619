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

import functools
import inspect
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from syncbn.distributed import DistContext, all_reduce_sum, broadcast_buffers_from_main
from syncbn.errors import ConfigError
from syncbn.training import checkpoint, data, stopping, tracking
from syncbn.training.config import Config, FaultConfig, Member, OptimConfig, TrainConfig, members
from syncbn.training.evaluation import evaluate_every_way, member_logits
from syncbn.training.members import build_network
from syncbn.training.records import MetricsLog, log_epoch
from syncbn.training.resume import Checkpoints, Progress

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision: autocast's dtype

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


def member_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each member's cross-entropy summed over this rank's batch (which may be empty), ``[members]``.
    The members' sum is the loss to minimize: its gradient for each member's parameters is exactly
    that member's own, whatever the others' losses are (even not finite: d(sum)/d(loss_m) is 1)."""
    size = logits.size(0)
    losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(size), reduction="none")
    return losses.view(size, labels.numel()).sum(1)


def bn_group_size(member: Member, config: Config, world_size: int) -> int | None:
    """How many ranks share each BatchNorm statistic of ``member`` (per-rank BN: 1; the job's ranks,
    or its emulated ones); None for a member without BatchNorm."""
    if member.norm == "bn":
        return 1
    if member.norm != "syncbn":
        return None
    return member.bn_group or config.norm.group_size or world_size


def fault_step(fault: FaultConfig, rank: int) -> int | None:
    """The global step after which this rank is to SIGKILL itself: only on the launcher's first attempt."""
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0
    return fault.kill_at_step if first_attempt and fault.kill_rank == rank else None


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


class Training:
    """One rank's run: built from config, resumable from the run directory's checkpoint."""

    def __init__(self, config: Config, ctx: DistContext, run_dir: Path | None):
        self.config, self.ctx, self.run_dir = config, ctx, run_dir
        torch.manual_seed(config.seed)
        self.members = members(config)
        self.train_set, self.test_set = data.load(config.data)
        # Per-rank BN, or BN groups smaller than the world: the ranks' running statistics differ, and are
        # rank 0's, as DDP's broadcast of its buffers before every forward makes them (resumable exactly).
        grouped = config.norm.group_size not in (None, ctx.world_size)
        self.has_bn = any(member.norm == "bn" or (member.norm == "syncbn" and grouped) for member in self.members)
        network = build_network(config)
        if config.train.compile:
            # The network, in place, inside DDP: one graph of the whole network (DDP's optimizer splits
            # it at gradient buckets). Compiling the DDP wrapper instead would compile only the frames
            # of user code under it: an nn.Sequential's layers would run eager, each SyncBatchNorm alone.
            compile_quietly(network)
        self.model = wrap_ddp(network, ctx.device, sync_buffers=self.has_bn)
        self.dtype = next(self.model.parameters()).dtype  # train.dtype; the batches are cast to it
        self.optimizer = make_optimizer(config.optim, self.model.parameters())
        precision = config.train.precision
        self.autocast = functools.partial(torch.autocast, ctx.device.type, dtype=AUTOCAST.get(precision),
                                          enabled=precision in AUTOCAST)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16")
        self.batches = data.RankBatches(len(self.train_set), config.train.global_batch_size, ctx.world_size,
                                        ctx.rank, config.seed)
        signature = checkpoint.signature(config, ctx.world_size, self.model.module)
        self.checkpoints = Checkpoints(run_dir, ctx, signature, self.model.module, self.optimizer, self.scaler)
        resume = run_dir is not None and config.train.resume
        self.progress = self.checkpoints.resume() if resume else Progress()
        self.checkpoints.check_ranks_agree(self.progress)
        # Resumed, a run has been through its fault already: the same command, fault keys and all,
        # continues instead of killing the same rank at the same step again.
        self.kill_at_step = fault_step(config.fault, ctx.rank) if self.progress.global_step == 0 else None
        self.frozen = FrozenMembers(self.model.module, self.progress.diverged, len(self.members))
        self.stop_vote = stopping.StopVote(ctx)
        self.logs = [MetricsLog(run_dir, ctx, self.progress.history),
                     *tracking.open_logs(run_dir, ctx, config, self.progress.epoch)]

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
        self.checkpoints.save(self.progress)
        return group_totals if self.ctx.is_main else torch.zeros_like(totals)

    def train_epoch(self) -> torch.Tensor:
        """Train the rest of the current epoch (all of it, unless resumed mid-epoch); returns this
        rank's ``[loss sum per member..., samples]``."""
        progress, every = self.progress, self.config.train.checkpoint_every_steps
        self.model.train()
        totals = self._epoch_totals()
        images_all, labels_all = self.train_set.tensors
        for index in self.batches.epoch(progress.epoch)[progress.step :]:
            self.stop_vote.start()
            images = images_all[index].to(self.ctx.device, self.dtype, non_blocking=True)
            labels = labels_all[index].to(self.ctx.device, non_blocking=True)
            with self.autocast():
                loss_sums = member_loss_sums(member_logits(self.model(images)), labels)
            self.optimizer.zero_grad(set_to_none=True)
            # DDP averages the W ranks' gradients: each rank's share of the global mean, times W.
            share = self.ctx.world_size / self.batches.global_size(progress.step)
            self.scaler.scale(loss_sums.sum() * share).backward()
            self.scaler.step(self.optimizer)  # disabled (fp32, bf16): optimizer.step() itself
            self.scaler.update()
            self.frozen.restore()
            totals += torch.cat([loss_sums.detach().double(), totals.new_tensor([labels.numel()])])
            progress.step += 1
            progress.global_step += 1
            checkpointed = bool(every) and progress.global_step % every == 0
            if checkpointed:
                totals = self._checkpoint_mid_epoch(totals)
            if signum := self.stop_vote.result():  # the ranks agreed: this step's checkpoint, then stop
                if not checkpointed:
                    self._checkpoint_mid_epoch(totals)
                stopping.stop(signum, self.ctx, progress.epoch, progress.step, self.run_dir)
            if progress.global_step == self.kill_at_step:
                log.warning("fault injection: killing rank %d after step %d", self.ctx.rank, progress.global_step)
                os.kill(os.getpid(), signal.SIGKILL)
        return totals

    def evaluate(self, totals: torch.Tensor) -> list[dict]:
        if self.has_bn:  # per-rank running statistics: evaluate with rank 0's, as DDP's users do
            broadcast_buffers_from_main(self.model)
        final = self.progress.epoch == self.config.train.epochs
        return evaluate_every_way(self.model, (self.train_set, self.test_set), self.ctx, totals, self.config.train,
                                  self.dtype, final)

    def finish_epoch(self, totals: torch.Tensor, start: float) -> list[dict]:
        """The epoch's records of the members still training; a member whose loss is no longer
        finite is recorded as diverged and frozen."""
        progress = self.progress
        metrics, seconds = self.evaluate(totals), time.perf_counter() - start
        records = []
        for index, member in enumerate(self.members):
            if index in progress.diverged:
                continue
            records.append(dict(member.record(), world_size=self.ctx.world_size,
                                group_size=bn_group_size(member, self.config, self.ctx.world_size), epoch=progress.epoch,
                                **metrics[index], seconds=seconds))
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
        self.checkpoints.save(progress)
        for sink in self.logs:
            sink.append(records)
        return records

    def fit(self) -> list[dict]:
        epochs = self.config.train.epochs
        show_bar = self.ctx.is_main and sys.stderr.isatty()
        with logging_redirect_tqdm(), tqdm(total=epochs, initial=self.progress.epoch - 1, disable=not show_bar, unit="epoch") as bar:
            while self.progress.epoch <= epochs:
                start = time.perf_counter()
                records = self.finish_epoch(self.train_epoch(), start)
                if self.ctx.is_main:
                    log_epoch(records, epochs, len(self.members))
                bar.update()
        return self.progress.history


def fit(config: Config, ctx: DistContext, run_dir: Path | None = None) -> list[dict]:
    """Train ``config`` on this rank of the group (resuming from ``run_dir``'s checkpoint if any);
    returns the per-epoch metrics, the same on every rank."""
    return Training(config, ctx, run_dir).fit()


def check(config: TrainConfig) -> None:
    """Refuse ``train.compile=true`` where inductor cannot build."""
    problem = cannot_compile() if config.compile else None
    if problem:
        raise ConfigError(f"train.compile=true {problem}")
