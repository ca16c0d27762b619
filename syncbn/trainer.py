"""The training loop on one rank: DDP over the group, a seeded DistributedSampler, metrics per epoch.

Every rank runs ``fit``; only rank 0 writes ``metrics.jsonl`` and logs. The global batch of each
step is the same set of samples whatever the world size: DistributedSampler deals rank r the
positions r, r + W, r + 2W, ... of one seeded permutation, so the W local batches of step k together
are positions [k B, (k + 1) B) of it. With SyncBatchNorm, N ranks therefore train like one process.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from syncbn import data
from syncbn.config import Config, OptimConfig
from syncbn.distributed import DistContext, all_reduce_sum, broadcast_buffers_from_main
from syncbn.models import build_model

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


def wrap_ddp(model: nn.Module, config: Config, ctx: DistContext) -> DistributedDataParallel:
    # SyncBatchNorm's running statistics are equal on every rank already; plain BN keeps DDP's
    # default rank-0 broadcast, which is what users of unsynchronized BN get.
    return DistributedDataParallel(
        model.to(ctx.device),
        device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
        **{_SYNC_BUFFERS: config.norm.name == "bn"},
    )


def train_epoch(model, loader, optimizer, device) -> torch.Tensor:
    """One pass over this rank's shard; returns ``[sum of sample losses, samples]`` (float64)."""
    model.train()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals += torch.stack([loss.detach().double() * labels.numel(), totals.new_tensor(labels.numel())])
    return totals


@torch.no_grad()
def count_correct(model: nn.Module, dataset: TensorDataset, ctx: DistContext, batch_size: int) -> torch.Tensor:
    """``[correct, seen]`` on this rank's shard (every W-th sample) of ``dataset``, in eval mode."""
    model.eval()
    images, labels = (t[ctx.rank :: ctx.world_size] for t in dataset.tensors)
    correct = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for start in range(0, len(labels), batch_size):
        batch = images[start : start + batch_size].to(ctx.device)
        predicted = model(batch).argmax(dim=1)
        correct += (predicted == labels[start : start + batch_size].to(ctx.device)).sum()
    return torch.stack([correct, correct.new_tensor(len(labels))])


def epoch_metrics(model, config: Config, ctx: DistContext, train_totals, train_set, test_set) -> dict:
    """Whole-set metrics from every rank's shard: one all-reduce."""
    if config.norm.name == "bn":
        broadcast_buffers_from_main(model)
    batch = config.train.eval_batch_size
    local = torch.cat([train_totals, count_correct(model, train_set, ctx, batch), count_correct(model, test_set, ctx, batch)])
    loss_sum, samples, train_correct, train_seen, test_correct, test_seen = all_reduce_sum(local).tolist()
    return dict(train_acc=train_correct / train_seen, test_acc=test_correct / test_seen, train_loss=loss_sum / samples)


class MetricsLog:
    """``metrics.jsonl`` in the run directory: one JSON object per epoch, written by rank 0 only."""

    def __init__(self, run_dir: Path | None, ctx: DistContext):
        self.path = run_dir / "metrics.jsonl" if run_dir is not None and ctx.is_main else None
        if self.path is not None:
            self.path.write_text("")

    def append(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def fit(config: Config, ctx: DistContext, run_dir: Path | None = None) -> list[dict]:
    """Train ``config`` on this rank of the group; returns the per-epoch metrics (the same on every rank)."""
    torch.manual_seed(config.seed)
    train_set, test_set = data.load(config.data)
    model = wrap_ddp(build_model(config.model, config.norm), config, ctx)
    optimizer = make_optimizer(config.optim, model.parameters())
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed)
    loader = DataLoader(train_set, batch_size=config.train.global_batch_size // ctx.world_size, sampler=sampler)
    metrics = MetricsLog(run_dir, ctx)
    run = dict(norm=config.norm.name, weight_scale=config.model.weight_scale, world_size=ctx.world_size)
    history = []
    show_bar = ctx.is_main and sys.stderr.isatty()
    with logging_redirect_tqdm(), tqdm(total=config.train.epochs, disable=not show_bar, unit="epoch") as bar:
        for epoch in range(1, config.train.epochs + 1):
            start = time.perf_counter()
            sampler.set_epoch(epoch)
            totals = train_epoch(model, loader, optimizer, ctx.device)
            record = dict(run, epoch=epoch, **epoch_metrics(model, config, ctx, totals, train_set, test_set))
            record["seconds"] = time.perf_counter() - start
            history.append(record)
            metrics.append(record)
            if ctx.is_main:
                log.info(
                    "epoch %d/%d  train_acc %.4f  test_acc %.4f  train_loss %.4f  (%.2fs)",
                    epoch, config.train.epochs, record["train_acc"], record["test_acc"], record["train_loss"], record["seconds"],
                )
            bar.update()
    return history
