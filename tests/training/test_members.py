"""The fused models of a job's members, MLP and CNN: each member starts from its standalone
network's weights and computes its outputs, gradients and running statistics (float64, 1e-12);
members cannot reach one another; per-rank BN members of slices are GhostBatchNorm's ranks."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from app import compose_config

from syncbn import GhostBatchNorm
from syncbn.training.config import members
from syncbn.training.fused import SliceBatchNorm
from syncbn.training.members import MemberCNN, MemberMLP, build_network, max_pool2x2
from syncbn.training.models import build_model

MODELS = {"mlp": ("model.hidden=[20,30]",), "cnn": ("model=cnn", "model.hidden=[4,6]", "norm.num_groups=2")}


def sweep_config(model: str = "mlp", *overrides: str):
    """Five norms x 2 scales x 2 seeds on a small MLP or CNN, in float64."""
    return compose_config("sweep.norms=[syncbn,bn,none,layernorm,groupnorm]", "sweep.weight_scales=[0.1,0.02]",
                          "sweep.seeds=[0,3]", "train.dtype=float64", *MODELS[model], *overrides)


def standalone(config, member, ghost_slices: int | None = None) -> torch.nn.Module:
    """The network a single run of ``member`` builds (per-rank BN of ``ghost_slices`` emulated ranks)."""
    torch.manual_seed(member.seed)
    return build_model(replace(config.model, weight_scale=member.weight_scale),
                       replace(config.norm, name=member.norm, ghost_slices=ghost_slices), config.train.dtype)


def member_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    size = logits.size(0)
    return F.cross_entropy(logits.flatten(0, 1), labels.repeat(size), reduction="none").view(size, -1).mean(1).sum()


def member_gradients(fused, index: int) -> list[torch.Tensor]:
    """Member ``index``'s gradients, shaped and ordered as its standalone network's parameters."""
    grads = copy.deepcopy(fused)
    with torch.no_grad():
        for parameter, original in zip(grads.parameters(), fused.parameters()):
            parameter.copy_(original.grad)
    return list(grads.member_network(index).parameters())


def assert_members_are_their_networks(fused, singles, images, labels):
    """Every member's outputs, gradients and running statistics after a step, then eval: its network's."""
    logits = fused(images)
    member_losses(logits, labels).backward()
    for index, single in enumerate(singles):
        output = single(images)
        F.cross_entropy(output, labels).backward()
        torch.testing.assert_close(logits[index], output, rtol=0, atol=1e-12)
        for mine, theirs in zip(member_gradients(fused, index), single.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs.grad, rtol=0, atol=1e-12)
        mine, theirs = fused.member_network(index).state_dict(), single.state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-12)
    fused.eval()
    evaluated = fused(images)
    for index, single in enumerate(singles):
        torch.testing.assert_close(evaluated[index], single.eval()(images), rtol=0, atol=1e-12)


@pytest.mark.parametrize("model,fused_class", [("mlp", MemberMLP), ("cnn", MemberCNN)])
def test_every_member_starts_from_its_single_runs_weights_and_computes_its_outputs_and_gradients(model, fused_class):
    config = sweep_config(model)
    fused = build_network(config)
    assert isinstance(fused, fused_class) and len(fused.members) == 20
    singles = [standalone(config, member) for member in members(config)]
    for index, single in enumerate(singles):
        mine, theirs = fused.member_network(index).state_dict(), single.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), index
    images, labels = torch.rand(16, 1, 28, 28, dtype=torch.float64), torch.arange(16) % 10
    assert_members_are_their_networks(fused, singles, images, labels)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_per_rank_bn_members_of_slices_are_ghost_batchnorms_ranks_and_export_as_one_ranks_network(model):
    """A member of slices of b samples, at batch 16: the single run emulating 16 / b ranks."""
    config = sweep_config(model, "sweep.norms=[syncbn,bn]", "sweep.bn_slices=[16,8,4,2]", "norm.momentum=0.3")
    fused = build_network(config)
    assert [m.bn_slice for m in fused.members] == [None] * 4 + [16] * 4 + [8] * 4 + [4] * 4 + [2] * 4
    singles = [standalone(config, m, 16 // m.bn_slice if m.bn_slice else None) for m in members(config)]
    assert isinstance(singles[-1][2 if model == "mlp" else 1], GhostBatchNorm)
    exported = fused.member_network(len(fused.members) - 1)
    assert type(exported[2 if model == "mlp" else 1]) is (nn.BatchNorm1d if model == "mlp" else nn.BatchNorm2d)
    images, labels = torch.rand(16, 1, 28, 28, dtype=torch.float64), torch.arange(16) % 10
    assert_members_are_their_networks(fused, singles, images, labels)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_member_with_non_finite_weights_changes_no_other_members_outputs_or_gradients(model):
    config = sweep_config(model, "sweep.bn_slices=[8,4]")
    images, labels = torch.rand(16, 1, 28, 28, dtype=torch.float64), torch.arange(16) % 10

    def step(network):
        logits = network(images)
        member_losses(logits, labels).backward()
        return logits.detach()

    clean, poisoned = build_network(config), build_network(config)
    size = len(poisoned.members)
    broken = [index for index, member in enumerate(poisoned.members) if member.norm in ("syncbn", "layernorm")][:1]
    broken += [index for index, member in enumerate(poisoned.members) if member.bn_slice == 4][:1] + [size - 1]
    tensors = poisoned.member_tensors()
    with torch.no_grad():
        for index in broken:
            tensors[0][0][index][0] = float("nan")  # the first layer's weights into its first unit
            tensors[-2][0][index][1] = float("inf")  # the classifier's weights into its second logit
    clean_logits, logits = step(clean), step(poisoned)
    others = [index for index in range(size) if index not in broken]
    assert all(not logits[index].isfinite().all() for index in broken)
    assert torch.equal(logits[others], clean_logits[others])
    for index in others:
        mine, theirs = member_gradients(poisoned, index), member_gradients(clean, index)
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True)), index


def test_member_dropout_is_off_in_eval_and_on_in_training():
    """Eval: every member's output is its standalone network's in eval mode, call after call. Train:
    dropout draws a new mask each call."""
    for model in ("mlp", "cnn"):
        config = sweep_config(model, "model.dropout=0.5")
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
    fused = build_network(sweep_config("cnn", "model.dropout=0.5")).train(training)
    for index in (0, len(fused.members) - 1):
        assert {module.training for module in fused.member_network(index).modules()} == {training}


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("overrides", [("sweep.norms=[syncbn]",), ("sweep.norms=[layernorm]", "norm.eps=0.5"),
                                       ("sweep.norms=[bn,groupnorm]", "norm.eps=0.5", "norm.num_groups=2"),
                                       ("sweep.norms=[bn]", "sweep.bn_slices=[4]")],
                         ids=["one-block", "one-block-eps", "two-blocks-eps", "one-block-of-slices"])
def test_members_in_any_layout_compute_their_standalone_networks_outputs(overrides, model):
    """One norm block (the fused model's shortcut) or several, and an eps other than torch's."""
    config = sweep_config(model, *overrides)
    fused, images = build_network(config), torch.rand(8, 1, 28, 28, dtype=torch.float64)
    logits = fused(images)
    for index, member in enumerate(members(config)):
        network = standalone(config, member, 8 // member.bn_slice if member.bn_slice else None)
        torch.testing.assert_close(logits[index], network(images), rtol=0, atol=1e-12)


def test_a_single_run_is_its_standalone_network_in_the_configured_dtype():
    config = compose_config("norm=bn", "norm.eps=0.5", "model.hidden=[20]", "train.dtype=float64")
    network = build_network(config)
    assert isinstance(network, nn.Sequential) and next(network.parameters()).dtype == torch.float64
    assert [type(m) for m in network] == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert network[2].eps == 0.5


def test_slices_of_a_batch_they_do_not_divide_are_refused_and_an_empty_batch_is_batchnorms():
    layer = SliceBatchNorm(3, 4)
    with pytest.raises(ValueError, match=r"^slices of 4 samples need a batch divisible by 4, got 6$"):
        layer(torch.rand(6, 3))
    reference, empty = nn.BatchNorm1d(3), torch.empty(0, 3)
    torch.testing.assert_close(layer(empty), reference(empty))
    assert torch.equal(layer.running_mean, reference.running_mean) and layer.num_batches_tracked == 1
    assert layer.eval()(torch.rand(6, 3)).shape == (6, 3), "eval normalizes with the running statistics, any batch"


@pytest.mark.parametrize("shape,message", [((4,), r"expects input of shape \(N, C, \*\) with at least 2 dimensions"),
                                           ((4, 5), r"^SliceBatchNorm\(3\) expects 3 channels in dim 1")])
def test_slices_check_the_input_as_batchnorm_does_before_they_normalize_it(shape, message):
    with pytest.raises(ValueError, match=message):
        SliceBatchNorm(3, 2)(torch.rand(shape))


@pytest.mark.parametrize("shape", [(3, 5, 8, 6), (2, 4, 7, 6), (2, 4, 6, 5)], ids=["even", "odd-height", "odd-width"])
def test_the_fused_cnns_pool_is_max_pool_bit_for_bit_with_ties_nan_and_infinities(shape):
    """Without a gradient (evaluation) it is two elementwise maxima; with one, ATen's max-pool, whose
    backward gives a tie's gradient to its first value (the maxima would split it)."""
    x = torch.randn(shape)
    x[0, 0, :2, :2] = 1.5  # a window of ties
    x[0, 1, 0, 1], x[1, 0, 1, 1], x[1, 1, 0, 0] = float("nan"), float("inf"), -float("inf")
    with torch.no_grad():
        assert torch.equal(max_pool2x2(x).nan_to_num(7.0), F.max_pool2d(x, 2).nan_to_num(7.0))
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    gradient = torch.randn_like(F.max_pool2d(x, 2))
    max_pool2x2(mine).backward(gradient)
    F.max_pool2d(theirs, 2).backward(gradient)
    assert torch.equal(mine.grad.nan_to_num(7.0), theirs.grad.nan_to_num(7.0))


def grouped_layer_on_rank(x: torch.Tensor, dy: torch.Tensor, group_size: int) -> dict:
    """SyncBatchNorm(group_size) on this rank's interleaved slice of the batch (samples r, r + W, ...)."""
    import torch.distributed as dist

    from syncbn import SyncBatchNorm

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    layer = SyncBatchNorm(x.size(1), momentum=0.3, group_size=group_size).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    mine = x[rank::world].clone().requires_grad_()
    out = layer(mine)
    out.backward(dy[rank::world])
    return dict(out=out.detach(), grad=mine.grad, weight_grad=layer.weight.grad, running_mean=layer.running_mean,
                running_var=layer.running_var)


@pytest.mark.parametrize("group,size", [(2, 3), (4, 2), (1, 3)])
def test_slices_in_bn_groups_are_synchronized_batchnorm_of_that_group_size_on_as_many_ranks(gloo_group, group, size):
    """A batch of 4 slices of ``size`` samples (4 ranks), groups of ``group`` slices: outputs, input and
    weight gradients as SyncBatchNorm(group_size=group) gives on 4 real ranks each holding its slice,
    and the running statistics as rank 0's (float64, 1e-12)."""
    torch.manual_seed(1)
    x, dy = torch.randn(4 * size, 3, dtype=torch.float64) * 3 + 1, torch.randn(4 * size, 3, dtype=torch.float64)
    ranks = gloo_group(4).run(grouped_layer_on_rank, x, dy, group)
    torch.manual_seed(0)
    layer = SliceBatchNorm(3, size, momentum=0.3, group=group).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    mine = x.clone().requires_grad_()
    out = layer(mine)
    out.backward(dy)
    for r, rank in enumerate(ranks):
        torch.testing.assert_close(out[r::4].detach(), rank["out"], rtol=0, atol=1e-12)
        torch.testing.assert_close(mine.grad[r::4], rank["grad"], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, sum(rank["weight_grad"] for rank in ranks), rtol=0, atol=1e-12)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layer, name), ranks[0][name], rtol=0, atol=1e-12)


def test_groups_of_slices_a_batch_they_do_not_divide_are_refused_naming_both_sizes():
    with pytest.raises(ValueError, match=r"^groups of 2 slices of 3 samples need a batch divisible by 6, got 9$"):
        SliceBatchNorm(3, 3, group=2)(torch.rand(9, 3))


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_grouped_syncbn_members_normalize_each_group_of_slices_alone(model):
    """A member of groups of k slices of b samples is the standalone network whose BatchNorms see each
    group's samples alone: the batch of 16 run group by group through a network in train mode equals
    the member's rows (float64, 1e-12); the whole-batch syncbn member stays the plain network."""
    config = sweep_config(model, "sweep.norms=[syncbn]", "sweep.bn_slices=[2,4,8]", "sweep.bn_groups=[2]",
                          "train.global_batch_size=16")
    assert [(m.bn_slice, m.bn_group) for m in members(config)] == [(None, None)] * 4 + [(2, 2)] * 4 + [(4, 2)] * 4, "no group as large as the batch"
    fused, images = build_network(config), torch.rand(16, 1, 28, 28, dtype=torch.float64)
    logits = fused(images)
    for index, member in enumerate(members(config)):
        network = standalone(config, replace(member, norm="bn"))
        if member.bn_slice is None:
            torch.testing.assert_close(logits[index], network(images), rtol=0, atol=1e-12)
            continue
        slices = 16 // member.bn_slice
        for group in range(slices // member.bn_group):
            rows = [i for i in range(16) if (i % slices) // member.bn_group == group]
            torch.testing.assert_close(logits[index][rows], network(images[rows]), rtol=0, atol=1e-12)
