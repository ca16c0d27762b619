"""convert_sync_batchnorm and revert_sync_batchnorm: what they swap, what they keep, what they refuse."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn as nn

from syncbn import GhostBatchNorm, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from syncbn.cost import GLOO, NCCL, CostModel


def test_convert_and_revert_keep_parameters_buffers_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3)),
        nn.BatchNorm3d(3, affine=False, momentum=None),
    )
    model[1].eval()
    before = {name: t for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    inputs = [torch.randn(4, 3), torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.randn(4, 3, 2, 2, 2)]
    layers = [model[0], model[1][0], model[1][1], model[2]]
    expected = [layer(x) for layer, x in zip(layers, inputs[:2])]

    converted = convert_sync_batchnorm(model)
    layers = [converted[0], converted[1][0], converted[1][1], converted[2]]
    assert all(type(layer) is SyncBatchNorm for layer in layers)
    assert [layer.training for layer in layers] == [True, False, False, True]
    assert (layers[2].momentum, layers[3].affine, layers[3].momentum) == (0.1, False, None)
    after = dict(itertools.chain(converted.named_parameters(), converted.named_buffers()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert torch.equal(layers[1](inputs[1]), expected[1])
    for layer, x in zip(layers, inputs):
        layer(x)

    reverted = revert_sync_batchnorm(converted)
    assert [type(m) for m in (reverted[0], reverted[1][0], reverted[1][1], reverted[2])] == [
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm3d]
    restored = dict(itertools.chain(reverted.named_parameters(), reverted.named_buffers()))
    assert all(restored[k] is before[k] for k in before)
    reverted[0].eval()
    layers[0].eval()
    x = torch.randn(4, 3)
    assert torch.equal(reverted[0](x), layers[0](x))


def test_convert_hands_the_process_group_to_every_layer_and_leaves_ghost_batchnorm_alone():
    group = object()  # stands for a ProcessGroup: convert only passes it on
    ghost = GhostBatchNorm(3, slices=2)
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm2d(3)), ghost), group)
    assert [model[0].process_group, model[1][0].process_group] == [group, group]
    assert model[2] is ghost, "GhostBatchNorm emulates per-rank BN on purpose"
    reverted = revert_sync_batchnorm(model)
    assert [type(m) for m in (reverted[0], reverted[1][0], reverted[2])] == [nn.BatchNorm1d, nn.BatchNorm2d, GhostBatchNorm]


def test_revert_needs_a_known_shape():
    with pytest.raises(ValueError, match="run one forward pass first"):
        revert_sync_batchnorm(SyncBatchNorm(3))
    saw_6d = SyncBatchNorm(3)
    saw_6d(torch.randn(2, 3, 2, 1, 1, 2))
    with pytest.raises(ValueError, match="^no plain torch BatchNorm takes the 6D input this SyncBatchNorm last saw$"):
        revert_sync_batchnorm(saw_6d)


# The interface of the installed torch's nn.SyncBatchNorm, read from torch itself: an argument a new
# torch adds shows up here as a failure, not as a surprise to a user.
TORCH_PARAMETERS = inspect.signature(nn.SyncBatchNorm.__init__).parameters
FLAG_ARGUMENTS = [name for name, p in TORCH_PARAMETERS.items() if isinstance(p.default, bool)]


def test_every_constructor_argument_of_torchs_syncbatchnorm_is_ours_with_its_kind_and_default():
    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    assert list(ours) == [*TORCH_PARAMETERS, "collective", "cost_model", "group_size"], "torch's, in torch's order, then ours"
    assert ours["collective"].kind == ours["cost_model"].kind == inspect.Parameter.KEYWORD_ONLY
    for name, theirs in TORCH_PARAMETERS.items():
        assert (ours[name].kind, ours[name].default) == (theirs.kind, theirs.default), name


@pytest.mark.parametrize("flags", list(itertools.product((True, False), repeat=len(FLAG_ARGUMENTS))),
                         ids=lambda flags: "-".join(map(str, flags)))
def test_every_flag_combination_gives_torchs_attributes_state_dict_keys_and_outputs(flags):
    """The same attributes (ours has two more, for revert), parameters, buffers and state-dict keys,
    and in one process (no group) the same training and eval outputs and running statistics."""
    kwargs = dict(zip(FLAG_ARGUMENTS, flags))
    torch.manual_seed(0)
    theirs, ours = nn.SyncBatchNorm(3, **kwargs), SyncBatchNorm(3, **kwargs)
    assert vars(theirs).keys() - {"_forward_pre_hooks_with_kwargs"} <= vars(ours).keys()
    assert {k: getattr(ours, k) for k in ("num_features", "eps", "momentum", "affine", "track_running_stats")} == \
        {k: getattr(theirs, k) for k in ("num_features", "eps", "momentum", "affine", "track_running_stats")}
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    plain = nn.BatchNorm1d(3, **kwargs)  # what torch's layer computes without a group, on the CPU
    x = torch.randn(6, 3, dtype=torch.float64)
    ours, plain = ours.double(), plain.double()
    assert torch.equal(ours(x), plain(x))
    ours.eval(), plain.eval()
    assert torch.equal(ours(x), plain(x))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))


def test_convert_and_revert_carry_everything_torchs_convert_carries():
    """torch's convert keeps the parameters and buffers, the mode, the flags (a weight without a
    bias included) and ``qconfig``; so do ours, both ways."""
    model = nn.Sequential(nn.BatchNorm2d(3, bias=False), nn.BatchNorm1d(4, affine=False))
    model[0].qconfig = "a quantization config"
    model[1].eval()
    for converted in (convert_sync_batchnorm(model), nn.SyncBatchNorm.convert_sync_batchnorm(
            nn.Sequential(nn.BatchNorm2d(3, bias=False), nn.BatchNorm1d(4, affine=False)))):
        assert converted[0].bias is None and converted[0].weight is not None and converted[1].weight is None
    layers = convert_sync_batchnorm(model)
    assert layers[0].qconfig == "a quantization config" and not hasattr(layers[1], "qconfig")
    assert (layers[0].training, layers[1].training) == (True, False)
    reverted = revert_sync_batchnorm(layers)
    assert type(reverted[0]) is nn.BatchNorm2d and reverted[0].bias is None and reverted[0].qconfig == "a quantization config"
    assert not hasattr(reverted[1], "qconfig") and reverted[1].weight is None and not reverted[1].training


def test_convert_gives_every_layer_the_collective_and_cost_model_asked_for():
    """Layers without running statistics too: neither collective needs them."""
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(3, track_running_stats=False))
    converted = convert_sync_batchnorm(model, collective="all_reduce")
    assert (converted[0].collective, converted[1].collective) == ("all_reduce", "all_reduce")
    assert convert_sync_batchnorm(nn.BatchNorm1d(3)).collective == "auto"
    model = CostModel(all_gather=GLOO.all_reduce, all_reduce=GLOO.all_gather)
    converted = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(3, track_running_stats=False)),
                                       collective="auto", cost_model=model)
    assert (converted[0].collective, converted[1].collective) == ("auto", "auto")
    assert converted[0].cost_model is model and converted[1].cost_model is model
    assert convert_sync_batchnorm(nn.BatchNorm1d(3)).cost_model is None
    assert convert_sync_batchnorm(nn.BatchNorm1d(3), cost_model="nccl").cost_model is NCCL


@pytest.mark.parametrize("lazy", [nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d])
def test_a_lazy_batchnorm_is_refused_by_name_until_it_has_seen_an_input_then_converted(lazy):
    """Uninitialized, it has no channels (torch's convert makes a layer of 0 channels of it)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(lazy()))
    with pytest.raises(ValueError, match=rf"^convert_sync_batchnorm: {lazy.__name__} at '1.0' has not seen an input "
                                         "yet, so it has no channels to synchronize; run one forward pass before "
                                         "converting$"):
        convert_sync_batchnorm(model)
    assert isinstance(model[1][0], lazy), "nothing converted"
    with pytest.raises(ValueError, match=f"{lazy.__name__} at 'the root'"):
        convert_sync_batchnorm(lazy())
    sample = {nn.LazyBatchNorm1d: (2, 4), nn.LazyBatchNorm2d: (2, 4, 3, 3), nn.LazyBatchNorm3d: (2, 4, 2, 2, 2)}[lazy]
    model[1](torch.randn(sample))
    converted = convert_sync_batchnorm(model)[1][0]
    assert isinstance(converted, SyncBatchNorm) and converted.num_features == 4 and converted.running_mean.shape == (4,)


@pytest.mark.parametrize("arguments", [dict(collective="allreduce"), dict(cost_model="bogus")])
def test_convert_refuses_a_collective_or_cost_model_the_layer_cannot_take_even_with_nothing_to_convert(arguments):
    for model in (nn.Linear(2, 2), nn.BatchNorm1d(2)):
        with pytest.raises(ValueError, match="^SyncBatchNorm (collective|cost_model) must be "):
            convert_sync_batchnorm(model, **arguments)
