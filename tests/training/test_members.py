"""The fused model of a job's members: each member starts from its standalone network's weights and
computes its outputs, gradients and running statistics; members cannot reach one another."""

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from app import compose_config

from syncbn.training.config import members
from syncbn.training.members import MemberMLP, build_network
from syncbn.training.models import build_model


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
