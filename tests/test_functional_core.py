"""The functional core in this process, where mutmut sees it: alone (group None), through a Gloo
group of one (its collective path), and its traced branches run eagerly; Chan's merge of stacked
rank rows; the running statistics; the errors. test_functional.py runs it on real groups."""

from __future__ import annotations

import fractions
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from syncbn import comm, functional
from syncbn.counting import count_collectives


@pytest.mark.parametrize("count", [4, torch.tensor(4.0, dtype=torch.float64), 0, torch.tensor(0.0, dtype=torch.float64)],
                         ids=["eager", "compiled", "eager-empty", "compiled-empty"])
def test_running_statistics_move_by_momentum_and_stay_where_the_group_had_no_value(count):
    """As nn.BatchNorm: r = 0.9 r + 0.1 s with the unbiased variance; a group with no value (count 0:
    an int in eager, a tensor in the compiled graph, which has no branch) leaves them as they were."""
    running_mean, running_var = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    mean, var = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64)
    if int(count):
        mean, var = torch.tensor([5.0, 1.0], dtype=torch.float64), torch.tensor([0.75, 1.5], dtype=torch.float64)
    functional._update_running_stats(running_mean, running_var, mean, var, count, 0.1)
    if int(count):
        assert torch.allclose(running_mean, torch.tensor([1.4, -1.7]), rtol=0, atol=1e-6)
        assert torch.allclose(running_var, torch.tensor([2.8, 0.65]), rtol=0, atol=1e-6)
    else:
        assert torch.equal(running_mean, torch.tensor([1.0, -2.0])) and torch.equal(running_var, torch.tensor([3.0, 0.5]))


@pytest.mark.parametrize("count", [4, torch.tensor(4.0, dtype=torch.float64)], ids=["eager", "compiled"])
def test_float64_running_statistics_move_by_exactly_the_float64_momentum(count):
    """The momentum is not rounded through float32 on its way (0.1 is not a float32)."""
    running_mean, running_var = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([3.0, 0.5], dtype=torch.float64)
    mean, var = torch.tensor([5.0, 1.0], dtype=torch.float64), torch.tensor([0.75, 1.5], dtype=torch.float64)
    functional._update_running_stats(running_mean, running_var, mean, var, count, 0.1)
    assert torch.equal(running_mean, torch.tensor([1.0, -2.0], dtype=torch.float64).lerp(mean, 0.1))
    assert torch.equal(running_var, torch.tensor([3.0, 0.5], dtype=torch.float64).lerp(var * 4 / 3, 0.1))



# The core with group None, in this process: every step of the synchronized path (moments, merge,
# running statistics, the gathered-sum gradient) but the collective itself, which the Gloo tests run.
CORE_SHAPES = {"NC": (6, 3), "NCL": (5, 3, 4), "NCHW-channels_last": (4, 3, 3, 2), "NCDHW": (3, 2, 2, 3, 2)}
CORE_EXACT = dict(rtol=1e-10, atol=1e-10)  # float64, two summation orders


def core(x, running_mean, running_var, weight, bias, momentum):
    return functional.sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, 1e-5, None)


def batchnorm(x, running_mean, running_var, weight, bias, momentum):
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, 1e-5)


def one_step(run, shape: tuple, momentum: float, affine: bool, track: bool) -> dict:
    """One training step of ``run`` on values drawn from a fixed seed: output, gradients, statistics."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    if len(shape) == 4:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    weight = (1 + torch.rand(channels, generator=gen, dtype=torch.float64)).requires_grad_() if affine else None
    bias = torch.randn(channels, generator=gen, dtype=torch.float64).requires_grad_() if affine else None
    running_mean = torch.randn(channels, generator=gen, dtype=torch.float64) if track else None
    running_var = 1 + torch.rand(channels, generator=gen, dtype=torch.float64) if track else None
    x.requires_grad_()
    y = run(x, running_mean, running_var, weight, bias, momentum)
    y.backward(dy)
    return dict(y=y.detach(), dx=x.grad, dw=None if weight is None else weight.grad, db=None if bias is None else bias.grad,
                running_mean=running_mean, running_var=running_var, channels_last=len(shape) != 4 or
                y.is_contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("shape", list(CORE_SHAPES))
@pytest.mark.parametrize("momentum,affine,track", [(0.1, True, True), (1.0, False, True), (0.0, True, True),
                                                   (0.1, True, False)])
def test_the_core_alone_is_batchnorm_in_training(shape, momentum, affine, track):
    """Outputs, input/weight/bias gradients and running statistics (momentum 0 leaves them, 1 replaces
    them) as F.batch_norm's, float64 to 1e-10; the input's memory format kept."""
    ours, theirs = (one_step(run, CORE_SHAPES[shape], momentum, affine, track) for run in (core, batchnorm))
    assert ours.keys() == theirs.keys() and ours["channels_last"]
    for key in ("y", "dx", "dw", "db", "running_mean", "running_var"):
        if theirs[key] is None:
            assert ours[key] is None, key
        else:
            torch.testing.assert_close(ours[key], theirs[key], **CORE_EXACT, msg=key)


def test_an_empty_batch_alone_gives_an_empty_output_zero_gradients_and_keeps_the_statistics():
    x = torch.empty(0, 3, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.ones(3, dtype=torch.float64, requires_grad=True), torch.zeros(3, dtype=torch.float64, requires_grad=True)
    running_mean, running_var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    y = functional.sync_batch_norm(x, running_mean, running_var, weight, bias, 0.1, 1e-5, None)
    y.sum().backward()
    assert y.shape == (0, 3) and x.grad.shape == (0, 3)
    assert torch.equal(weight.grad, torch.zeros(3, dtype=torch.float64)) and torch.equal(bias.grad, weight.grad)
    assert torch.equal(running_mean, torch.tensor([1.0, 2.0, 3.0])) and torch.equal(running_var, torch.tensor([4.0, 5.0, 6.0]))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_one_value_per_channel_alone_is_torchs_error(shape):
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when training, got input size "
                                         rf"{re.escape(str(shape))} on this rank, 1 in the whole group$"):
        functional.sync_batch_norm(torch.randn(shape), None, None, None, None, 0.1, 1e-5, None)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_the_core_refuses_an_eps_that_is_not_positive(eps):
    with pytest.raises(ValueError, match=f"^batch_norm eps must be positive during training, but got {eps}$"):
        functional.sync_batch_norm(torch.randn(4, 3), None, None, None, None, 0.1, eps, None)


NO_SECOND_DERIVATIVE = (
    "SyncBatchNorm has no second derivative: its input gradient depends on every rank's batch through the gathered "
    "sums, which are not differentiated again (double backward, e.g. a gradient penalty through the layer, is not "
    "supported; the first derivative with create_graph=True is)")


@pytest.mark.parametrize("loss", ["cubic", "linear"])
@pytest.mark.parametrize("first,second", [("x", "backward"), ("x", "x"), ("x", "weight"), ("x", "after"),
                                          ("weight", "backward"), ("weight", "weight"), ("weight", "after")])
def test_the_core_alone_keeps_the_first_derivative_and_refuses_every_second(loss, first, second):
    """Through the incoming gradient (to a scale applied after the layer), the input or the weight
    (a linear loss's incoming gradient is otherwise a constant): asked for again, the first
    derivatives raise."""
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=first == "x" or second == "x")
    weight = torch.ones(3, dtype=torch.float64, requires_grad=True)
    constant, after = torch.randn(6, 3, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    losses = {"cubic": lambda y: ((after * y) ** 3).sum(), "linear": lambda y: (after * y * constant).sum()}
    run = lambda: losses[loss](functional.sync_batch_norm(x, None, None, weight, None, 0.1, 1e-5, None))  # noqa: E731
    to = {"x": x, "weight": weight}[first]
    kept, = torch.autograd.grad(run(), to, create_graph=True)
    plain, = torch.autograd.grad(run(), to)
    assert torch.equal(kept.detach(), plain) and kept.requires_grad
    with pytest.raises(RuntimeError) as refused:
        if second == "backward":
            (kept ** 2).sum().backward()
        else:
            torch.autograd.grad((kept ** 2).sum(), {"x": x, "weight": weight, "after": after}[second])
    assert str(refused.value) == NO_SECOND_DERIVATIVE


def test_first_derivatives_kept_for_a_second_pass_can_be_changed_in_place_as_torchs():
    """create_graph=True: clipping or scaling the gradients in place works, as with F.batch_norm."""
    for run in (lambda x, w: functional.sync_batch_norm(x, None, None, w, None, 0.1, 1e-5, None),
                lambda x, w: F.batch_norm(x, None, None, w, None, True)):
        x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
        weight = torch.ones(3, dtype=torch.float64, requires_grad=True)
        dx, dw = torch.autograd.grad((run(x, weight) ** 3).sum(), (x, weight), create_graph=True)
        dx.mul_(0.5)
        dw.clamp_(max=0.1)
        assert dx.requires_grad and dw.max() <= 0.1


@pytest.mark.parametrize("dtype,statistics", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_statistics_are_float32_or_float64_for_float64_input_and_the_output_keeps_the_dtype(dtype, statistics):
    """Also with the layer's parameters in the input's dtype (``SyncBatchNorm(...).half()``) and
    for an empty batch; every rank packs float64 rows for the all-gather, which needs one dtype."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    weight, bias = torch.ones(3, dtype=dtype, requires_grad=True), torch.zeros(3, dtype=dtype, requires_grad=True)
    assert functional.stat_dtype(dtype) == statistics
    y = functional.sync_batch_norm(x, None, None, weight, bias, 0.1, 1e-5, None)
    expected = F.batch_norm(x.detach().to(statistics), None, None, training=True).to(dtype)
    # Another summation order than F.batch_norm's kernel: equal to the output dtype's rounding
    # (torch's default tolerances for it), not bit for bit.
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert (x.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (dtype, dtype, dtype)
    empty = torch.empty(0, 3, dtype=dtype)
    assert functional.local_moments(empty).dtype == functional.local_moments(x.detach()).dtype == torch.float64
    assert all(s.dtype == statistics for s in functional._local_grad_sums(empty, empty, None, None, 1e-5))


def rows_of(chunks: list[torch.Tensor]) -> torch.Tensor:
    """What each rank packs for the all-gather: ``[count, mean..., biased var...]``, as a (W, 2C+1) tensor."""
    return torch.stack([functional.local_moments(chunk) for chunk in chunks])


@pytest.mark.parametrize("sizes", [(4, 4, 4), (3, 5, 1, 6), (0, 5, 3), (7, 0), (2, 2, 0)],
                         ids=["equal", "unequal", "empty-first", "empty-last", "equal-but-one-empty"])
def test_merged_moments_are_the_global_batchs_mean_and_biased_variance(sizes):
    """Chan's merge of every rank's rows (Gloo tests gather them; here they are stacked), far from
    zero where a sum of squares would cancel: mean 1e4, std 1, float64."""
    x = torch.randn(sum(sizes), 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1e4
    gathered = rows_of(list(x.split(list(sizes))))
    count, equal = functional.group_count(gathered, x)
    assert count == x.numel() // 3 and equal == (len(set(sizes)) == 1)
    var, mean = torch.var_mean(x, dim=(0, 2), correction=0)
    torch.testing.assert_close(functional.merge_moments(gathered, count, equal), torch.stack([mean, var]),
                               rtol=1e-12, atol=1e-9)


def test_a_group_with_no_value_merges_to_zero_mean_and_variance():
    gathered = rows_of([torch.empty(0, 3, dtype=torch.float64)] * 2)
    count, equal = functional.group_count(gathered, torch.empty(0, 3))
    assert (count, equal) == (0, True)
    assert torch.equal(functional.merge_moments(gathered, count, equal), torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(functional.merge_moments(gathered, count, False), torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("sizes", [(1, 0), (0, 1, 0), (1,)])
def test_one_value_in_the_whole_group_is_refused_naming_this_ranks_input(sizes):
    gathered = rows_of([torch.randn(n, 2) for n in sizes])
    with pytest.raises(ValueError, match=r"got input size \(5, 2\) on this rank, 1 in the whole group$"):
        functional.group_count(gathered, torch.randn(5, 2))


def test_the_values_per_channel_are_every_element_but_the_channels():
    assert type(functional.values_per_channel(torch.empty(4, 3, 5, 2))) is int
    assert functional.values_per_channel(torch.empty(4, 3, 5, 2)) == 40
    assert functional.values_per_channel(torch.empty(4, 0, 5)) == 0
    assert functional.values_per_channel(torch.empty(0, 3)) == 0


@pytest.fixture
def group_of_one():
    """This process as a Gloo group of one: the core's collective path (the all-gathers and what
    they feed) runs here, in the test process, where mutmut sees it."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def group_step(group, shape: tuple, momentum: float, affine: bool, track: bool) -> dict:
    return one_step(lambda *args: functional.sync_batch_norm(*args, 1e-5, group), shape, momentum, affine, track)


@pytest.mark.parametrize("shape", list(CORE_SHAPES))
@pytest.mark.parametrize("momentum,affine,track", [(0.1, True, True), (0.1, False, False)])
def test_through_a_group_of_one_the_core_gives_what_it_gives_alone_bit_for_bit(group_of_one, shape, momentum, affine,
                                                                                track):
    """An all-gather of one rank hands back its own rows: everything equals the group-None step exactly."""
    through_group = group_step(group_of_one, CORE_SHAPES[shape], momentum, affine, track)
    alone = one_step(core, CORE_SHAPES[shape], momentum, affine, track)
    for key, value in alone.items():
        assert (value is None and through_group[key] is None) or torch.equal(torch.as_tensor(value),
                                                                             torch.as_tensor(through_group[key])), key


@pytest.mark.parametrize("input_grad,backward", [(True, {"c10d::_allgather_base_": 1}), (False, {})])
def test_one_all_gather_forward_and_one_backward_only_when_the_input_needs_its_gradient(group_of_one, input_grad,
                                                                                        backward):
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=input_grad)
    weight = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with count_collectives() as forward:
        y = functional.sync_batch_norm(x, None, None, weight, None, 0.1, 1e-5, group_of_one)
    with count_collectives() as back:
        y.sum().backward()
    assert (dict(forward), dict(back)) == ({"c10d::_allgather_base_": 1}, backward)
    assert weight.grad is not None and (x.grad is not None) == input_grad


def test_a_collective_that_fails_names_the_phase_the_world_size_and_the_backends_last_line():
    error = comm._failed("backward", 4, RuntimeError("Gloo said\n  something\n[timeout] after 3000ms  "))
    assert str(error) == ("SyncBatchNorm backward: all_gather over 4 ranks failed, a rank stopped, died or took a "
                          "different path before joining it (process-group timeout / connection loss): [timeout] after 3000ms")
    assert str(comm._failed("forward", 2, RuntimeError(""))).endswith("connection loss): RuntimeError")


@pytest.fixture
def traced_branches(monkeypatch):
    """The branches the core takes while torch.compile traces it (no ``.item()``, the count a tensor,
    functional collectives), run eagerly: their math, here; tests/test_compile.py compiles them."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "group-of-one"])
@pytest.mark.parametrize("shape", list(CORE_SHAPES))
def test_the_traced_branches_are_batchnorm_in_training(request, traced_branches, grouped, shape):
    group = request.getfixturevalue("group_of_one") if grouped else None
    ours = group_step(group, CORE_SHAPES[shape], 0.1, True, True)
    theirs = one_step(batchnorm, CORE_SHAPES[shape], 0.1, True, True)
    for key in ("y", "dx", "dw", "db", "running_mean", "running_var"):
        torch.testing.assert_close(ours[key], theirs[key], **CORE_EXACT, msg=key)


def test_the_traced_branches_keep_the_statistics_of_an_empty_group_and_refuse_a_single_value(traced_branches):
    running_mean, running_var = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    y = functional.sync_batch_norm(torch.empty(0, 2), running_mean, running_var, None, None, 0.1, 1e-5, None)
    assert y.shape == (0, 2) and torch.equal(running_mean, torch.tensor([1.0, 2.0]))
    assert torch.equal(running_var, torch.tensor([3.0, 4.0]))
    with pytest.raises(RuntimeError, match="^Expected more than 1 value per channel when training, got 1 value per "
                                           "channel in the whole group$"):
        functional.sync_batch_norm(torch.randn(1, 2), None, None, None, None, 0.1, 1e-5, None)


EPS = torch.finfo(torch.float64).eps


def exact_variance(x: torch.Tensor) -> float:
    """The biased variance of float64 values in exact rational arithmetic, rounded once."""
    values = [fractions.Fraction(v) for v in x.tolist()]
    mean = sum(values) / len(values)
    return float(sum((v - mean) ** 2 for v in values) / len(values))


def first_round(parts: list[torch.Tensor]) -> torch.Tensor:
    """What the all-reduce's first round gives every rank: the ranks' ``[n, S1, S2]`` about 0, added."""
    return sum(torch.cat([m[:1], functional.shifted_sums(m, None)]) for m in map(functional.local_moments, parts))


def at_ratio(ratio: float, scale: float, world_size: int, seed: int) -> torch.Tensor:
    """world_size x 40 float64 values with mean^2 / var = ``ratio`` exactly in their draw, times ``scale``."""
    x = torch.randn(world_size * 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((x - x.mean()) / x.std(unbiased=False) + ratio ** 0.5) * scale


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_below_the_cancellation_limit_the_sums_about_zero_keep_the_variance_within_the_bound(world_size):
    """docs/layer.md's bound, at its edge: the first round's variance is within (W + 2) eps (1 +
    mean^2 / var) of the exact one (measured up to 0.45 of it), and up to mean^2 / var = 64 the
    layer takes it; past 64 it asks for the second round."""
    for seed, scale in enumerate([1e-8, 1e-3, 1.0, 7.0, 1e5, 1e9]):
        x = at_ratio(63.9, scale, world_size, seed)
        summed = first_round(list(x.view(world_size, 40, 1)))
        assert not functional.cancels(summed[1:], summed[0])
        _, var = functional.unshift(summed[1:], None, int(summed[0]))
        exact = exact_variance(x)
        ratio = x.mean().item() ** 2 / exact
        assert abs(var.item() - exact) / exact <= (world_size + 2) * EPS * (1 + ratio), (scale, ratio)
        beyond = first_round(list(at_ratio(64.1, scale, world_size, seed).view(world_size, 40, 1)))
        assert functional.cancels(beyond[1:], beyond[0])


@pytest.mark.parametrize("values,second", [([1.0, 2.0, 3.0], False), ([0.0, 0.0, 0.0], False),
                                           ([5.0, 5.0, 5.0], True), ([1.0, float("nan"), 3.0], True),
                                           ([1.0, float("inf"), 3.0], True), ([1e200, -1e200, 1e200], True)],
                         ids=["near-zero", "all-zero", "constant-off-zero", "nan", "inf", "overflowing-square"])
def test_sums_that_cancel_or_are_not_finite_ask_for_the_second_round(values, second):
    """A constant channel off 0 cancels completely; a NaN, an inf or a square past float64's range
    leaves a sum that is not finite. Each is read off the summed values alone."""
    summed = first_round([torch.tensor(values, dtype=torch.float64).view(-1, 1)])
    assert bool(functional.cancels(summed[1:], summed[0])) == second


@pytest.mark.parametrize("sizes", [(4, 0, 3), (0, 0, 0), (1, 1, 5)])
def test_the_shifted_sums_give_the_count_mean_and_variance_of_the_global_batch(sizes):
    x = torch.randn(sum(sizes), 3, 2, dtype=torch.float64) * 2 + 5
    shift = torch.tensor([4.0, 5.5, 6.0], dtype=torch.float64)
    moments = [functional.local_moments(part) for part in x.split(list(sizes))]
    count = int(sum(m[0] for m in moments))
    summed = sum(functional.shifted_sums(m, shift) for m in moments)
    if count == 0:
        assert summed.abs().sum() == 0 and functional.unshift(summed, shift, 0)[1].abs().sum() == 0
        return
    mean, var = functional.unshift(summed, shift, count)
    values = x.transpose(0, 1).reshape(3, -1)
    assert count == values.size(1)
    torch.testing.assert_close(mean, values.mean(1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(var, values.var(1, unbiased=False), rtol=1e-12, atol=1e-13)


def test_a_constant_channels_shifted_variance_is_zero_not_the_rounding_below_it():
    """(S2 - S1^2 / N) of equal values rounds to -8.9e-16 here: the variance is clamped at 0."""
    x = torch.full((7, 2), 3.3, dtype=torch.float64)
    shift = torch.full((2,), 1.1, dtype=torch.float64)
    summed = sum(functional.shifted_sums(functional.local_moments(part), shift) for part in x.split([3, 4]))
    mean, var = functional.unshift(summed, shift, 7)
    assert torch.equal(var, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(mean, x[0], rtol=1e-15, atol=0)


def all_reduce_core(group):
    def run(x, running_mean, running_var, weight, bias, momentum):
        return functional.sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, 1e-5, group,
                                          "all_reduce")
    return run


@pytest.mark.parametrize("offset,rounds", [(0.0, 1), (1e6, 2)], ids=["near-zero", "far-from-zero"])
@pytest.mark.parametrize("shape", list(CORE_SHAPES))
def test_the_all_reduce_core_alone_and_through_a_group_of_one_is_batchnorm(group_of_one, shape, offset, rounds):
    """Data drawn with mean 2 and std 3 need one round; moved 1e6 from 0 (a first round about 0
    would cancel 11 digits), two. Either way F.batch_norm's numbers to 1e-10, one all-reduce back."""
    def far(run):
        return lambda x, *args: run(x + offset, *args)

    theirs = one_step(far(batchnorm), CORE_SHAPES[shape], 0.1, True, True)
    with count_collectives() as counts:
        through_group = one_step(far(all_reduce_core(group_of_one)), CORE_SHAPES[shape], 0.1, True, True)
    assert dict(counts) == {"c10d::allreduce_": rounds + 1}
    for ours in (one_step(far(all_reduce_core(None)), CORE_SHAPES[shape], 0.1, True, True), through_group):
        for key in ("y", "dx", "dw", "db", "running_mean", "running_var"):
            torch.testing.assert_close(ours[key], theirs[key], **CORE_EXACT, msg=key)
