from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from app import compose_config

from syncbn import GhostBatchNorm, SyncBatchNorm
from syncbn.config import ModelConfig, NormConfig, members
from syncbn import models
from syncbn.config import ConfigError
from syncbn.models import MemberMLP, build_model, build_network, make_norm

NORM_LAYERS = {"syncbn": SyncBatchNorm, "bn": nn.BatchNorm1d, "layernorm": nn.LayerNorm, "groupnorm": nn.GroupNorm, "none": nn.Identity}


@pytest.mark.parametrize("norm", list(NORM_LAYERS))
def test_mlp_is_linear_norm_relu_per_hidden_layer(norm):
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=[100] * 5, weight_scale=0.05), NormConfig(name=norm))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 100)] + [(100, 100)] * 4 + [(100, 10)]
    assert sum(isinstance(m, NORM_LAYERS[norm]) for m in model) == 5
    assert sum(isinstance(m, nn.ReLU) for m in model) == 5
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 10)


def test_every_linear_is_normal_with_the_weight_scale_and_zero_bias():
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=[400, 400], weight_scale=0.02), NormConfig(name="none"))
    for linear in (m for m in model if isinstance(m, nn.Linear)):
        assert torch.all(linear.bias == 0)
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert linear.weight.mean().abs().item() < 0.002


CNN_NORMS = {"syncbn": SyncBatchNorm, "bn": nn.BatchNorm2d, "layernorm": nn.GroupNorm, "groupnorm": nn.GroupNorm, "none": nn.Identity}


@pytest.mark.parametrize("norm", list(CNN_NORMS))
def test_cnn_is_conv_norm_relu_pool_per_block(norm):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", hidden=[10, 20], weight_scale=0.1), NormConfig(name=norm))
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 10), (10, 20)]
    norms = [m for m in model if isinstance(m, CNN_NORMS[norm])]
    assert len(norms) == 2
    if norm == "layernorm":
        assert [m.num_groups for m in norms] == [1, 1], "LayerNorm over (C, H, W)"
    assert model(torch.rand(6, 1, 28, 28)).shape == (6, 10)
    assert all(torch.all(c.bias == 0) for c in convs)


def test_bn_with_ghost_slices_emulates_ranks_in_one_process():
    model = build_model(ModelConfig(hidden=[20]), NormConfig(name="bn", ghost_slices=4))
    assert [m.slices for m in model if isinstance(m, GhostBatchNorm)] == [4]


def test_groupnorm_groups_must_divide_the_width():
    with pytest.raises(ValueError, match="norm.num_groups=7 does not divide the layer width 100"):
        build_model(ModelConfig(), NormConfig(name="groupnorm", num_groups=7))


def sweep_config(*overrides: str):
    """Five norms x 2 scales x 2 seeds on a small MLP, in float64."""
    return compose_config("sweep.norms=[syncbn,bn,none,layernorm,groupnorm]", "sweep.weight_scales=[0.1,0.02]",
                          "sweep.seeds=[0,3]", "model.hidden=[20,30]", "train.dtype=float64", *overrides)


def standalone(config, member) -> torch.nn.Module:
    """The network a single run of ``member`` builds."""
    torch.manual_seed(member.seed)
    return build_model(replace(config.model, weight_scale=member.weight_scale), replace(config.norm, name=member.norm),
                       config.train.dtype)


def test_every_member_starts_from_its_single_runs_weights_and_computes_its_outputs_and_gradients():
    config = sweep_config()
    fused, images = build_network(config), torch.rand(16, 1, 28, 28, dtype=torch.float64)
    assert isinstance(fused, MemberMLP) and len(fused.members) == 20
    singles = [standalone(config, member) for member in members(config)]
    for index, single in enumerate(singles):
        mine, theirs = fused.member_network(index).state_dict(), single.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), index

    labels = torch.arange(16) % 10
    logits = fused(images)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat(20), reduction="none").view(20, 16).mean(1).sum().backward()
    for index, single in enumerate(singles):
        output = single(images)
        torch.nn.functional.cross_entropy(output, labels).backward()
        torch.testing.assert_close(logits[index], output, rtol=0, atol=1e-12)
        linears = [layer for layer in single if isinstance(layer, torch.nn.Linear)]
        for weight, linear in zip(fused.weights, linears):
            torch.testing.assert_close(weight.grad[index].T, linear.weight.grad, rtol=0, atol=1e-12)
        mine, theirs = fused.member_network(index).state_dict(), single.state_dict()
        for key in mine:  # running statistics after one training step
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-12)

    fused.eval()
    evaluated = fused(images)
    for index, single in enumerate(singles):
        torch.testing.assert_close(evaluated[index], single.eval()(images), rtol=0, atol=1e-12)


def test_a_member_with_non_finite_weights_changes_no_other_members_outputs_or_gradients():
    config = sweep_config()
    images, labels = torch.rand(16, 1, 28, 28, dtype=torch.float64), torch.arange(16) % 10

    def step(network):
        logits = network(images)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat(20), reduction="none").view(20, 16).mean(1).sum().backward()
        return logits.detach(), [w.grad for w in network.weights]

    clean, poisoned = build_network(config), build_network(config)
    broken = [index for index, member in enumerate(poisoned.members) if member.norm in ("syncbn", "layernorm")][:1] + [7]
    with torch.no_grad():
        for index in broken:
            poisoned.weights[1][index, 0, 0] = float("nan")
            poisoned.weights[2][index, 3, 1] = float("inf")
    clean_logits, clean_grads = step(clean)
    logits, grads = step(poisoned)
    others = [index for index in range(20) if index not in broken]
    assert all(not logits[index].isfinite().all() for index in broken)
    assert torch.equal(logits[others], clean_logits[others])
    assert all(torch.equal(g[others], c[others]) for g, c in zip(grads, clean_grads))


def test_member_dropout_is_off_in_eval_and_on_in_training():
    """Eval: every member's output is its standalone network's in eval mode, call after call. Train:
    dropout draws a new mask each call."""
    config = sweep_config("model.dropout=0.5")
    fused, images = build_network(config), torch.rand(8, 1, 28, 28, dtype=torch.float64)
    fused.eval()
    evaluated = fused(images)
    assert torch.equal(evaluated, fused(images))
    for index in range(len(fused.members)):
        torch.testing.assert_close(evaluated[index], fused.member_network(index)(images), rtol=0, atol=1e-12)
    fused.train()
    assert not torch.equal(fused(images), fused(images))


@pytest.mark.parametrize("training", [True, False])
def test_a_member_network_comes_back_in_the_fused_models_mode(training):
    fused = build_network(sweep_config("model.dropout=0.5")).train(training)
    for index in (0, len(fused.members) - 1):
        assert {module.training for module in fused.member_network(index).modules()} == {training}


def test_an_unknown_model_or_norm_is_refused_naming_it():
    """Config validation refuses both first; a caller of the builders gets the same names."""
    with pytest.raises(ValueError, match=r"^unknown model 'vit'; expected mlp or cnn$"):
        build_model(ModelConfig(name="vit"), NormConfig())
    with pytest.raises(ValueError, match=r"^unknown norm 'rmsnorm'$"):
        build_model(ModelConfig(), NormConfig(name="rmsnorm"))


@pytest.mark.parametrize("images", [False, True], ids=["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["syncbn", "bn", "bn-ghost", "layernorm", "groupnorm"])
def test_every_norm_layer_takes_the_configured_eps_and_momentum(norm, images):
    name, ghost = norm.split("-")[0], 2 if norm.endswith("ghost") else None
    layer = make_norm(NormConfig(name=name, eps=0.25, momentum=0.375, num_groups=2, ghost_slices=ghost), 8, images)
    assert layer.eps == 0.25
    if name in ("syncbn", "bn"):
        assert layer.momentum == 0.375


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_dropout_follows_each_hidden_layer_only_when_asked(model, dropout):
    network = build_model(ModelConfig(name=model, hidden=[10, 20], dropout=dropout), NormConfig(name="none"))
    assert [m.p for m in network if isinstance(m, nn.Dropout)] == ([dropout] * 2 if dropout else [])


@pytest.mark.parametrize("overrides", [("sweep.norms=[syncbn]",), ("sweep.norms=[layernorm]", "norm.eps=0.5"),
                                       ("sweep.norms=[bn,groupnorm]", "norm.eps=0.5", "norm.num_groups=5")],
                         ids=["one-block", "one-block-eps", "two-blocks-eps"])
def test_members_in_any_layout_compute_their_standalone_networks_outputs(overrides):
    """One norm block (the fused model's shortcut) or several, and an eps other than torch's."""
    config = sweep_config(*overrides)
    fused, images = build_network(config), torch.rand(8, 1, 28, 28, dtype=torch.float64)
    logits = fused(images)
    for index, member in enumerate(members(config)):
        torch.testing.assert_close(logits[index], standalone(config, member)(images), rtol=0, atol=1e-12)


def test_a_single_run_is_its_standalone_network_in_the_configured_dtype():
    config = compose_config("norm=bn", "norm.eps=0.5", "model.hidden=[20]", "train.dtype=float64")
    network = build_network(config)
    assert isinstance(network, nn.Sequential) and next(network.parameters()).dtype == torch.float64
    assert [type(m) for m in network] == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert network[2].eps == 0.5


@pytest.mark.parametrize("overrides", [[], ["model=cnn"], ["model=cnn", "model.hidden=[4,8,8,16]"], ["norm=none"],
                                       ["+experiment=weight_scale_sweep"], ["model.hidden=[7,300]", "norm=layernorm"]])
def test_the_footprint_counts_the_parameters_the_job_builds_and_their_bytes(overrides):
    """An upper bound by at most two values per width (a norm's weight and bias, there or not)."""
    config = compose_config(*overrides)
    built = sum(p.numel() for p in build_network(config).parameters())
    params, need = models.footprint(config, world_size=1)
    slack = 2 * (sum(config.model.hidden) + 10) * len(members(config))
    assert built <= params <= built + slack
    assert need >= 4 * 4 * params, "parameters, gradients and two optimizer states, in float32"


def test_a_model_this_machine_cannot_hold_is_refused_naming_the_size_and_the_ranks():
    config = compose_config("model.hidden=[4096,4096]")
    params, need = models.footprint(config, world_size=2)
    models.check(config, 2, 2, available=2 * (models.PROCESS_BYTES + need))
    models.check(config, 2, 2, available=None)
    with pytest.raises(ConfigError, match=rf"^2 rank\(s\) on this machine of a model of {params:,} parameters "
                                          r"\(model.hidden=\[4096, 4096\]\) need about 1.3 GiB, more than the 1.3 GiB of memory free here: "
                                          r"fewer ranks or a smaller model$"):
        models.check(config, 2, 2, available=2 * (models.PROCESS_BYTES + need) - 1)


def test_a_cnn_deeper_than_its_image_is_refused_and_four_layers_fit():
    assert build_network(compose_config("model=cnn", "model.hidden=[4,4,4,4]"))(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    models.check(compose_config("model=cnn", "model.hidden=[4,4,4,4]"), 1, 1, None)
    with pytest.raises(ConfigError, match=r"^model=cnn halves its 28x28 input in every layer \(28, 14, 7, 3, 1\): "
                                          r"model.hidden may list at most 4 widths, got 5$"):
        models.check(compose_config("model=cnn", "model.hidden=[4,4,4,4,4]"), 1, 1, None)
