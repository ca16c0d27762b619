"""Whole-set metrics of every member, from each rank's shard: one all-reduce per epoch; and the two
other ways to evaluate a BatchNorm network: with PreciseBN's population statistics, and with batch
statistics as in training."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import TensorDataset

from syncbn.distributed import DistContext, all_reduce_sum
from syncbn.precise import precise_bn
from syncbn.training.config import TrainConfig


def member_logits(output: torch.Tensor) -> torch.Tensor:
    """Logits as ``[members, B, classes]``: a single run's network is a job of one member."""
    return output if output.dim() == 3 else output.unsqueeze(0)


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


def evaluate(model: nn.Module, datasets: tuple[TensorDataset, TensorDataset], ctx: DistContext,
             totals: torch.Tensor, batch_size: int, dtype: torch.dtype) -> list[dict]:
    """Each member's accuracy on the training and test sets and its training loss over the epoch
    (from this rank's ``totals``, ``[loss sum per member..., samples]``): one all-reduce."""
    size = len(totals) - 1
    local = torch.cat([totals, *(count_correct(model, dataset, ctx, batch_size, dtype) for dataset in datasets)])
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


@contextlib.contextmanager
def running_statistics_kept(network: nn.Module) -> Iterator[None]:
    """Every BatchNorm buffer (running statistics, batch count) put back as it was on leaving."""
    buffers = [buffer for module in network.modules() if isinstance(module, _BatchNorm)
               for buffer in module.buffers(recurse=False)]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)


@contextlib.contextmanager
def batch_statistics(network: nn.Module) -> Iterator[None]:
    """The BatchNorm layers in train mode (each batch normalized by its own statistics, as in training:
    synchronized over the same group, per rank, per slice), everything else in eval mode (no dropout);
    the modes and the running statistics as they were on leaving."""
    modes = {module: module.training for module in network.modules()}
    network.eval()
    for module in network.modules():
        if isinstance(module, _BatchNorm):
            module.train()
    try:
        with running_statistics_kept(network):
            yield
    finally:
        for module, training in modes.items():
            module.training = training


@torch.no_grad()
def batch_statistics_accuracy(network: nn.Module, dataset: TensorDataset, ctx: DistContext, global_batch: int,
                              dtype: torch.dtype) -> list[float]:
    """Each member's accuracy on ``dataset`` normalized by batch statistics at the training batch
    size: its whole batches of ``global_batch`` samples, each rank holding its share as in training
    (positions r, r + W, ...; ``data.RankBatches``), so every BatchNorm normalizes over the span it
    trained on. A ragged last batch is left out: it would be normalized over another span."""
    images, labels = dataset.tensors
    correct: torch.Tensor | int = 0
    with batch_statistics(network):
        for start in range(0, len(labels) // global_batch * global_batch, global_batch):
            mine = slice(start + ctx.rank, start + global_batch, ctx.world_size)
            predicted = member_logits(network(images[mine].to(ctx.device, dtype))).argmax(dim=-1)
            correct = correct + (predicted == labels[mine].to(ctx.device)).sum(dim=1)
    correct = torch.as_tensor(correct, dtype=torch.float64, device=ctx.device).reshape(-1)
    seen = len(labels) // global_batch * global_batch
    return (all_reduce_sum(correct) / seen).tolist()


class Shard:
    """This rank's shard of a dataset's inputs (every W-th sample), in batches on the device: iterable
    again for each pass ``syncbn.precise_bn`` makes."""

    def __init__(self, dataset: TensorDataset, ctx: DistContext, batch_size: int, dtype: torch.dtype):
        self.images = dataset.tensors[0][ctx.rank :: ctx.world_size]
        self.ctx, self.batch_size, self.dtype = ctx, batch_size, dtype

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.images), self.batch_size):
            yield self.images[start : start + self.batch_size].to(self.ctx.device, self.dtype)


def evaluate_every_way(model: nn.Module, datasets: tuple[TensorDataset, TensorDataset], ctx: DistContext,
                       totals: torch.Tensor, train: TrainConfig, dtype: torch.dtype, final: bool) -> list[dict]:
    """Each member's metrics (``evaluate``), and where ``train`` asks, its test accuracy on batch
    statistics and its accuracies on PreciseBN statistics (every epoch, or after the ``final`` one)."""
    metrics = evaluate(model, datasets, ctx, totals, train.eval_batch_size, dtype)
    if train.batch_stats_eval:
        accuracies = batch_statistics_accuracy(model.module, datasets[1], ctx, train.global_batch_size, dtype)
        for entry, accuracy in zip(metrics, accuracies):
            entry["batch_test_acc"] = accuracy
    if train.precise_bn == "every_epoch" or (train.precise_bn == "final" and final):
        # Training goes on from the running statistics (a longer run resumed from this one's end too).
        with running_statistics_kept(model.module):
            # Its hooks stop each pass midway: no graph for a compiled network to compile.
            with torch.compiler.set_stance("force_eager"):
                precise_bn(model.module, Shard(datasets[0], ctx, train.eval_batch_size, dtype))
            for entry, precise in zip(metrics, evaluate(model, datasets, ctx, totals, train.eval_batch_size, dtype)):
                entry.update(precise_train_acc=precise["train_acc"], precise_test_acc=precise["test_acc"])
    return metrics
