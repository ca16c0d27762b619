"""Whole-set metrics of every member, from each rank's shard: one all-reduce per epoch."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from syncbn.distributed import DistContext, all_reduce_sum


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
