"""The functional core on real Gloo groups: statistics that stay exact (far from zero, in float64,
in half precision), the single-value error on every rank, eps checked as torch does, a second
derivative refused loudly, and a collective that fails in time."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from gloo import GlooGroup

from syncbn import SyncBatchNorm

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


def stall_between_forward_and_backward(stall_s: float, collective: str) -> tuple[float, str]:
    """Rank 1 runs the forward pass, then stalls instead of running the backward pass (of the second
    step: the all-reduce's first step gathers)."""
    layer = SyncBatchNorm(3, collective=collective)
    layer(torch.randn(4, 3, requires_grad=True)).sum().backward()
    y = layer(torch.randn(4, 3, requires_grad=True))
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
@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
def test_a_stalled_rank_makes_the_others_fail_within_the_timeout_naming_the_collective(collective):
    group = GlooGroup(2, call_timeout_s=40, collective_timeout_s=3)
    try:
        (elapsed, message), _ = group.run(stall_between_forward_and_backward, 5.0, collective)
    finally:
        group.close()
    assert message.startswith(f"SyncBatchNorm backward: {collective} over 2 ranks failed"), message
    assert "3000ms" in message or "timed out" in message.lower(), message
    assert 2.5 < elapsed < 8, f"rank 0 failed after {elapsed:.1f}s, the timeout is 3s"

