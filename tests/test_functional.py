"""The functional core on real Gloo groups: statistics that stay exact (far from zero, in float64,
in half precision), the single-value error on every rank, eps checked as torch does, a second
derivative refused loudly, and a collective that fails in time."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo import GlooGroup

from syncbn import SyncBatchNorm, functional
from syncbn.distributed import count_collectives

def normalize_far_from_zero(x_global: torch.Tensor) -> dict:
    """fp32 channels with mean 1e4 and std 1, split over the ranks."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    layer = SyncBatchNorm(x_global.size(1))
    y = layer(x_global.chunk(world_size)[rank])
    return dict(y=y.detach(), running_mean=layer.running_mean, running_var=layer.running_var)


def test_statistics_stay_exact_for_channels_far_from_zero(gloo_group):
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(64, 4, generator=gen, dtype=torch.float64)).float()
    x64 = x.double()
    true_var = x64.var(0, unbiased=False)
    naive_var = (x * x).mean(0) - x.mean(0) ** 2
    assert (naive_var.double() - true_var).abs().max() > 0.5, "the case must defeat the textbook fp32 formula"

    ranks = gloo_group(2).run(normalize_far_from_zero, x)
    expected = (x64 - x64.mean(0)) / torch.sqrt(true_var + 1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]).double(), expected, rtol=0, atol=2e-3)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"].double(), 0.9 * 0 + 0.1 * x64.mean(0), rtol=1e-6, atol=0)
        torch.testing.assert_close(r["running_var"].double(), 0.9 + 0.1 * x64.var(0), rtol=1e-3, atol=0)


def normalize_chunk(x_global: torch.Tensor) -> dict:
    """This rank's chunk of ``x_global`` through a SyncBatchNorm of the input's dtype family."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    layer = SyncBatchNorm(x_global.size(1), dtype=torch.float64 if x_global.dtype == torch.float64 else None)
    y = layer(x_global.chunk(world_size)[rank])
    return dict(y=y.detach(), running_var=layer.running_var.clone())


def float64_batch_norm(x64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm in float64, two-pass statistics; the output and the biased variance."""
    dims = [0, *range(2, x64.dim())]
    mean = x64.mean(dims, keepdim=True)
    var = ((x64 - mean) ** 2).mean(dims, keepdim=True)
    return (x64 - mean) / torch.sqrt(var + 1e-5), var.flatten()


def test_float64_statistics_stay_exact_where_float64_cancels_too(gloo_group):
    """Mean 1e9, std 1: E[x^2] - E[x]^2 is off by hundreds even in float64; Chan's merge of the
    ranks' moments keeps the variance to 5e-9 relative here (asserted: 1e-6)."""
    x = 1e9 + torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, true_var = float64_batch_norm(x)
    naive_var = (x * x).mean(0) - x.mean(0) ** 2
    assert (naive_var - true_var).abs().max() > 1, "the case must defeat the textbook formula in float64"
    ranks = gloo_group(2).run(normalize_chunk, x)
    for r in ranks:
        torch.testing.assert_close(r["running_var"], 0.9 + 0.1 * x.var(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), expected, rtol=0, atol=1e-6)


def test_half_input_far_from_zero_is_normalized_with_float32_statistics(gloo_group):
    """float16 input of mean 50: statistics in float32 keep the output within 2 float16 steps of the
    float64 result (measured 9e-4); statistics in float16 would miss by 1.3e-2."""
    x = (torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 50).half()
    expected, _ = float64_batch_norm(x.double())
    y = torch.cat([r["y"] for r in gloo_group(2).run(normalize_chunk, x)])
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=4e-3)


def low_precision_on_rank(x_global: torch.Tensor, dtype: torch.dtype) -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, input_dtype in (("low", dtype), ("float32", torch.float32)):
        torch.manual_seed(0)
        layer = SyncBatchNorm(x_global.size(1))
        x = x_global.chunk(world_size)[rank].to(input_dtype).requires_grad_()
        y = layer(x)
        y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.size(1), dtype=y.dtype).view(1, -1, 1, 1))
        results[name] = dict(y=y.detach(), grad=x.grad, running_var=layer.running_var.clone())
    return results


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
def test_half_and_bfloat16_keep_their_dtype(gloo_group, dtype, atol):
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3 + 2
    for r in gloo_group(2).run(low_precision_on_rank, x, dtype):
        low, ref = r["low"], r["float32"]
        assert low["y"].dtype == dtype and low["grad"].dtype == dtype
        assert low["running_var"].dtype == torch.float32
        torch.testing.assert_close(low["y"].float(), ref["y"], rtol=0, atol=atol)
        torch.testing.assert_close(low["grad"].float(), ref["grad"], rtol=0, atol=atol)
        torch.testing.assert_close(low["running_var"], ref["running_var"], rtol=1e-3, atol=0)


def single_value_in_group(sizes: tuple) -> str:
    layer = SyncBatchNorm(3)
    try:
        layer(torch.randn(sizes[dist.get_rank()], 3))
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("world_size,sizes", [(1, (1,)), (2, (1, 0)), (3, (0, 1, 0))])
def test_one_value_per_channel_in_the_whole_group_raises_on_every_rank(gloo_group, world_size, sizes):
    for message in gloo_group(world_size).run(single_value_in_group, sizes):
        assert message.startswith("Expected more than 1 value per channel when training")


def first_and_second_derivatives(x_global: torch.Tensor, affine: bool, input_grad: bool) -> dict:
    """The first derivative (to the input, or to the weight where the input needs none) with and
    without create_graph=True, then each way of asking for its own gradient: autograd.grad to the
    input or the weight, and backward(); for a loss cubic and one linear in the output (whose
    incoming gradient does not itself require grad)."""
    layer = SyncBatchNorm(3, affine=affine).double()
    x = x_global.chunk(dist.get_world_size())[dist.get_rank()].clone().requires_grad_(input_grad)
    first = x if input_grad else layer.weight
    kept, = torch.autograd.grad((layer(x) ** 3).sum(), first, create_graph=True)
    plain, = torch.autograd.grad((layer(x) ** 3).sum(), first)
    weights = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    targets = {"backward": None} | {f"grad to {name}": to for name, to in (("x", x), ("weight", layer.weight))
                                    if to is not None and to.requires_grad}
    errors = {}
    for loss_name, loss in {"cubic": lambda y: (y ** 3).sum(), "linear": lambda y: (y * weights).sum()}.items():
        for name, to in targets.items():
            g, = torch.autograd.grad(loss(layer(x)), first, create_graph=True)
            try:
                (g ** 2).sum().backward() if to is None else torch.autograd.grad((g ** 2).sum(), to)
                errors[f"{loss_name}, {name}"] = "no error"
            except RuntimeError as error:
                errors[f"{loss_name}, {name}"] = str(error)
    return dict(kept=kept.detach(), plain=plain, errors=errors)


@pytest.mark.parametrize("affine,input_grad", [(True, True), (False, True), (True, False)],
                         ids=["affine", "affine-off", "weight-only"])
def test_create_graph_keeps_the_first_derivative_and_a_second_one_raises(gloo_group, affine, input_grad):
    """A gradient penalty through the layer must fail loudly: a second derivative that held the
    gathered sums constant would be silently wrong. The first derivative is the same either way."""
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ways = 2 * (1 + affine + input_grad)
    for rank in gloo_group(2).run(first_and_second_derivatives, x, affine, input_grad):
        assert torch.equal(rank["kept"], rank["plain"])
        assert len(rank["errors"]) == ways
        for how, message in rank["errors"].items():
            assert message.startswith("SyncBatchNorm has no second derivative"), (how, message)


def eps_error(eps: float) -> str:
    try:
        SyncBatchNorm(3, eps=eps)(torch.randn(4, 3))
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_must_be_positive_in_training_synchronized_or_not(gloo_group, world_size, eps):
    """As torch's BatchNorm: one rank runs ``F.batch_norm``, a group the synchronized core."""
    for message in gloo_group(world_size).run(eps_error, eps):
        assert message == f"batch_norm eps must be positive during training, but got {eps}"


def stall_between_forward_and_backward(stall_s: float) -> tuple[float, str]:
    """Rank 1 runs the forward pass, then stalls instead of running the backward pass."""
    y = SyncBatchNorm(3)(torch.randn(4, 3, requires_grad=True))
    if dist.get_rank() == 1:
        time.sleep(stall_s)
        return 0.0, "stalled"
    start = time.monotonic()
    try:
        y.sum().backward()
    except RuntimeError as error:
        return time.monotonic() - start, str(error)
    return time.monotonic() - start, "no error"


@pytest.mark.processes
def test_a_stalled_rank_makes_the_others_fail_within_the_timeout():
    group = GlooGroup(2, call_timeout_s=40, collective_timeout_s=3)
    try:
        (elapsed, message), _ = group.run(stall_between_forward_and_backward, 10.0)
    finally:
        group.close()
    assert message.startswith("SyncBatchNorm backward: all_gather over 2 ranks failed"), message
    assert "3000ms" in message or "timed out" in message.lower(), message
    assert 2.5 < elapsed < 8, f"rank 0 failed after {elapsed:.1f}s, the timeout is 3s"


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


def test_the_core_alone_keeps_the_first_derivative_and_refuses_a_second():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.ones(3, dtype=torch.float64, requires_grad=True)
    run = lambda: functional.sync_batch_norm(x, None, None, weight, None, 0.1, 1e-5, None)  # noqa: E731
    kept, = torch.autograd.grad((run() ** 3).sum(), x, create_graph=True)
    plain, = torch.autograd.grad((run() ** 3).sum(), x)
    assert torch.equal(kept.detach(), plain) and kept.requires_grad
    with pytest.raises(RuntimeError, match="^SyncBatchNorm has no second derivative"):
        (kept ** 2).sum().backward()


@pytest.mark.parametrize("dtype,statistics", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_statistics_are_float32_or_float64_for_float64_input_and_the_output_keeps_the_dtype(dtype, statistics):
    x = torch.randn(8, 3).to(dtype)
    assert functional.stat_dtype(dtype) == statistics
    assert functional.sync_batch_norm(x, None, None, None, None, 0.1, 1e-5, None).dtype == dtype


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
    error = functional._failed("backward", 4, RuntimeError("Gloo said\n  something\n[timeout] after 3000ms  "))
    assert str(error) == ("SyncBatchNorm backward: all_gather over 4 ranks failed, a rank stopped, died or took a "
                          "different path before joining it (process-group timeout / connection loss): [timeout] after 3000ms")
    assert str(functional._failed("forward", 2, RuntimeError(""))).endswith("connection loss): RuntimeError")


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
