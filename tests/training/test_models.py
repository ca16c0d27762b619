import pytest
import torch
import torch.nn as nn
from app import compose_config

from syncbn import GhostBatchNorm, SyncBatchNorm
from syncbn.training import models
from syncbn.training.config import ConfigError, ModelConfig, NormConfig, members
from syncbn.training.members import build_network
from syncbn.training.models import build_model, make_norm

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
