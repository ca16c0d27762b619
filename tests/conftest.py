import os

import numpy as np
import pytest

import slurm_cluster
from gloo import GlooGroup
from idx import write_idx

_groups: dict[int, GlooGroup] = {}


def pytest_collection_modifyitems(items):
    """Tests on a Gloo group carry the ``processes`` mark too: ``-m "not processes"`` is the suite
    that runs in this one process (what mutmut runs)."""
    for item in items:
        if "gloo_group" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.processes)


RUN_CHANGING = ("SYNCBN_", "SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_")


@pytest.fixture(autouse=True)
def no_leaked_run_variables():
    """A test leaves no variable behind that changes what a later test's run does (the app run in
    this process sets --check's, for one: every later ``python -m syncbn.train`` only checked)."""
    before = {k: v for k, v in os.environ.items() if k.startswith(RUN_CHANGING)}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith(RUN_CHANGING)}
    assert after == before, f"the test left these variables changed: {set(after.items()) ^ set(before.items())}"


@pytest.fixture(scope="session")
def gloo_group():
    """``gloo_group(world_size)``: a started group of that size, shared by every test of the session."""

    def get(world_size: int) -> GlooGroup:
        if world_size not in _groups:
            _groups[world_size] = GlooGroup(world_size)
        return _groups[world_size]

    yield get
    for group in _groups.values():
        group.close()
    _groups.clear()


@pytest.fixture
def tiny_mnist(tmp_path):
    """12 training and 5 test 'digits' in torchvision's raw layout (``root/MNIST/raw``), pixels known."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(12) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5]),
    }
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return tmp_path, arrays


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real one-node SLURM cluster on this machine (``tests/slurm_cluster.py``), for the session;
    the tests skip where it cannot start, except where ``SYNCBN_REQUIRE_SLURM=1`` (CI) says it must."""
    reason = slurm_cluster.why_not()
    if reason is not None:
        if os.environ.get("SYNCBN_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    yield from slurm_cluster.running(tmp_path_factory.mktemp("slurm"))
