"""A job of many networks as one model, each member starting from exactly the weights its
standalone network (``models.py``) draws: ``MemberMLP`` (batched matmuls) and ``MemberCNN``
(grouped convolutions); ``build_network`` builds what a job trains.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from syncbn.training.config import Config, Member, ModelConfig, NormConfig, is_sweep, members
from syncbn.training.fused import FusedMembers, block_norm
from syncbn.training.models import CLASSES, CNN_SIDES, IMAGE_FEATURES, build_model, make_cnn, make_mlp


class MemberNorm(nn.Module):
    """One hidden layer's norm for ``count`` members that share it, on activations ``[count, B, C]``.

    syncbn / bn: one BatchNorm over ``count x C`` channels, so each member's channels are normalized
    on their own and SyncBatchNorm's one all-gather each way carries every member's statistics.
    layernorm / groupnorm: each sample's C values (in groups) of each member, with its own affine.
    """

    def __init__(self, norm: NormConfig, count: int, width: int, bn_slice: int | None = None,
                 bn_group: int | None = None) -> None:
        super().__init__()
        self.name, self.count, self.width = norm.name, count, width
        self.groups = {"layernorm": 1, "groupnorm": norm.num_groups}.get(norm.name)
        self.eps = norm.eps
        if self.groups:
            self.weight = nn.Parameter(torch.ones(count, 1, width))
            self.bias = nn.Parameter(torch.zeros(count, 1, width))
        else:
            self.batch_norm = block_norm(norm, count, width, False, bn_slice, bn_group)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        count, batch, width = h.shape
        if self.groups:
            grouped = h.reshape(count, batch, self.groups, width // self.groups)
            normalized = F.layer_norm(grouped, grouped.shape[-1:], eps=self.eps).view_as(h)
            return torch.addcmul(self.bias, normalized, self.weight)
        channels = h.transpose(0, 1).reshape(batch, count * width)
        return self.batch_norm(channels).view(batch, count, width).transpose(0, 1)


class MemberMLP(FusedMembers):
    """Every member of a job as one MLP: each Linear a batched matmul over members (weights
    ``[M, in, out]``, ``torch.baddbmm``), the members of each block sharing one ``MemberNorm`` per
    layer. The output is ``[M, B, 10]``: every member sees the same batch."""

    def __init__(self, members: list[Member], model: ModelConfig, norm: NormConfig) -> None:
        super().__init__(members, model, norm, make_mlp)
        widths = [IMAGE_FEATURES, *model.hidden, CLASSES]
        size = len(self.members)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(size, i, o)) for i, o in itertools.pairwise(widths))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(size, 1, o)) for o in widths[1:])
        self.norms = nn.ModuleList(
            nn.ModuleList(MemberNorm(replace(norm, name=name), stop - start, width, bn_slice, bn_group)
                          for name, bn_slice, bn_group, start, stop in self.blocks)
            for width in model.hidden
        )
        self.dropout = model.dropout
        self.draw_members()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        h = torch.baddbmm(self.biases[0], x.expand(len(self.members), *x.shape), self.weights[0])
        for layer in range(len(self.norms)):
            h = F.relu(self.normalize(layer, h, dim=0))
            if self.dropout:
                h = F.dropout(h, self.dropout, self.training)
            h = torch.baddbmm(self.biases[layer + 1], h, self.weights[layer + 1])
        return h

    def member_tensors(self) -> list[tuple[torch.Tensor, range]]:
        everyone, tensors = range(len(self.members)), []
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            tensors += [(weight.transpose(1, 2), everyone), (bias.squeeze(1), everyone)]  # as nn.Linear's [out, in]
            if layer < len(self.norms):
                tensors += self.norm_rows(self.norms[layer])
        return tensors


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``; where no gradient is needed (evaluation) and the sides are even, as
    two elementwise maxima, the same values (a maximum is exact, NaN propagates) 10x faster here
    than ATen's CPU kernel, which also writes the indices that only a backward needs."""
    if (torch.is_grad_enabled() and x.requires_grad) or x.size(-1) % 2 or x.size(-2) % 2:
        return F.max_pool2d(x, 2)
    window = x.unflatten(-1, (-1, 2)).unflatten(-3, (-1, 2))  # [..., H / 2, 2, W / 2, 2]
    rows = torch.maximum(window.select(-3, 0), window.select(-3, 1))
    return torch.maximum(rows.select(-1, 0), rows.select(-1, 1))


class MemberCNN(FusedMembers):
    """Every member of a job as one CNN, members side by side along the channels (``[B, M x C, H, W]``):
    each convolution one grouped convolution (``groups=M``; the first, whose input every member
    shares, a convolution of the image to all ``M x C`` channels), a block's norm one module over its
    members' channels (``fused.block_norm``), ReLU and max-pool as they are, the classifier a
    batched matmul. The output is ``[M, B, 10]``."""

    def __init__(self, members: list[Member], model: ModelConfig, norm: NormConfig) -> None:
        super().__init__(members, model, norm, make_cnn)
        size, widths = len(self.members), [1, *model.hidden]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in * (size if layer else 1), c_out * size, 3, padding=1, groups=size if layer else 1)
            for layer, (c_in, c_out) in enumerate(itertools.pairwise(widths))
        )
        self.norms = nn.ModuleList(
            nn.ModuleList(block_norm(replace(norm, name=name), stop - start, width, True, bn_slice, bn_group)
                          for name, bn_slice, bn_group, start, stop in self.blocks)
            for width in model.hidden
        )
        side = CNN_SIDES[len(model.hidden) - 1] // 2
        self.weight = nn.Parameter(torch.empty(size, widths[-1] * side * side, CLASSES))
        self.bias = nn.Parameter(torch.empty(size, 1, CLASSES))
        self.dropout = model.dropout
        self.draw_members()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images
        for layer, conv in enumerate(self.convs):
            h = F.relu(max_pool2x2(self.normalize(layer, self.convolve(conv, h), dim=1)))  # = pool(relu(.)), on 1/4 the values
            if self.dropout:
                h = F.dropout(h, self.dropout, self.training)
        features = h.reshape(h.size(0), len(self.members), -1).transpose(0, 1)
        return torch.baddbmm(self.bias, features, self.weight)

    @staticmethod
    def convolve(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        """``conv(h)``, by the kernels fastest on CPU for these shapes (3-4x oneDNN's default ones
        here, docs/performance.md): the first convolution, of few input channels to every member's,
        as one matmul over the image's 3x3 patches; the grouped ones in channels-last layout. Both
        assume what the CNN's convolutions are: stride 1, no dilation, padding that keeps the size."""
        batch, _, height, width = h.shape
        if conv.groups == 1:
            patches = F.unfold(h, conv.kernel_size, padding=conv.padding)
            weight = conv.weight.view(1, conv.out_channels, -1).expand(batch, -1, -1)
            return torch.baddbmm(conv.bias.view(1, -1, 1), weight, patches).view(batch, -1, height, width)
        channels_last = torch.channels_last
        return F.conv2d(h.contiguous(memory_format=channels_last), conv.weight.contiguous(memory_format=channels_last),
                        conv.bias, padding=conv.padding, groups=conv.groups).contiguous()

    def member_tensors(self) -> list[tuple[torch.Tensor, range]]:
        size, everyone, tensors = len(self.members), range(len(self.members)), []
        for conv, norms in zip(self.convs, self.norms):
            tensors += [(conv.weight.view(size, -1, *conv.weight.shape[1:]), everyone), (conv.bias.view(size, -1), everyone)]
            tensors += self.norm_rows(norms)
        return tensors + [(self.weight.transpose(1, 2), everyone), (self.bias.squeeze(1), everyone)]


def build_network(config: Config) -> nn.Module:
    """What a job trains: a sweep's members as one fused model (output ``[M, B, 10]``), or the
    single run's network (output ``[B, 10]``), in ``train.dtype``."""
    if not is_sweep(config):
        return build_model(config.model, config.norm, config.train.dtype)
    fused = MemberCNN if config.model.name == "cnn" else MemberMLP
    return fused(members(config), config.model, config.norm).to(getattr(torch, config.train.dtype))
