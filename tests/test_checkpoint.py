import random
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from syncbn import checkpoint
from syncbn.checkpoint import CheckpointError
from syncbn.config import Config, DataConfig, DistConfig, FaultConfig, NormConfig, OptimConfig, TrainConfig


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


CONFIG = Config(norm=NormConfig(name="syncbn"), optim=OptimConfig(name="sgd"), data=DataConfig(name="mnist5k"))


def _signature(config: Config = CONFIG, world_size: int = 2, model: nn.Module | None = None) -> dict:
    return checkpoint.signature(config, world_size, model or nn.Linear(3, 4))


@pytest.mark.parametrize("change,message", [
    (dict(world_size=4), "world size 2 there, 4 here"),
    (dict(config=replace(CONFIG, norm=NormConfig(name="bn"))), "norm.name=syncbn there, bn here"),
    (dict(config=replace(CONFIG, seed=1)), "seed=0 there, 1 here"),
    (dict(config=replace(CONFIG, optim=OptimConfig(name="adam", lr=0.5))), "optim.lr=0.01 there, 0.5 here; optim.name=sgd there, adam here"),
    (dict(config=replace(CONFIG, train=TrainConfig(dtype="float64", global_batch_size=50))),
     "train.dtype=float32 there, float64 here; train.global_batch_size=100 there, 50 here"),
    (dict(config=replace(CONFIG, data=DataConfig(name="mnist5k", train_size=2000))), "data.train_size=1000 there, 2000 here"),
    (dict(model=nn.Linear(3, 5)), r"another shape \(bias: \(4,\) there, \(5,\) here\)"),
])
def test_a_checkpoint_of_another_run_is_refused_naming_every_difference(tmp_path, change, message):
    state = {"signature": _signature()}
    with pytest.raises(CheckpointError, match=re.escape(message) if "shape" not in message else message):
        checkpoint.check_compatible(state, _signature(**change), tmp_path)
    checkpoint.check_compatible(state, _signature(), tmp_path)


def test_what_may_change_on_resume_is_how_long_how_often_and_where():
    allowed = replace(CONFIG, train=TrainConfig(epochs=50, checkpoint_every_steps=3, eval_batch_size=10),
                      dist=DistConfig(timeout_s=9, max_restarts=2), fault=FaultConfig(kill_rank=1, kill_at_step=3),
                      data=DataConfig(name="mnist5k", root="elsewhere", download=False))
    assert checkpoint.settings(allowed) == checkpoint.settings(CONFIG)
    assert {"seed", "optim.lr", "model.weight_scale", "model.dropout", "norm.eps", "train.dtype",
            "train.global_batch_size", "data.train_size", "data.split_seed"} <= checkpoint.settings(CONFIG).keys()
