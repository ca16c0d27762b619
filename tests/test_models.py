import pytest
import torch
import torch.nn as nn

from syncbn import GhostBatchNorm, SyncBatchNorm
from syncbn.config import ModelConfig, NormConfig
from syncbn.models import build_model

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
