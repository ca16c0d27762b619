"""A job of many networks as one model: ``MemberMLP`` trains every member of a sweep (a network per
norm, weight scale and seed) with batched matmuls, each member starting from exactly the weights
its standalone network (``models.py``) draws; ``build_network`` builds what a job trains.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from syncbn.training.config import Config, Member, ModelConfig, NormConfig, is_sweep, members
from syncbn.training.models import CLASSES, IMAGE_FEATURES, build_model, make_mlp, make_norm

class MemberNorm(nn.Module):
    """One hidden layer's norm for ``count`` members that share it, on activations ``[count, B, C]``.

    syncbn / bn: one BatchNorm over ``count x C`` channels, so each member's channels are normalized
    on their own and SyncBatchNorm's one all-gather each way carries every member's statistics.
    layernorm / groupnorm: each sample's C values (in groups) of each member, with its own affine.
    """

    def __init__(self, norm: NormConfig, count: int, width: int) -> None:
        super().__init__()
        self.name, self.count, self.width = norm.name, count, width
        self.groups = {"layernorm": 1, "groupnorm": norm.num_groups}.get(norm.name)
        self.eps = norm.eps
        if self.groups:
            self.weight = nn.Parameter(torch.ones(count, 1, width))
            self.bias = nn.Parameter(torch.zeros(count, 1, width))
        else:
            self.batch_norm = make_norm(norm, count * width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        count, batch, width = h.shape
        if self.groups:
            grouped = h.reshape(count, batch, self.groups, width // self.groups)
            normalized = F.layer_norm(grouped, grouped.shape[-1:], eps=self.eps).view_as(h)
            return torch.addcmul(self.bias, normalized, self.weight)
        channels = h.transpose(0, 1).reshape(batch, count * width)
        return self.batch_norm(channels).view(batch, count, width).transpose(0, 1)

    def member_tensors(self) -> list[torch.Tensor]:
        """Every parameter and running statistic, viewed as ``[count, ...]`` (a row per member)."""
        if self.groups:
            return [self.weight, self.bias]
        if self.name == "none":
            return []
        tensors = [t for t in (*self.batch_norm.parameters(), self.batch_norm.running_mean, self.batch_norm.running_var)
                   if t is not None]
        return [t.view(self.count, self.width) for t in tensors]


class MemberMLP(nn.Module):
    """Every member of a sweep as one network: ``M`` MLPs of the same widths, trained as one.

    Each Linear is a batched matmul over members (weights ``[M, in, out]``, ``torch.baddbmm``); the
    members of each norm share one norm module per layer (``MemberNorm``). The output is
    ``[M, B, 10]``: every member sees the same batch. Member ``m`` starts from exactly the weights
    a standalone run of it draws: that network is built with its seed and its weights copied in.
    """

    def __init__(self, members: list[Member], model: ModelConfig, norm: NormConfig) -> None:
        super().__init__()
        self.members = list(members)
        widths = [IMAGE_FEATURES, *model.hidden, CLASSES]
        size = len(self.members)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(size, i, o)) for i, o in itertools.pairwise(widths))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(size, 1, o)) for o in widths[1:])
        self.blocks = _norm_blocks(self.members)
        self.norms = nn.ModuleList(
            nn.ModuleList(MemberNorm(replace(norm, name=name), stop - start, width) for name, start, stop in self.blocks)
            for width in model.hidden
        )
        self.dropout = model.dropout
        self.model_config, self.norm_config = model, norm
        with torch.no_grad():
            for index, member in enumerate(self.members):
                torch.manual_seed(member.seed)
                self._copy_standalone(index, self._standalone(member))

    def _standalone(self, member: Member) -> nn.Sequential:
        """The network a single run of ``member`` builds (drawing its weights from the global RNG)."""
        return make_mlp(replace(self.model_config, weight_scale=member.weight_scale),
                        replace(self.norm_config, name=member.norm))

    def _copy_standalone(self, index: int, network: nn.Sequential) -> None:
        linears = [layer for layer in network if isinstance(layer, nn.Linear)]
        for weight, bias, linear in zip(self.weights, self.biases, linears, strict=True):
            weight[index].copy_(linear.weight.T)
            bias[index, 0].copy_(linear.bias)

    @torch.no_grad()
    def member_network(self, index: int) -> nn.Sequential:
        """Member ``index`` as the standalone network a single run trains (``make_mlp``), holding a
        copy of its current weights and running statistics: to keep, evaluate or export one member."""
        member = self.members[index]
        block = next(b for b, (_, start, stop) in enumerate(self.blocks) if start <= index < stop)
        row = index - self.blocks[block][1]
        network = self._standalone(member).to(self.weights[0].dtype)
        linears = [layer for layer in network if isinstance(layer, nn.Linear)]
        for weight, bias, linear in zip(self.weights, self.biases, linears, strict=True):
            linear.weight.copy_(weight[index].T)
            linear.bias.copy_(bias[index, 0])
        norms = [layer for layer in network if not isinstance(layer, (nn.Linear, nn.Flatten, nn.ReLU, nn.Dropout))]
        for layer, member_norms in zip(norms, self.norms, strict=True):
            standalone = [t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()]
            for target, source in zip(standalone, member_norms[block].member_tensors(), strict=True):
                target.copy_(source[row].view_as(target))
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.num_batches_tracked.copy_(member_norms[block].batch_norm.num_batches_tracked)
        return network.train(self.training)

    def _normalize(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        norms = self.norms[layer]
        if len(self.blocks) == 1:
            return norms[0](h)
        return torch.cat([norm(h[start:stop]) for norm, (_, start, stop) in zip(norms, self.blocks)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        h = torch.baddbmm(self.biases[0], x.expand(len(self.members), *x.shape), self.weights[0])
        for layer in range(len(self.norms)):
            h = F.relu(self._normalize(layer, h))
            if self.dropout:
                h = F.dropout(h, self.dropout, self.training)
            h = torch.baddbmm(self.biases[layer + 1], h, self.weights[layer + 1])
        return h

    def member_tensors(self) -> list[tuple[torch.Tensor, range]]:
        """Every parameter and running statistic as ``(view [k, ...], the members of its k rows)``."""
        everyone = range(len(self.members))
        tensors = [(t, everyone) for t in (*self.weights, *self.biases)]
        for norms in self.norms:
            for norm, (_, start, stop) in zip(norms, self.blocks):
                tensors += [(t, range(start, stop)) for t in norm.member_tensors()]
        return tensors


def _norm_blocks(members: list[Member]) -> list[tuple[str, int, int]]:
    """``(norm, start, stop)`` for each run of consecutive members with the same norm."""
    blocks, start = [], 0
    for name, group in itertools.groupby(member.norm for member in members):
        stop = start + len(list(group))
        blocks.append((name, start, stop))
        start = stop
    return blocks


def build_network(config: Config) -> nn.Module:
    """What a job trains: a sweep's members as one ``MemberMLP`` (output ``[M, B, 10]``), or the
    single run's network (output ``[B, 10]``), in ``train.dtype``."""
    if not is_sweep(config):
        return build_model(config.model, config.norm, config.train.dtype)
    network = MemberMLP(members(config), config.model, config.norm)
    return network.to(getattr(torch, config.train.dtype))
