"""The least a synchronized BatchNorm can be on CPU, for the benchmark to time beside the layer.

Not a layer to use: it normalizes with the first rank's statistics and drops the second rank's
sums, keeps no running statistics, checks nothing. What it keeps is the shape every synchronized
BatchNorm has, with the fewest ATen calls: the local statistics before the forward's all-gather and
the normalization after it (they need the gathered statistics); the local sums before the
backward's all-gather and the input gradient after it. Local BN instead computes and normalizes in
one kernel each way, and ATen has no fused CPU kernels for the split (``batch_norm_stats``,
``batch_norm_elemt`` and their kin are CUDA-only). Whatever this costs over "local BN with the two
all-gathers" no synchronized layer built from ATen's CPU kernels can avoid.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from syncbn.comm import start_all_gather

_EPS = 1e-5


class _Minimum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group):
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        mean, var = start_all_gather(torch.cat([mean, var]), group, "minimum forward")()[0].view(2, -1)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.group = group
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, _EPS, False)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, var = ctx.saved_tensors
        _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, None, mean, var, None, None, False, _EPS, [False, True, True])
        start_all_gather(torch.cat([grad_bias, grad_weight]), ctx.group, "minimum backward")()
        grad_input = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, mean, var, None, None, False, _EPS, [True, False, False])[0]
        return grad_input, grad_weight, grad_bias, None


class MinimumSyncBatchNorm(nn.Module):
    def __init__(self, channels: int, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, device=device))
        self.bias = nn.Parameter(torch.zeros(channels, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Minimum.apply(x, self.weight, self.bias, dist.group.WORLD)
