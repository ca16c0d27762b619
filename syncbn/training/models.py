"""The networks of the experiments, built from config, with the norm layer as a choice: each the
network a user would write with torch's layers (the reference every fused member is checked
against, ``members.py``); and the check that a job's model fits the machine."""

from __future__ import annotations

import torch
import torch.nn as nn

from syncbn.batchnorm import GhostBatchNorm, SyncBatchNorm
from syncbn.training.config import Config, ConfigError, ModelConfig, NormConfig, members

IMAGE_FEATURES = 28 * 28
CLASSES = 10


def make_norm(norm: NormConfig, width: int, images: bool = False) -> nn.Module:
    """The norm layer after a Linear of ``width`` outputs, or a conv of ``width`` channels."""
    if norm.name == "syncbn":
        return SyncBatchNorm(width, eps=norm.eps, momentum=norm.momentum, group_size=norm.group_size)
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


CNN_SIDES = (28, 14, 7, 3)  # each layer's input side: max-pool halves it, to 1 after the fourth
PROCESS_BYTES = 256 * 2**20  # what a rank with torch imported holds before any model (measured: ~280 MiB private)


def footprint(config: Config, world_size: int) -> tuple[int, int]:
    """(parameters, bytes) of one rank's job: the parameters with their gradients and two optimizer
    states, and the activations of the larger of its training and evaluation batches, every member."""
    model, hidden = config.model, config.model.hidden
    if model.name == "cnn":
        sides = CNN_SIDES[: len(hidden)]
        params = sum((9 * c_in + 3) * c_out for c_in, c_out in zip([1, *hidden], hidden))
        params += (hidden[-1] * (sides[-1] // 2) ** 2 + 1) * CLASSES
        per_sample = sum(width * side * side * 3 + width * (side // 2) ** 2 for width, side in zip(hidden, sides))
    else:
        widths = [IMAGE_FEATURES, *hidden, CLASSES]
        params = sum((a + 3) * b for a, b in zip(widths, widths[1:]))
        per_sample = IMAGE_FEATURES + 4 * sum(hidden) + CLASSES
    size = torch.finfo(getattr(torch, config.train.dtype)).bits // 8
    batch = max(config.train.global_batch_size // world_size, config.train.eval_batch_size)
    networks = len(members(config))
    return networks * params, networks * size * (4 * params + batch * per_sample)


def check(config: Config, world_size: int, local_processes: int, available: int | None) -> None:
    """Refuse a model that cannot be built (a CNN deeper than its image) or that the ``local_processes``
    ranks on this machine cannot hold in the ``available`` bytes of memory (None: not known)."""
    hidden = config.model.hidden
    if config.model.name == "cnn" and len(hidden) > len(CNN_SIDES):
        raise ConfigError(f"model=cnn halves its 28x28 input in every layer ({', '.join(map(str, CNN_SIDES))}, 1): "
                          f"model.hidden may list at most {len(CNN_SIDES)} widths, got {len(hidden)}")
    params, bytes_ = footprint(config, world_size)
    need = local_processes * (PROCESS_BYTES + bytes_)
    if available is not None and need > available:
        raise ConfigError(f"{local_processes} rank(s) on this machine of a model of {params:,} parameters "
                          f"(model.hidden={hidden}) need about {need / 2**30:.1f} GiB, more than the "
                          f"{available / 2**30:.1f} GiB of memory free here: fewer ranks or a smaller model")


def build_model(model: ModelConfig, norm: NormConfig, dtype: str = "float32") -> nn.Module:
    """The network, its weights drawn in float32 (the same draws for every dtype), then cast to ``dtype``."""
    if model.name == "mlp":
        network = make_mlp(model, norm)
    elif model.name == "cnn":
        network = make_cnn(model, norm)
    else:
        raise ValueError(f"unknown model {model.name!r}; expected mlp or cnn")
    return network.to(getattr(torch, dtype))
