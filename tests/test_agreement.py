"""The layer right whatever each rank holds (docs/layer.md, "Agreement"): running statistics that
differ between ranks, were reset or dropped, a layer rebuilt on one rank, a NaN or an outlier in one
step, means far from zero from the first step, ranks of different dtypes, half precision; each on
real Gloo ranks against torch's BatchNorm on the concatenated batch, with both collectives and auto."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from gloo import GlooGroup

from syncbn import SyncBatchNorm
from syncbn.counting import count_collectives

EXACT = dict(rtol=1e-10, atol=1e-10)
COLLECTIVES = ["all_gather", "all_reduce", "auto"]
SIZES = (5, 3)  # samples on ranks 0 and 1
CHANNELS = 3


def draws(steps: int, mean: float = 2.0, std: float = 3.0, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's global batch and output gradient, float64."""
    gen = torch.Generator().manual_seed(seed)
    shape = (sum(SIZES), CHANNELS)
    return [(mean + std * torch.randn(shape, generator=gen, dtype=torch.float64),
             torch.randn(shape, generator=gen, dtype=torch.float64)) for _ in range(steps)]


@dataclass(frozen=True)
class Run:
    """A few training steps of one layer on every rank; what differs from a plain run."""

    batches: list
    collective: str = "all_reduce"
    momentum: float | None = 0.1
    dtypes: tuple = (torch.float64, torch.float64)  # each rank's input dtype
    running_shift: tuple = (0.0, 0.0)  # added to each rank's running mean before the first step
    drop: str | None = None  # "untracked": track_running_stats off; "buffers": the buffers set to None
    reset_after: int | None = None  # reset_running_stats() after this step
    rebuild_after: int | None = None  # rank 1 rebuilds its layer from its state_dict after this step


def _with_parameters(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return layer


def _layer(run: Run, dtype: torch.dtype) -> nn.Module:
    return _with_parameters(SyncBatchNorm(CHANNELS, momentum=run.momentum, collective=run.collective, dtype=dtype))


def _record(out: dict, y: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> None:
    """A step's output, input gradient and parameter gradients; the latter cleared for the next."""
    out["y"].append(y.detach())
    out["dx"].append(x.grad)
    out["dw"].append(layer.weight.grad.clone())
    out["db"].append(layer.bias.grad.clone())
    layer.weight.grad = layer.bias.grad = None


def _drop(layer: nn.Module, drop: str | None) -> None:
    if drop == "untracked":
        layer.track_running_stats = False
    elif drop == "buffers":
        layer.running_mean = layer.running_var = None


def steps_on_rank(run: Run) -> dict:
    rank = dist.get_rank()
    dtype = run.dtypes[rank]
    layer = _layer(run, dtype)
    layer.running_mean += run.running_shift[rank]
    _drop(layer, run.drop)
    start = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
    out = dict(y=[], dx=[], dw=[], db=[], counts=[])
    for step, (x_global, dy_global) in enumerate(run.batches):
        x = x_global[start].to(dtype).requires_grad_()
        with count_collectives() as counts:
            y = layer(x)
            y.backward(dy_global[start].to(dtype))
        out["counts"].append(dict(counts))
        _record(out, y, x, layer)
        if step == run.reset_after:
            layer.reset_running_stats()
        if step == run.rebuild_after and rank == 1:
            state = layer.state_dict()
            layer = _layer(run, dtype)
            layer.load_state_dict(state)
    out["running"] = [None if t is None else t.clone() for t in (layer.running_mean, layer.running_var)]
    return out


def _torch_layer(run: Run, rank: int) -> nn.Module:
    layer = _with_parameters(nn.BatchNorm1d(CHANNELS, momentum=run.momentum, dtype=torch.float64))
    layer.running_mean += run.running_shift[rank]
    _drop(layer, run.drop)
    return layer


def reference(run: Run, rank: int = 0, offset: float = 0.0) -> dict:
    """torch's BatchNorm1d on the concatenated batches, float64; its running statistics as rank
    ``rank``'s start and resets leave them. ``offset``: the outputs and gradients of a second such
    layer on the batches moved by it (exactly, for batches drawn at that mean), where BatchNorm's
    own float64 arithmetic loses nothing; the running statistics from the batches as they are."""
    layer, moved = _torch_layer(run, rank), _torch_layer(run, rank)
    out = dict(y=[], dx=[], dw=[], db=[])
    for step, (x_global, dy_global) in enumerate(run.batches):
        if offset:
            with torch.no_grad():
                layer(x_global)
        x = (x_global - offset).requires_grad_()
        y = (moved if offset else layer)(x)
        y.backward(dy_global)
        _record(out, y, x, moved if offset else layer)
        if step == run.reset_after:
            layer.reset_running_stats()
    out["running"] = [None if t is None else t.clone() for t in (layer.running_mean, layer.running_var)]
    return out


def assert_torchs(ranks: list[dict], expected: dict, steps=None, tolerance: dict = EXACT) -> None:
    for step in steps if steps is not None else range(len(expected["y"])):
        for key in ("y", "dx"):
            torch.testing.assert_close(torch.cat([r[key][step].double() for r in ranks]), expected[key][step],
                                       **tolerance, equal_nan=True, msg=f"{key} at step {step}")
        for key in ("dw", "db"):  # each rank's share of the global batch's gradient
            torch.testing.assert_close(sum(r[key][step].double() for r in ranks), expected[key][step], **tolerance,
                                       equal_nan=True, msg=f"{key} at step {step}")


def assert_same_collectives(ranks: list[dict]) -> None:
    assert ranks[0]["counts"] == ranks[1]["counts"], "every rank ran the same collectives at every step"


@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("shift", [0.5, 50.0])
def test_ranks_whose_running_statistics_differ_still_normalize_by_the_global_batch(gloo_group, collective, shift):
    """A checkpoint loaded on one rank, buffers changed on one rank, DDP(broadcast_buffers=False)
    after a divergence: training uses the step's statistics, as torch's does, whatever each rank's
    running mean; each rank's running statistics move from its own by the global batch's."""
    run = Run(draws(3), collective, running_shift=(0.0, shift))
    ranks = gloo_group(2).run(steps_on_rank, run)
    assert_torchs(ranks, reference(run))
    assert_same_collectives(ranks)
    for rank, result in enumerate(ranks):
        for ours, theirs in zip(result["running"], reference(run, rank)["running"]):
            torch.testing.assert_close(ours, theirs, **EXACT)


def _poisoned(value: float) -> list:
    batches = draws(3)
    batches[0][0][1, 0] = value  # one sample of rank 0, channel 0, in the first step only
    return batches


@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("value", [float("nan"), 1e10, -1e150], ids=["nan", "outlier", "far-outlier"])
def test_a_nan_or_an_outlier_stays_in_its_own_step(gloo_group, collective, value):
    """Its step is what torch's is (a NaN channel NaN, an outlier's channel its statistics); the
    next steps are exact again, where a shift kept from the poisoned step would cancel for good."""
    run = Run(_poisoned(value), collective)
    ranks = gloo_group(2).run(steps_on_rank, run)
    expected = reference(run)
    assert_torchs(ranks, expected, steps=[1, 2])
    for key in ("y", "dx"):  # the poisoned step: NaN where torch's is NaN, and torch's numbers elsewhere
        ours, theirs = torch.cat([r[key][0] for r in ranks]), expected[key][0]
        assert torch.equal(ours.isnan(), theirs.isnan()), key
        torch.testing.assert_close(ours[:, 1:], theirs[:, 1:], **EXACT)
    assert_same_collectives(ranks)


def test_an_outlier_in_float32_leaves_the_next_steps_at_float32s_accuracy(gloo_group):
    """float32 input; the float64 reference: within 1e-5 (float32 statistics, float32 output)."""
    run = Run(_poisoned(1e10), "all_reduce", dtypes=(torch.float32, torch.float32))
    ranks = gloo_group(2).run(steps_on_rank, run)
    assert_torchs(ranks, reference(run), steps=[1, 2], tolerance=dict(rtol=1e-5, atol=1e-5))


def far(mean: float) -> dict:
    """What float64 data of that mean and std 1 carry: 2 units in the last place of the mean
    (2.2e-10 at 1e6), which no float64 BatchNorm of them can beat (torch's own misses by as much)."""
    return dict(rtol=1e-10, atol=4 * mean * torch.finfo(torch.float64).eps)


@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("mean", [1e6, 1e8])
def test_channels_far_from_zero_are_exact_from_the_first_step(gloo_group, collective, mean):
    """float64, std 1: the sums about 0 would lose 12 and 16 digits; from the first step on, every
    step is exact to the data's own rounding, and the all-reduce then takes its second round."""
    run = Run(draws(4, mean=mean, std=1.0), collective)
    ranks = gloo_group(2).run(steps_on_rank, run)
    assert_torchs(ranks, reference(run, offset=mean), tolerance=far(mean))
    assert_same_collectives(ranks)
    if collective == "all_reduce":
        assert all(counts == {"c10d::allreduce_": 3} for counts in ranks[0]["counts"])


@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("momentum,reset_after", [(0.0, None), (0.1, 1), (None, 0)],
                         ids=["momentum-0", "reset-mid-run", "cumulative-reset"])
def test_momentum_zero_and_a_reset_change_nothing_in_training(gloo_group, collective, momentum, reset_after):
    """The running mean is no part of the training step: momentum 0 (it never moves) and
    reset_running_stats() (as swa_utils.update_bn and PreciseBN do) leave every step exact."""
    run = Run(draws(3, mean=1e6, std=1.0), collective, momentum=momentum, reset_after=reset_after)
    ranks = gloo_group(2).run(steps_on_rank, run)
    expected = reference(run, offset=1e6)
    assert_torchs(ranks, expected, tolerance=far(1e6))
    for result in ranks:
        for ours, theirs in zip(result["running"], expected["running"]):
            torch.testing.assert_close(ours, theirs, **far(1e6))


@pytest.mark.parametrize("collective", COLLECTIVES)
def test_a_rank_that_rebuilds_its_layer_from_a_checkpoint_runs_its_peers_collectives(gloo_group, collective):
    """Rank 1 rebuilds its layer from its state_dict after the first step (a fresh Python object,
    the same state): every step, every rank runs the same collectives and gets torch's numbers."""
    run = Run(draws(3, mean=1e6, std=1.0), collective, rebuild_after=0)
    ranks = gloo_group(2).run(steps_on_rank, run)
    assert_same_collectives(ranks)
    assert_torchs(ranks, reference(run, offset=1e6), tolerance=far(1e6))


@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("drop", ["untracked", "buffers"])
def test_running_statistics_dropped_after_construction_mean_batch_statistics(gloo_group, collective, drop):
    """track_running_stats turned off, or the buffers set to None, as test-time adaptation does."""
    run = Run(draws(3, mean=1e4, std=1.0), collective, drop=drop)
    ranks = gloo_group(2).run(steps_on_rank, run)
    assert_torchs(ranks, reference(run))
    assert_same_collectives(ranks)


@pytest.mark.parametrize("collective", COLLECTIVES)
def test_ranks_of_different_dtypes_run_one_collective_and_normalize_by_the_whole_batch(gloo_group, collective):
    """float32 on rank 0, float64 on rank 1: every payload is float64 on every rank, so both run the
    same collectives, and each normalizes by the statistics of both (rank 0's moments in float32)."""
    run = Run(draws(2), collective, dtypes=(torch.float32, torch.float64))
    ranks = gloo_group(2).run(steps_on_rank, run)
    assert_same_collectives(ranks)
    assert ranks[0]["y"][0].dtype == torch.float32 and ranks[1]["y"][0].dtype == torch.float64
    assert_torchs(ranks, reference(run), tolerance=dict(rtol=1e-5, atol=1e-5))


def half_gradients_on_rank(x_global: torch.Tensor, dy_global: torch.Tensor, collective: str) -> torch.Tensor:
    rank = dist.get_rank()
    layer = SyncBatchNorm(x_global.size(1), collective=collective)  # float32 parameters, as under autocast
    x = x_global.chunk(2)[rank].clone().requires_grad_()
    layer(x).backward(dy_global.chunk(2)[rank])
    return x.grad


HALF_CASES = {  # input, output gradient
    "dy-mostly-its-mean": lambda gen: (torch.randn(64, 4, generator=gen), 1 + 0.01 * torch.randn(64, 4, generator=gen)),
    "scaled-loss": lambda gen: (1e-2 * torch.randn(64, 4, generator=gen), 1000 + torch.randn(64, 4, generator=gen)),
}


@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
@pytest.mark.parametrize("case", list(HALF_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_gradients_are_as_accurate_as_torchs_and_finite_where_its_are(gloo_group, dtype, case,
                                                                                            collective):
    """Where dy is mostly its mean (a ReLU or pooling head) or large (a loss scaler's 1000 on input
    of std 1e-2): the error against float64 is torch's own BatchNorm's in that dtype (within 1.25x
    of it: the sums are added in another order), and finite wherever torch's is."""
    x, dy = (t.to(dtype) for t in HALF_CASES[case](torch.Generator().manual_seed(0)))
    weight, bias = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    truth = x.double().requires_grad_()
    F.batch_norm(truth, None, None, weight.double(), bias.double(), True).backward(dy.double())
    theirs = x.clone().requires_grad_()
    F.batch_norm(theirs, None, None, weight, bias, True).backward(dy)
    ours = torch.cat(gloo_group(2).run(half_gradients_on_rank, x, dy, collective))
    assert ours.dtype == dtype and torch.equal(ours.isfinite(), theirs.grad.isfinite())
    scale = truth.grad.abs().max()
    error = lambda grad: ((grad.double() - truth.grad).abs().max() / scale).item()  # noqa: E731
    assert error(ours) <= 1.25 * error(theirs.grad)


def mismatched_layer(channels: tuple, collectives: tuple) -> str:
    rank = dist.get_rank()
    layer = SyncBatchNorm(channels[rank], collective=collectives[rank])
    try:
        layer(torch.randn(4, channels[rank])).sum().backward()
    except RuntimeError as error:
        return str(error)
    return "no error"


@pytest.mark.processes
def test_ranks_that_disagree_on_channels_or_collective_get_one_clear_error_under_torchs_detail_check(monkeypatch):
    """No right answer: the collective's size (channels) or kind differ between ranks. No check the
    layer could make without a collective of its own at every step sees it (Gloo aborts the rank
    whose buffer is the smaller); torch's own check does, with TORCH_DISTRIBUTED_DEBUG=DETAIL
    (docs/layer.md): every rank fails at once, naming the layer's phase and both ranks' calls."""
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    group = GlooGroup(2, call_timeout_s=30, collective_timeout_s=10)
    try:
        for channels, collectives in (((3, 4), ("all_gather",) * 2), ((3, 3), ("all_gather", "all_reduce"))):
            for message in group.run(mismatched_layer, channels, collectives):
                assert message.startswith("SyncBatchNorm forward: ") and "Detected mismatch between collectives" in \
                    message, message
    finally:
        group.close()
