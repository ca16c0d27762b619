"""syncbn.precise_bn: every BatchNorm layer's running statistics become the population mean and unbiased
variance of its inputs over the whole data, each layer's inputs taken with the layers before it on
their new statistics (eval mode), the ranks' shards merged exactly: over 2, 3 and 4 Gloo ranks with
uneven shards and a rank with none, equal to one process's over the whole set (float64, 1e-12)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from syncbn import SyncBatchNorm, precise, precise_bn

PRECISE = dict(rtol=1e-12, atol=1e-12)
SIZES = (5, 3, 7, 1, 6, 4, 2, 8, 1)  # the whole set's batches, 37 samples
SHARDS = {  # which of those batches each rank holds
    1: [list(range(9))], 2: [[0, 2, 4, 6, 8], [1, 3, 5, 7]], 3: [[], [0, 1, 2, 3, 4, 5], [6, 7, 8]],
    4: [[0, 4], [1, 5, 8], [2, 6], [3, 7]],
}


def mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    """Linear, BN, ReLU twice; the second BN's inputs depend on the first's statistics. The running
    statistics start far from the population's, so a layer measured with the old ones would differ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), SyncBatchNorm(5), nn.ReLU(), nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU())
    for layer in (model[1], model[4]):
        layer.running_mean.fill_(3.0)
        layer.running_var.fill_(0.25)
    return model.to(dtype)


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3),
                         SyncBatchNorm(4), nn.Flatten()).double()


MODELS = {"mlp": (mlp, (6,)), "cnn": (cnn, (2, 5, 5))}


def data(shape: tuple) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(size, *shape, generator=gen, dtype=torch.float64) * 2 + 1.5 for size in SIZES]


def population(model: nn.Module, inputs: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One process, the whole set at once, layer after layer: each BN's inputs with the earlier BNs set
    to their population statistics, its mean and unbiased variance per channel."""
    model.eval()
    stats = {}
    with torch.no_grad():
        for name, layer in model.named_children():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                values = inputs.transpose(0, 1).reshape(inputs.size(1), -1)
                stats[name] = values.mean(1), values.var(1, unbiased=True)
                layer.running_mean.copy_(stats[name][0])
                layer.running_var.copy_(stats[name][1])
            inputs = layer(inputs)
    return stats


def precise_on_rank(model_name: str, shards: list) -> dict:
    build, shape = MODELS[model_name]
    model, batches = build(), data(shape)
    mine = [batches[index] for index in shards[dist.get_rank()]]
    counts = precise_bn(model, mine)
    return dict(counts=counts, stats={name: (m.running_mean, m.running_var) for name, m in model.named_children()
                                      if isinstance(m, nn.modules.batchnorm._BatchNorm)})


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_over_ranks_it_is_one_process_population_of_the_whole_set(gloo_group, world_size, model_name):
    build, shape = MODELS[model_name]
    expected = population(build(), torch.cat(data(shape)))
    ranks = gloo_group(world_size).run(precise_on_rank, model_name, SHARDS[world_size])
    for rank, result in enumerate(ranks):
        assert result["counts"].keys() == expected.keys()
        for name, (mean, var) in expected.items():
            torch.testing.assert_close(result["stats"][name][0], mean, **PRECISE, msg=f"rank {rank} {name} mean")
            torch.testing.assert_close(result["stats"][name][1], var, **PRECISE, msg=f"rank {rank} {name} var")
            for theirs, ours in zip(result["stats"][name], ranks[0]["stats"][name]):
                assert torch.equal(theirs, ours), "every rank the same bits"
    values = {"mlp": {"1": 37, "4": 37}, "cnn": {"1": 37 * 5 * 5, "4": 37 * 3 * 3}}  # per channel: N x H x W
    assert all(result["counts"] == values[model_name] for result in ranks)


@pytest.mark.parametrize("model_name", MODELS)
def test_in_one_process_it_is_the_population_and_changes_nothing_else(model_name):
    """Weights, num_batches_tracked and every module's mode as they were; a DataLoader's (input,
    label) batches, reshuffled each pass, give the same population."""
    build, shape = MODELS[model_name]
    inputs = torch.cat(data(shape))
    expected, model = population(build(), inputs), build().train()
    model[0].eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    loader = DataLoader(TensorDataset(inputs, torch.zeros(len(inputs))), batch_size=5, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    counts = precise_bn(model, loader)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(model.get_submodule(name).running_mean, mean, **PRECISE)
        torch.testing.assert_close(model.get_submodule(name).running_var, var, **PRECISE)
    for name, value in model.state_dict().items():
        if not name.endswith(("running_mean", "running_var")):
            assert torch.equal(value, before[name]), f"{name} changed"
    assert [m.training for m in model] == [False] + [True] * (len(model) - 1)
    assert set(counts) == set(expected)


def test_each_layer_sees_its_inputs_at_inference_not_those_of_batch_statistics():
    """torch's update_bn (train mode, one pass, the cumulative average of the batches' statistics)
    agrees only on the first layer's mean, over equal batches, whose inputs no BN precedes: its
    variance is the batches' average variance, without the spread of their means; and the second
    layer's inputs were normalized by each batch's own statistics, not the first layer's population."""
    inputs = torch.cat(data((6,))).split(6)[:6]  # six batches of 6
    ours, theirs = mlp(), mlp()
    precise_bn(ours, inputs)
    update_bn(inputs, theirs)
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean, **PRECISE)
    assert not torch.allclose(ours[1].running_var, theirs[1].running_var, rtol=1e-6)
    assert not torch.allclose(ours[4].running_mean, theirs[4].running_mean, rtol=1e-3)


def test_a_ddp_module_is_measured_through_its_network(gloo_group):
    for result in gloo_group(2).run(ddp_on_rank):
        torch.testing.assert_close(result[0], result[1], **PRECISE)


def ddp_on_rank() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = data((6,))
    model = DistributedDataParallel(mlp(), broadcast_buffers=False)
    precise_bn(model, inputs[dist.get_rank() :: 2])
    return model.module[4].running_var, population(mlp(), torch.cat(inputs))["4"][1]


def test_a_float32_model_gets_its_float32_inputs_population_to_float32_rounding():
    """The moments are float64 whatever the model's dtype; the inputs themselves are the float32
    layers' (which round differently by batch size): the margin is float32's, 1e-5 relative."""
    inputs = data((6,))
    model, expected = mlp(torch.float32), population(mlp(torch.float32), torch.cat(inputs).float())
    precise_bn(model, [x.float() for x in inputs])
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(model.get_submodule(name).running_var, var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.get_submodule(name).running_mean, mean, rtol=1e-5, atol=1e-6)


class Unused(nn.Module):
    """A BN without running statistics (it uses batch statistics in eval too), one with, one never called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3))
        self.unused = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_layers_without_running_statistics_or_never_called_are_left_alone():
    model = Unused().double()
    counts = precise_bn(model, [x for x in data((6,)) if len(x) > 1])  # batch statistics need 2 values
    assert counts == {"body.2": 35}
    assert torch.equal(model.unused.running_mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(model.unused.running_var, torch.ones(3, dtype=torch.float64))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.norm(x))


def test_bad_uses_are_refused_naming_what_is_wrong():
    with pytest.raises(ValueError, match=r"^syncbn.precise_bn: the forward calls BatchNorm layer 'norm' 2 times; "):
        precise_bn(Twice(), [torch.randn(3, 4)])
    with pytest.raises(TypeError, match=r"must be iterable again for each layer .* one-shot iterator \(generator\)"):
        precise_bn(mlp(), (x for x in data((6,))))
    with pytest.raises(TypeError, match=r"^syncbn.precise_bn: each batch must be an input tensor, or a tuple or list "
                                        r"whose first item is one, got dict$"):
        precise_bn(mlp(), [{"x": torch.randn(2, 6)}])
    with pytest.raises(ValueError, match=r"^syncbn.precise_bn: BatchNorm layer '1' received 1 value\(s\) per channel "):
        precise_bn(mlp(), [torch.randn(1, 6, dtype=torch.float64)])


def bad_batch_on_rank() -> str:
    batches = [{"x": 1}] if dist.get_rank() == 1 else data((6,))
    try:
        precise_bn(mlp(), batches)
    except TypeError as error:
        return str(error)
    return "no error"


def test_one_ranks_bad_batch_is_every_ranks_error_not_a_hang(gloo_group):
    for message in gloo_group(2).run(bad_batch_on_rank):
        assert message.startswith("syncbn.precise_bn: each batch must be an input tensor")


def wrong_shape_on_rank(where: str) -> str:
    """Rank 1 holds a batch of 7 features for a network of 6: first, or after a good one."""
    good = data((6,))
    wrong = torch.randn(4, 7, dtype=torch.float64)
    batches = ([wrong, *good] if where == "first" else [*good, wrong]) if dist.get_rank() == 1 else good
    try:
        precise_bn(mlp(), batches)
    except RuntimeError as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.parametrize("where", ["first", "later"])
def test_a_batch_one_rank_cannot_run_is_every_ranks_error_wherever_it_is(gloo_group, where):
    """Found trying it: a wrong shape (torch's RuntimeError) on one rank left the other waiting in the
    collective until the process group's timeout; now each rank raises at once (the group here
    would time out after 20 s: the test's call fails at 60). Found in the first batch, every rank
    raises its message; in a later one, the others say which rank could not."""
    theirs, mine = gloo_group(2).run(wrong_shape_on_rank, where)
    assert "mat1 and mat2 shapes cannot be multiplied" in mine
    if where == "first":  # found while the ranks agree on the layers' order: its message travels with it
        assert theirs == mine
    else:
        assert theirs == "RuntimeError: syncbn.precise_bn: rank(s) [1] could not run their batches (their error says why)"


class ByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.norm = nn.Linear(6, 4).double(), nn.BatchNorm1d(4).double()

    def forward(self, x):
        return self.norm(input=self.linear(x))


def test_a_layer_called_with_its_input_by_keyword_and_no_batch_anywhere():
    model, inputs = ByKeyword(), torch.cat(data((6,)))
    precise_bn(model, list(inputs.split(5)))
    with torch.no_grad():
        expected = model.linear(inputs)
    torch.testing.assert_close(model.norm.running_mean, expected.mean(0), **PRECISE)
    with pytest.raises(ValueError, match=r"^syncbn.precise_bn: no rank has a batch: the statistics would be left as "
                                         r"they were$"):
        precise_bn(model, [])


class Branches(nn.Module):
    """Two branches, each Linear then BatchNorm, side by side; then a BatchNorm of their sum (it
    depends on both); ``between`` sits between the branches and the last layer (a NaN-hiding op, a
    NaN-refusing check)."""

    def __init__(self, between=lambda x: x):
        super().__init__()
        torch.manual_seed(2)
        self.left, self.right = nn.Linear(6, 4), nn.Linear(6, 4)
        self.bn_left, self.bn_right, self.bn_out = nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        self.between = between
        for layer in (self.bn_left, self.bn_right, self.bn_out):
            layer.running_mean.fill_(3.0)
            layer.running_var.fill_(0.25)
        self.double()

    def forward(self, x):
        return self.bn_out(self.between(self.bn_left(self.left(x)) + self.bn_right(self.right(x))))


def branches_population(model: Branches, inputs: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    model.eval()
    with torch.no_grad():
        stats = {}
        for name, pre in (("bn_left", model.left), ("bn_right", model.right)):
            values = pre(inputs)
            stats[name] = values.mean(0), values.var(0)
        new = {name: nn.functional.batch_norm(getattr(model, name.replace("bn_", ""))(inputs), *stats[name],
                                              getattr(model, name).weight, getattr(model, name).bias)
               for name in ("bn_left", "bn_right")}
        values = model.between(new["bn_left"] + new["bn_right"])
        stats["bn_out"] = values.mean(0), values.var(0)
    return stats


def counted(batches: list[torch.Tensor]) -> tuple[list[int], object]:
    passes = [0]

    class Passes:
        def __iter__(self):
            passes[0] += 1
            return iter(batches)

    return passes, Passes()


# iter(batches) calls: the one-shot check, the first batch (call order, NaN probe), then the passes
@pytest.mark.parametrize("between,passes,levels", [
    (lambda x: x, 2 + 2 + 1, [0, 0, 1]),  # 2 levels, the check
    (lambda x: torch.nan_to_num(x, nan=0.0), 2 + 1 + 1 + 1, [0, 0, 0]),  # one level (the probe misses bn_out's inputs), the check, bn_out again
], ids=["branches", "nan-hidden"])
def test_layers_no_other_feeds_are_measured_in_one_pass_and_checked(between, passes, levels):
    """Sibling layers (two branches) share a pass; the layer after them, one more. A probe that misses
    a dependency (the NaN hidden on the way) is caught by the check pass, and the layers from there
    are measured again: the population either way (float64, 1e-12)."""
    inputs = torch.cat(data((6,)))
    expected = branches_population(Branches(between), inputs)
    model = Branches(between)
    assert precise._levels(model.eval(), inputs[:5], ["bn_left", "bn_right", "bn_out"]) == levels
    count, batches = counted(list(inputs.split(5)))
    precise_bn(model, batches)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(getattr(model, name).running_mean, mean, **PRECISE, msg=name)
        torch.testing.assert_close(getattr(model, name).running_var, var, **PRECISE, msg=name)
    assert count[0] == passes


def test_a_network_that_refuses_nan_is_measured_one_layer_at_a_time():
    def finite_only(x):
        if not torch.isfinite(x).all():
            raise RuntimeError("not finite")
        return x

    inputs = torch.cat(data((6,)))
    expected = branches_population(Branches(finite_only), inputs)
    model = Branches(finite_only)
    assert precise._levels(model.eval(), inputs[:5], ["bn_left", "bn_right", "bn_out"]) == [0, 1, 2]
    count, batches = counted(list(inputs.split(5)))
    precise_bn(model, batches)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(getattr(model, name).running_mean, mean, **PRECISE, msg=name)
    assert count[0] == 2 + 3, "one pass a layer, and no check"
