"""What the fused models share: their members in blocks that share a norm module, each member's
tensors as rows of the fused ones, and a member drawn from (and exported as) the standalone
network a single run of it builds (``models.py``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.batchnorm import GhostBatchNorm
from syncbn.training.config import Member, ModelConfig, NormConfig
from syncbn.training.models import make_norm


class SliceBatchNorm(GhostBatchNorm):
    """Per-rank BatchNorm of ranks that hold ``size`` samples, in one process: each slice of ``size``
    samples of the batch (``GhostBatchNorm``'s interleaved slices: samples r, r + S, r + 2S ... of S
    slices, rank r's share) is normalized on its own, however many slices the batch holds. With
    ``group`` k, BN groups of k such ranks, as ``SyncBatchNorm(group_size=k)`` synchronizes them:
    slices 0..k-1, k..2k-1, ... are normalized together.

    The S slices are normalized in one call, as S x C channels of a batch of ``size`` (groups: S / k
    x C channels of a batch of k x ``size``): the batch viewed as ``[size, S, C, ...]`` holds slice r
    at ``[:, r]``. Slicing the batch S times instead would cost S full-size gradient buffers in
    backward. The running statistics follow slice 0 (group 0), as GhostBatchNorm's do, and as DDP's
    broadcast of rank 0's buffers makes them on real ranks."""

    def __init__(self, num_features: int, size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 group: int = 1) -> None:
        super().__init__(num_features, 1, eps=eps, momentum=momentum)
        self.size, self.group = size, group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        if input.size(0) % (self.size * self.group):
            what = f"groups of {self.group} slices of {self.size}" if self.group > 1 else f"slices of {self.size}"
            raise ValueError(f"{what} samples need a batch divisible by {self.size * self.group}, got {input.size(0)}")
        groups = input.size(0) // (self.size * self.group)
        if groups <= 1:  # one group (or an empty rank's batch): plain BatchNorm
            return super().forward(input)
        self._check_input_dim(input)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        channels = self._grouped(input, groups)
        with torch.no_grad():  # group 0's statistics into the running ones
            F.batch_norm(channels[:, : self.num_features], self.running_mean, self.running_var, None, None, True,
                         momentum, self.eps)
        weight, bias = (None if t is None else t.repeat(groups) for t in (self.weight, self.bias))
        return self._ungrouped(F.batch_norm(channels, None, None, weight, bias, True, 0.0, self.eps), input)

    def _grouped(self, input: torch.Tensor, groups: int) -> torch.Tensor:
        """``[size, groups x C, group, ...]``: group g's channels at ``[:, g C : (g + 1) C]`` (a view
        with ``group`` 1; a copy otherwise, its ranks' slices beside its samples)."""
        spatial = input.shape[2:]
        if self.group == 1:
            return input.reshape(self.size, groups * self.num_features, *spatial)
        ranks = input.reshape(self.size, groups, self.group, self.num_features, *spatial)
        return ranks.transpose(2, 3).reshape(self.size, groups * self.num_features, self.group, *spatial)

    def _ungrouped(self, output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        if self.group == 1:
            return output.view_as(input)
        spatial = input.shape[2:]
        ranks = output.view(self.size, -1, self.num_features, self.group, *spatial)
        return ranks.transpose(2, 3).reshape(input.shape)


def block_norm(norm: NormConfig, count: int, width: int, images: bool, bn_slice: int | None,
               bn_group: int | None = None) -> nn.Module:
    """The norm of ``count`` members of one norm, on their ``count x width`` channels side by side:
    BatchNorm over all of them normalizes each channel alone; a GroupNorm of ``count`` times the
    groups keeps each member's groups (a CNN's LayerNorm is one group) apart."""
    if norm.name in ("bn", "syncbn") and bn_slice is not None:  # per-rank BN; synchronized BN in groups
        return SliceBatchNorm(count * width, bn_slice, eps=norm.eps, momentum=norm.momentum, group=bn_group or 1)
    if images and norm.name in ("layernorm", "groupnorm"):
        groups = 1 if norm.name == "layernorm" else norm.num_groups
        return nn.GroupNorm(count * groups, count * width, eps=norm.eps)
    return make_norm(norm, count * width, images)


def norm_blocks(members: list[Member]) -> list[tuple[str, int | None, int | None, int, int]]:
    """``(norm, bn_slice, bn_group, start, stop)`` for each run of consecutive members sharing a norm module."""
    blocks, start = [], 0
    for (name, bn_slice, bn_group), group in itertools.groupby((m.norm, m.bn_slice, m.bn_group) for m in members):
        stop = start + len(list(group))
        blocks.append((name, bn_slice, bn_group, start, stop))
        start = stop
    return blocks


def layer_tensors(network: nn.Sequential) -> Iterator[torch.Tensor]:
    """A standalone network's parameters and running statistics, layer by layer."""
    for layer in network:
        yield from (t for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)) if t.is_floating_point())


class FusedMembers(nn.Module):
    """Members of one model trained as one network. A subclass lists its tensors in
    ``member_tensors`` as ``(view [k, ...], the k members of its rows)``, in the order of the
    standalone network's own (``layer_tensors``), each row shaped as that tensor; and its norm
    modules in ``self.norms``, a list per hidden layer of one module per block."""

    def __init__(self, members: list[Member], model: ModelConfig, norm: NormConfig,
                 build: Callable[[ModelConfig, NormConfig], nn.Sequential]) -> None:
        super().__init__()
        self.members = list(members)
        self.blocks = norm_blocks(self.members)
        self.model_config, self.norm_config, self._build = model, norm, build

    def member_tensors(self) -> list[tuple[torch.Tensor, range]]:
        raise NotImplementedError

    def norm_rows(self, norms: nn.ModuleList) -> list[tuple[torch.Tensor, range]]:
        """A hidden layer's norm parameters and running statistics, each block's as rows of its members."""
        return [(t.view(stop - start, -1), range(start, stop)) for norm, (*_, start, stop) in zip(norms, self.blocks)
                for t in (*norm.parameters(), *norm.buffers()) if t.is_floating_point()]

    def _batch_norms(self, block: int) -> list[_BatchNorm]:
        """The BatchNorm modules of ``block``'s members, a hidden layer after another (none for other norms)."""
        modules = (getattr(norms[block], "batch_norm", norms[block]) for norms in self.norms)
        return [module for module in modules if isinstance(module, _BatchNorm)]

    def _standalone(self, member: Member) -> nn.Sequential:
        """The network a single run of ``member`` builds (drawing its weights from the global RNG)."""
        return self._build(replace(self.model_config, weight_scale=member.weight_scale),
                           replace(self.norm_config, name=member.norm))

    def _pairs(self, index: int, network: nn.Sequential) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Member ``index``'s row of every fused tensor, beside the standalone network's tensor."""
        rows = [view[index - members.start] for view, members in self.member_tensors() if index in members]
        return zip(rows, layer_tensors(network), strict=True)

    @torch.no_grad()
    def draw_members(self) -> None:
        """Each member starts from exactly the weights its single run draws with its seed."""
        for index, member in enumerate(self.members):
            torch.manual_seed(member.seed)
            for mine, theirs in self._pairs(index, self._standalone(member)):
                mine.copy_(theirs.view_as(mine))

    @torch.no_grad()
    def member_network(self, index: int) -> nn.Sequential:
        """Member ``index`` as the standalone network a single run trains, holding a copy of its
        current weights and running statistics: to keep, evaluate or export one member. A per-rank
        BN member of slices comes back as the network of a rank holding one slice."""
        network = self._standalone(self.members[index]).to(next(self.parameters()).dtype)
        for mine, theirs in self._pairs(index, network):
            theirs.copy_(mine.view_as(theirs))
        block = next(b for b, (*_, start, stop) in enumerate(self.blocks) if start <= index < stop)
        standalone = [layer for layer in network if isinstance(layer, _BatchNorm)]
        for layer, fused in zip(standalone, self._batch_norms(block), strict=True):
            layer.num_batches_tracked.copy_(fused.num_batches_tracked)
        return network.train(self.training)

    def normalize(self, layer: int, h: torch.Tensor, dim: int) -> torch.Tensor:
        """Hidden layer ``layer``'s norms on ``h``, whose members lie side by side along ``dim``."""
        norms = self.norms[layer]
        if len(self.blocks) == 1:
            return norms[0](h)
        per_member = h.size(dim) // len(self.members)
        # split, not narrow: its backward is one cat, where each narrow's fills a full-size gradient
        parts = h.split([(stop - start) * per_member for *_, start, stop in self.blocks], dim=dim)
        return torch.cat([norm(part) for norm, part in zip(norms, parts)], dim=dim)
