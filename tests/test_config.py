"""Hydra composition of every config group against the typed schema."""

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from syncbn.config import Config, ConfigError, Member, is_sweep, members, register, to_config, validate

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


def compose_config(*overrides: str) -> Config:
    return to_config(compose("config", overrides=list(overrides)))


def test_defaults_are_the_books_experiment():
    config = compose_config()
    assert isinstance(config, Config)
    assert (config.norm.name, config.optim.name, config.data.name, config.model.name) == ("syncbn", "sgd", "mnist5k", "mlp")
    assert config.model.hidden == [100] * 5
    assert (config.optim.lr, config.optim.momentum) == (0.01, 0.0)
    assert (config.train.epochs, config.train.global_batch_size, config.data.train_size) == (20, 100, 1000)
    assert config.dist.nproc == 1 and config.dist.backend is None and config.dist.device is None


@pytest.mark.parametrize("group,choices", [
    ("norm", ["syncbn", "bn", "none", "layernorm", "groupnorm"]),
    ("optim", ["sgd", "adam"]),
    ("data", ["mnist5k", "mnist"]),
    ("model", ["mlp", "cnn"]),
])
def test_every_group_choice_composes(group, choices):
    for choice in choices:
        assert getattr(compose_config(f"{group}={choice}"), group).name == choice


def test_documented_keys_override_with_their_types():
    config = compose_config(
        "seed=3", "norm=bn", "model.weight_scale=0.05", "model.hidden=[20,30]", "optim.lr=0.1", "train.epochs=2",
        "train.global_batch_size=64", "data.train_size=500", "dist.nproc=4", "dist.backend=gloo", "dist.device=cpu",
    )
    assert (config.seed, config.norm.name, config.model.weight_scale, config.model.hidden) == (3, "bn", 0.05, [20, 30])
    assert (config.optim.lr, config.train.epochs, config.train.global_batch_size) == (0.1, 2, 64)
    assert (config.data.train_size, config.dist.nproc, config.dist.backend, config.dist.device) == (500, 4, "gloo", "cpu")
    assert compose_config("data=mnist", "data.train_size=null").data.train_size is None


@pytest.mark.parametrize("override,cause", [
    ("train.epochs=abc", "could not be converted to Integer"),
    ("model.weight_scale=big", "could not be converted to Float"),
    ("train.epoch=3", "Key 'epoch' not in 'TrainConfig'"),
    ("norm=batchnorm", "Could not find 'norm/batchnorm'"),
    ("optim=rmsprop", "Could not find 'optim/rmsprop'"),
])
def test_wrong_type_unknown_key_or_choice_fails_composition(override, cause):
    with pytest.raises(ConfigCompositionException) as failure:
        compose_config(override)
    assert cause in str(failure.value) + str(failure.value.__cause__)


@pytest.mark.parametrize("overrides,world_size,message", [
    (["optim.lr=0"], 1, "optim.lr must be > 0"),
    (["train.epochs=0"], 1, "train.epochs must be >= 1"),
    (["model.weight_scale=-1"], 1, "model.weight_scale must be > 0"),
    (["model.hidden=[]"], 1, "model.hidden must list at least one"),
    (["dist.nproc=0"], 1, "dist.nproc must be >= 1"),
    (["norm.ghost_slices=2"], 1, "norm.ghost_slices emulates per-rank BatchNorm and needs norm=bn"),
    (["norm=bn", "norm.ghost_slices=3"], 1, "norm.ghost_slices=3 must be >= 1 and divide the per-rank batch 100/1"),
    (["train.global_batch_size=100"], 3, "not divisible by the world size 3"),
    (["train.global_batch_size=2"], 4, "smaller than the world size 4"),
])
def test_values_the_types_allow_but_cannot_work_are_clear_errors(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*overrides), world_size)


def test_weight_scale_sweep_fused_and_per_run_are_the_books_grid():
    fused = compose_config("+experiment=weight_scale_sweep")
    np.testing.assert_array_equal(fused.sweep.weight_scales, np.logspace(0, -4, 16))
    assert (fused.sweep.norms, fused.sweep.seeds, fused.norm.eps) == (["syncbn", "none"], [0], 1e-6)
    assert [(m.norm, m.weight_scale) for m in members(fused)] == [(n, s) for n in ("syncbn", "none") for s in fused.sweep.weight_scales]
    cfg = compose("config", overrides=["+experiment=weight_scale_sweep_per_run"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["norm"].split(",") == fused.sweep.norms
    assert [float(v) for v in params["model.weight_scale"].split(",")] == fused.sweep.weight_scales
    assert cfg.hydra.callbacks.sweep_summary._target_ == "syncbn.plot.SweepSummary"
    assert compose_config("+experiment=weight_scale_sweep_per_run").norm.eps == 1e-6


def test_a_single_run_is_one_member_and_unset_sweep_lists_hold_its_values():
    assert members(compose_config("norm=bn", "model.weight_scale=0.3", "seed=4")) == [Member("bn", 0.3, 4)]
    assert not is_sweep(compose_config())
    config = compose_config("norm=none", "model.weight_scale=0.3", "seed=4", "sweep.seeds=[1,2]")
    assert is_sweep(config) and members(config) == [Member("none", 0.3, 1), Member("none", 0.3, 2)]


@pytest.mark.parametrize("override", ["+train.epoch=3", "+lr=0.1", "+model.depth=3"])
def test_keys_appended_with_plus_are_not_dropped_silently(override):
    with pytest.raises(ConfigError, match=f"unknown config key {override[1:].split('=')[0]}"):
        compose_config(override)
