import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from syncbn import checkpoint
from syncbn.checkpoint import CheckpointError


def test_save_keeps_the_previous_checkpoint_and_load_reads_the_latest(tmp_path):
    checkpoint.save(tmp_path, {"step": 1})
    checkpoint.save(tmp_path, {"step": 2})
    assert checkpoint.load(tmp_path) == {"step": 2}
    assert torch.load(tmp_path / checkpoint.PREVIOUS, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([checkpoint.LATEST, checkpoint.PREVIOUS])


def test_a_crash_while_saving_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"step": 1})

    def dies_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, {"step": 2})
    assert checkpoint.load(tmp_path) == {"step": 1}


def test_between_the_two_renames_the_previous_checkpoint_is_used(tmp_path):
    checkpoint.save(tmp_path, {"step": 1})
    (tmp_path / checkpoint.LATEST).rename(tmp_path / checkpoint.PREVIOUS)
    assert checkpoint.load(tmp_path) == {"step": 1}


def test_a_directory_without_checkpoint_has_nothing_to_resume(tmp_path):
    assert checkpoint.load(tmp_path) is None


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / checkpoint.LATEST).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read.*train.resume=false"):
        checkpoint.load(tmp_path)


def test_rng_states_round_trip():
    states = checkpoint.rng_states()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    checkpoint.restore_rng_states(states)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]


@pytest.mark.parametrize("change,message", [
    (dict(world_size=4), "written at world size 2, this run has 4"),
    (dict(norm="bn"), "written with norm=syncbn, this run has norm=bn"),
    (dict(model=nn.Linear(3, 5)), r"another shape \(bias: \(4,\) there, \(5,\) here\)"),
    (dict(model=nn.Linear(3, 4).double()), "written with train.dtype=float32, this run has train.dtype=float64"),
])
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, message):
    ours = dict(model=nn.Linear(3, 4), norm="syncbn", world_size=2)
    state = {"signature": checkpoint.signature(**ours)}
    with pytest.raises(CheckpointError, match=message):
        checkpoint.check_compatible(state, checkpoint.signature(**{**ours, **change}), tmp_path)
    checkpoint.check_compatible(state, checkpoint.signature(**ours), tmp_path)
