"""The networks of the experiments, built from config, with the norm layer as a choice."""

from __future__ import annotations

import torch
import torch.nn as nn

from syncbn.batchnorm import GhostBatchNorm, SyncBatchNorm
from syncbn.config import ModelConfig, NormConfig

IMAGE_FEATURES = 28 * 28
CLASSES = 10


def make_norm(norm: NormConfig, width: int, images: bool = False) -> nn.Module:
    """The norm layer after a Linear of ``width`` outputs, or a conv of ``width`` channels."""
    if norm.name == "syncbn":
        return SyncBatchNorm(width, eps=norm.eps, momentum=norm.momentum)
    if norm.name == "bn" and norm.ghost_slices:
        return GhostBatchNorm(width, norm.ghost_slices, eps=norm.eps, momentum=norm.momentum)
    if norm.name == "bn":
        return (nn.BatchNorm2d if images else nn.BatchNorm1d)(width, eps=norm.eps, momentum=norm.momentum)
    if norm.name == "layernorm":
        # Over (C, H, W) for feature maps: one group of all channels.
        return nn.GroupNorm(1, width, eps=norm.eps) if images else nn.LayerNorm(width, eps=norm.eps)
    if norm.name == "groupnorm":
        if width % norm.num_groups:
            raise ValueError(f"norm.num_groups={norm.num_groups} does not divide the layer width {width}")
        return nn.GroupNorm(norm.num_groups, width, eps=norm.eps)
    if norm.name == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm.name!r}")


def _dropout(model: ModelConfig) -> list[nn.Module]:
    return [nn.Dropout(model.dropout)] if model.dropout else []


def _init_weights(layers: list[nn.Module], weight_scale: float) -> nn.Sequential:
    """Every Linear and conv: weights ~ N(0, weight_scale), zero bias."""
    for layer in layers:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(layer.weight, mean=0.0, std=weight_scale)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def make_mlp(model: ModelConfig, norm: NormConfig) -> nn.Sequential:
    """784 -> hidden... -> 10: Linear -> norm -> ReLU per hidden layer, every Linear ~ N(0, weight_scale)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = IMAGE_FEATURES
    for hidden in model.hidden:
        layers += [nn.Linear(width, hidden), make_norm(norm, hidden), nn.ReLU(), *_dropout(model)]
        width = hidden
    layers.append(nn.Linear(width, CLASSES))
    return _init_weights(layers, model.weight_scale)


def make_cnn(model: ModelConfig, norm: NormConfig) -> nn.Sequential:
    """28x28 -> [conv 3x3 -> norm -> ReLU -> max-pool 2] per entry of ``hidden`` (its channels) -> 10.

    Here BatchNorm normalizes each channel over N x H x W values, the classic convolutional case.
    """
    layers: list[nn.Module] = []
    channels, side = 1, 28
    for width in model.hidden:
        layers += [nn.Conv2d(channels, width, 3, padding=1), make_norm(norm, width, images=True), nn.ReLU(), nn.MaxPool2d(2),
                   *_dropout(model)]
        channels, side = width, side // 2
    layers += [nn.Flatten(), nn.Linear(channels * side * side, CLASSES)]
    return _init_weights(layers, model.weight_scale)


def build_model(model: ModelConfig, norm: NormConfig, dtype: str = "float32") -> nn.Module:
    """The network, its weights drawn in float32 (the same draws for every dtype), then cast to ``dtype``."""
    if model.name == "mlp":
        network = make_mlp(model, norm)
    elif model.name == "cnn":
        network = make_cnn(model, norm)
    else:
        raise ValueError(f"unknown model {model.name!r}; expected mlp or cnn")
    return network.to(getattr(torch, dtype))
