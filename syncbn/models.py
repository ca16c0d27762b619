"""The networks of the experiments, built from config, with the norm layer as a choice."""

from __future__ import annotations

import torch.nn as nn

from syncbn.batchnorm import GhostBatchNorm, SyncBatchNorm
from syncbn.config import ModelConfig, NormConfig

IMAGE_FEATURES = 28 * 28
CLASSES = 10


def make_norm(norm: NormConfig, width: int) -> nn.Module:
    """The norm layer after a Linear of ``width`` outputs."""
    if norm.name == "syncbn":
        return SyncBatchNorm(width, eps=norm.eps, momentum=norm.momentum)
    if norm.name == "bn" and norm.ghost_slices:
        return GhostBatchNorm(width, norm.ghost_slices, eps=norm.eps, momentum=norm.momentum)
    if norm.name == "bn":
        return nn.BatchNorm1d(width, eps=norm.eps, momentum=norm.momentum)
    if norm.name == "layernorm":
        return nn.LayerNorm(width, eps=norm.eps)
    if norm.name == "groupnorm":
        if width % norm.num_groups:
            raise ValueError(f"norm.num_groups={norm.num_groups} does not divide the layer width {width}")
        return nn.GroupNorm(norm.num_groups, width, eps=norm.eps)
    if norm.name == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm.name!r}")


def make_mlp(model: ModelConfig, norm: NormConfig) -> nn.Sequential:
    """784 -> hidden... -> 10: Linear -> norm -> ReLU per hidden layer, every Linear ~ N(0, weight_scale)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = IMAGE_FEATURES
    for hidden in model.hidden:
        layers += [nn.Linear(width, hidden), make_norm(norm, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, CLASSES))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, mean=0.0, std=model.weight_scale)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def build_model(model: ModelConfig, norm: NormConfig) -> nn.Module:
    if model.name == "mlp":
        return make_mlp(model, norm)
    raise ValueError(f"unknown model {model.name!r}; expected mlp")
