"""Hydra composition of every config group against the typed schema."""

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from syncbn.training.config import Config, ConfigError, Member, is_sweep, members, register, to_config
from syncbn.training.validation import validate

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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
    assert cfg.hydra.callbacks.sweep_summary._target_ == "syncbn.experiments.weight_scale.SweepSummary"
    assert compose_config("+experiment=weight_scale_sweep_per_run").norm.eps == 1e-6


def test_a_single_run_is_one_member_and_unset_sweep_lists_hold_its_values():
    assert members(compose_config("norm=bn", "model.weight_scale=0.3", "seed=4")) == [Member("bn", 0.3, 4)]
    assert not is_sweep(compose_config())
    config = compose_config("norm=none", "model.weight_scale=0.3", "seed=4", "sweep.seeds=[1,2]")
    assert is_sweep(config) and members(config) == [Member("none", 0.3, 1), Member("none", 0.3, 2)]


def test_bn_slices_multiply_the_per_rank_bn_members_only_grouped_by_norm_then_slice():
    config = compose_config("sweep.norms=[syncbn,bn]", "sweep.bn_slices=[8,2]", "sweep.seeds=[0,1]", "model.weight_scale=0.5")
    assert is_sweep(compose_config("norm=bn", "sweep.bn_slices=[4]"))
    assert members(config) == [Member("syncbn", 0.5, 0), Member("syncbn", 0.5, 1), Member("bn", 0.5, 0, 8),
                               Member("bn", 0.5, 1, 8), Member("bn", 0.5, 0, 2), Member("bn", 0.5, 1, 2)]
    assert Member("bn", 0.5, 1, 2).record() == dict(norm="bn", weight_scale=0.5, seed=1, bn_slice=2)
    assert Member("bn", 0.5, 1).record() == dict(norm="bn", weight_scale=0.5, seed=1)


@pytest.mark.parametrize("overrides,keys", [(["+train.epoch=3"], "train.epoch"), (["+lr=0.1"], "lr"),
                                            (["+model.depth=3"], "model.depth"),
                                            (["+lr=0.1", "+model.depth=3"], "model.depth, lr")])
def test_keys_appended_with_plus_are_not_dropped_silently(overrides, keys):
    with pytest.raises(ConfigError) as refusal:
        compose_config(*overrides)
    assert str(refusal.value) == f"unknown config key {keys}: syncbn/training/config.py lists the keys that exist"


def _refusal(config: Config, world_size: int) -> str | None:
    try:
        validate(config, world_size)
    except ConfigError as error:
        return str(error)
    return None


# Every check of ``validate``, at its limit and on both sides of it: (overrides, world size, the
# whole message, or None where the value must be accepted).
BOUNDARIES = [
    ([], 1, None), ([], 2, None), ([], 4, None),
    # choices the groups cannot catch (a key of a group's node, not the group)
    (["norm.name=batchnorm"], 1, "norm must be one of syncbn, bn, none, layernorm, groupnorm, got 'batchnorm'"),
    (["optim.name=rmsprop"], 1, "optim must be one of sgd, adam, got 'rmsprop'"),
    (["data.name=cifar"], 1, "data must be one of mnist5k, mnist, got 'cifar'"),
    (["model.name=resnet"], 1, "model.name must be one of mlp, cnn, got 'resnet'"),
    (["train.dtype=float16"], 1, "train.dtype must be one of float32, float64, got 'float16'"),
    (["dist.backend=mpi"], 1, "dist.backend must be one of gloo, nccl, got 'mpi'"),
    (["dist.backend=gloo"], 1, None), (["dist.backend=nccl"], 1, None), (["train.dtype=float64"], 1, None),
    # norm
    (["norm.eps=0"], 1, "norm.eps must be > 0, got 0.0"),
    (["norm.eps=-1e-5"], 1, "norm.eps must be > 0, got -1e-05"),
    (["norm.eps=1e-300"], 1, None),
    (["norm.momentum=-0.01"], 1, "norm.momentum must be in [0, 1] (the weight of each new batch in the running "
                                 "statistics), got -0.01"),
    (["norm.momentum=0"], 1, None), (["norm.momentum=1"], 1, None),
    (["norm.momentum=1.01"], 1, "norm.momentum must be in [0, 1] (the weight of each new batch in the running "
                                "statistics), got 1.01"),
    (["norm=groupnorm", "norm.num_groups=0"], 1, "norm.num_groups must be >= 1, got 0"),
    (["norm=syncbn", "norm.num_groups=0"], 1, "norm.num_groups must be >= 1, got 0"),  # unused, still a value
    (["norm=groupnorm", "norm.num_groups=3"], 1,
     "norm.num_groups=3 must divide every width of model.hidden=[100, 100, 100, 100, 100]"),
    (["norm=groupnorm", "norm.num_groups=4", "model.hidden=[100,30]"], 1,
     "norm.num_groups=4 must divide every width of model.hidden=[100, 30]"),
    (["norm=groupnorm", "norm.num_groups=1"], 1, None), (["norm=groupnorm", "norm.num_groups=100"], 1, None),
    (["norm=syncbn", "norm.num_groups=3"], 1, None),  # only a groupnorm member uses it
    (["norm=syncbn", "norm.num_groups=3", "sweep.norms=[syncbn,groupnorm]"], 1,
     "norm.num_groups=3 must divide every width of model.hidden=[100, 100, 100, 100, 100]"),
    (["norm=syncbn", "norm.ghost_slices=2"], 1, "norm.ghost_slices emulates per-rank BatchNorm and needs norm=bn, got norm=syncbn"),
    (["norm=bn", "norm.ghost_slices=0"], 1, "norm.ghost_slices=0 must be >= 1 and divide the per-rank batch 100/1"),
    (["norm=bn", "norm.ghost_slices=1"], 1, None), (["norm=bn", "norm.ghost_slices=100"], 1, None),
    (["norm=bn", "norm.ghost_slices=3"], 1, "norm.ghost_slices=3 must be >= 1 and divide the per-rank batch 100/1"),
    (["norm=bn", "norm.ghost_slices=50"], 2, None),
    (["norm=bn", "norm.ghost_slices=50"], 4, "norm.ghost_slices=50 must be >= 1 and divide the per-rank batch 100/4"),
    # values
    (["optim.lr=0"], 1, "optim.lr must be > 0, got 0.0"), (["optim.lr=1e-300"], 1, None),
    (["optim.momentum=-0.1"], 1, "optim.momentum must be >= 0, got -0.1"), (["optim.momentum=0"], 1, None),
    (["optim.weight_decay=-0.1"], 1, "optim.weight_decay must be >= 0, got -0.1"), (["optim.weight_decay=0"], 1, None),
    (["train.epochs=0"], 1, "train.epochs must be >= 1, got 0"), (["train.epochs=1"], 1, None),
    (["train.eval_batch_size=0"], 1, "train.eval_batch_size must be >= 1, got 0"), (["train.eval_batch_size=1"], 1, None),
    (["model.weight_scale=0"], 1, "model.weight_scale must be > 0, got 0.0"), (["model.weight_scale=1e-300"], 1, None),
    (["model.dropout=-0.1"], 1, "model.dropout must be in [0, 1), got -0.1"), (["model.dropout=0"], 1, None),
    (["model.dropout=0.99"], 1, None), (["model.dropout=1"], 1, "model.dropout must be in [0, 1), got 1.0"),
    (["model.hidden=[]"], 1, "model.hidden must list at least one hidden layer width, got []"),
    (["model.hidden=[5,0]"], 1, "model.hidden widths must be >= 1, got [5, 0]"), (["model.hidden=[1]"], 1, None),
    (["data.train_size=0"], 1, "data.train_size must be >= 1 or null (all), got 0"),
    (["data.train_size=1"], 1, None), (["data.train_size=null"], 1, None),
    (["train.checkpoint_every_steps=0"], 1, "train.checkpoint_every_steps must be >= 1 or null, got 0"),
    (["train.checkpoint_every_steps=1"], 1, None),
    (["dist.timeout_s=0"], 1, "dist.timeout_s must be > 0, got 0.0"), (["dist.timeout_s=0.001"], 1, None),
    (["dist.max_restarts=-1"], 1, "dist.max_restarts must be >= 0, got -1"), (["dist.max_restarts=0"], 1, None),
    # the world
    (["dist.nproc=0"], 1, "dist.nproc must be >= 1, got 0"), (["dist.nproc=-2"], 1, "dist.nproc must be >= 1, got -2"),
    (["train.global_batch_size=3"], 4, "train.global_batch_size=3 is smaller than the world size 4"),
    (["train.global_batch_size=4"], 4, None),
    (["train.global_batch_size=6"], 4, "train.global_batch_size=6 is not divisible by the world size 4"),
    (["fault.kill_rank=0"], 2, "fault.kill_rank and fault.kill_at_step go together: set both or neither"),
    (["fault.kill_at_step=3"], 2, "fault.kill_rank and fault.kill_at_step go together: set both or neither"),
    (["fault.kill_rank=0", "fault.kill_at_step=1"], 2, None), (["fault.kill_rank=1", "fault.kill_at_step=1"], 2, None),
    (["fault.kill_rank=2", "fault.kill_at_step=1"], 2, "fault.kill_rank=2 is not a rank of this run (0 to 1)"),
    (["fault.kill_rank=-1", "fault.kill_at_step=1"], 2, "fault.kill_rank=-1 is not a rank of this run (0 to 1)"),
    (["fault.kill_rank=0", "fault.kill_at_step=0"], 1, "fault.kill_at_step must be >= 1, got 0"),
    # the fused sweep
    (["sweep.norms=[]"], 1, "sweep.norms must list at least one value, or be null (the single run's value), got []"),
    (["sweep.weight_scales=[]"], 1,
     "sweep.weight_scales must list at least one value, or be null (the single run's value), got []"),
    (["sweep.seeds=[]"], 1, "sweep.seeds must list at least one value, or be null (the single run's value), got []"),
    (["sweep.seeds=[0,1,0]"], 1, "sweep.seeds lists a value twice: [0, 1, 0]"),
    (["sweep.norms=[none,bn,none]"], 1, "sweep.norms lists a value twice: ['none', 'bn', 'none']"),
    (["sweep.weight_scales=[0.1,0.1]"], 1, "sweep.weight_scales lists a value twice: [0.1, 0.1]"),
    (["sweep.norms=[bn,batchnorm]"], 1, "sweep.norms: each must be one of syncbn, bn, none, layernorm, groupnorm, got 'batchnorm'"),
    (["sweep.weight_scales=[0.1,0]"], 1, "sweep.weight_scales must all be > 0, got [0.1, 0.0]"),
    (["sweep.weight_scales=[1e-300]"], 1, None), (["sweep.seeds=[5]"], 1, None),
    (["sweep.seeds=[0,1]", "model=cnn"], 1, None),  # a fused CNN
    (["model=cnn"], 1, None),
    (["sweep.bn_slices=[]", "norm=bn"], 1, "sweep.bn_slices must list at least one value, or be null (the single run's value), got []"),
    (["sweep.bn_slices=[4,2,4]", "norm=bn"], 1, "sweep.bn_slices lists a value twice: [4, 2, 4]"),
    (["sweep.bn_slices=[4,0]", "norm=bn"], 1, "sweep.bn_slices must all be >= 1 (samples per slice), got [4, 0]"),
    (["sweep.bn_slices=[1]", "norm=bn"], 1, None),  # a CNN's slice of one sample has H x W values: data.check decides
    (["sweep.bn_slices=[4]", "sweep.norms=[syncbn,none]"], 1,
     "sweep.bn_slices sizes the slices of per-rank BatchNorm members (norm=bn or sweep.norms with bn), or the ranks of "
     "sweep.bn_groups: the job has neither"),
    (["sweep.bn_slices=[4]", "norm=bn", "sweep.norms=[syncbn,none]"], 1,
     "sweep.bn_slices sizes the slices of per-rank BatchNorm members (norm=bn or sweep.norms with bn), or the ranks of "
     "sweep.bn_groups: the job has neither"),
    (["sweep.bn_slices=[4]", "norm=syncbn", "sweep.norms=[none,bn]"], 1, None),
    # BN groups: real ones (norm.group_size), emulated ones (sweep.bn_groups)
    (["norm=syncbn", "norm.group_size=1"], 4, None), (["norm=syncbn", "norm.group_size=2"], 4, None),
    (["norm=syncbn", "norm.group_size=4"], 4, None),
    (["norm=syncbn", "norm.group_size=3"], 4, "norm.group_size=3 must be >= 1 and divide the world size 4 (the groups are "
                                              "ranks 0..k-1, k..2k-1, ...)"),
    (["norm=syncbn", "norm.group_size=8"], 4, "norm.group_size=8 must be >= 1 and divide the world size 4 (the groups are "
                                              "ranks 0..k-1, k..2k-1, ...)"),
    (["norm=syncbn", "norm.group_size=0"], 4, "norm.group_size=0 must be >= 1 and divide the world size 4 (the groups are "
                                              "ranks 0..k-1, k..2k-1, ...)"),
    (["norm=bn", "norm.group_size=2"], 2,
     "norm.group_size makes BN groups of synchronized BatchNorm and needs norm=syncbn, got norm=bn"),
    (["norm=bn", "norm.group_size=2", "sweep.norms=[bn,syncbn]"], 2, None),
    (["norm=syncbn", "sweep.bn_groups=[2]"], 1,
     "sweep.bn_groups emulates BN groups of synchronized BatchNorm members over ranks of sweep.bn_slices samples: it "
     "needs norm=syncbn (or sweep.norms with syncbn) and sweep.bn_slices"),
    (["norm=bn", "sweep.bn_slices=[5]", "sweep.bn_groups=[2]"], 1,
     "sweep.bn_groups emulates BN groups of synchronized BatchNorm members over ranks of sweep.bn_slices samples: it "
     "needs norm=syncbn (or sweep.norms with syncbn) and sweep.bn_slices"),
    (["norm=syncbn", "sweep.bn_slices=[5]", "sweep.bn_groups=[2]"], 1, None),
    (["norm=syncbn", "sweep.bn_slices=[5]", "sweep.bn_groups=[2]"], 2,  # found trying it: each rank grouped its own
     "sweep.bn_groups emulates BN groups in one process, the whole global batch its ranks; at 2 ranks leave it out "
     "(norm.group_size makes BN groups of real ranks)"),
    (["norm=syncbn", "sweep.bn_slices=[5]", "sweep.bn_groups=[2,10]"], 1, None),  # 50: less than 100, a divisor
    (["norm=syncbn", "sweep.bn_slices=[5]", "sweep.bn_groups=[3]"], 1,
     "sweep.bn_groups=3: with no slice size of sweep.bn_slices=[5] is a group of 3 ranks smaller than "
     "train.global_batch_size=100 and a divisor of it"),
    (["norm=syncbn", "sweep.bn_slices=[5]", "sweep.bn_groups=[20]"], 1,
     "sweep.bn_groups=20: with no slice size of sweep.bn_slices=[5] is a group of 20 ranks smaller than "
     "train.global_batch_size=100 and a divisor of it"),
    (["norm=syncbn", "sweep.bn_slices=[5]", "sweep.bn_groups=[0]"], 1, "sweep.bn_groups must all be >= 1, got [0]"),
    (["norm=syncbn", "sweep.bn_slices=[0]", "sweep.bn_groups=[2]"], 1,
     "sweep.bn_slices must all be >= 1 (samples per slice), got [0]"),
    (["norm=syncbn", "sweep.bn_slices=[5]", "sweep.bn_groups=[]"], 1,
     "sweep.bn_groups must list at least one value, or be null (the single run's value), got []"),
    (["norm=syncbn", "sweep.bn_slices=[5]", "sweep.bn_groups=[2,2]"], 1, "sweep.bn_groups lists a value twice: [2, 2]"),
    # evaluation
    (["train.precise_bn=final"], 1, None), (["train.precise_bn=every_epoch"], 1, None),
    (["train.precise_bn=sometimes"], 1, "train.precise_bn must be one of off, final, every_epoch, got 'sometimes'"),
    (["train.precision=fp16", "sweep.seeds=[0,1]"], 1,
     "train.precision=fp16 trains one network: its gradient scaler skips every member's step when one member's "
     "gradients overflow; a sweep or study takes bf16"),
    (["train.precision=fp16"], 1, None), (["train.precision=bf16", "sweep.seeds=[0,1]"], 1, None),
    (["train.precision=bf16", "train.dtype=float64"], 1,
     "train.precision=bf16 lowers float32 work: it needs train.dtype=float32, got float64"),
    (["train.precision=fp32", "train.dtype=float64"], 1, None),
    (["sweep.seeds=[0,1]", "norm=bn", "norm.ghost_slices=2"], 1,
     "norm.ghost_slices emulates per-rank BatchNorm in a single run, not in a sweep: leave it null"),
    (["sweep.seeds=[0,1]", "study.per_device_batch=50"], 1,
     "the batch-size study (study.per_device_batch) trains single runs: leave sweep.* null"),
]


@pytest.mark.parametrize("overrides,world_size,message", BOUNDARIES, ids=lambda v: v if isinstance(v, str) else None)
def test_every_validation_boundary_is_refused_outside_and_accepted_inside_with_its_whole_message(
        overrides, world_size, message):
    assert _refusal(compose_config(*overrides), world_size) == message


def test_the_first_problem_in_the_documented_order_is_the_one_named():
    """choices, sweep, norm, values, then the world: the message a user reads first is the one to fix first."""
    config = compose_config("train.dtype=float16", "sweep.seeds=[]", "norm.eps=0", "optim.lr=0", "dist.nproc=0")
    assert _refusal(config, 1).startswith("train.dtype")
    config = compose_config("sweep.seeds=[]", "norm.eps=0", "optim.lr=0", "dist.nproc=0")
    assert _refusal(config, 1).startswith("sweep.seeds")
    assert _refusal(compose_config("norm.eps=0", "optim.lr=0", "dist.nproc=0"), 1).startswith("norm.eps")
    assert _refusal(compose_config("optim.lr=0", "dist.nproc=0"), 1).startswith("optim.lr")


def test_register_puts_the_schema_that_types_every_group_in_hydras_store():
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.repo.pop("schema.yaml", None)
    register()
    assert store.repo["schema.yaml"].node._metadata.object_type is Config
    assert isinstance(compose_config().norm.eps, float)
