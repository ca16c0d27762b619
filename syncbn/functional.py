"""The functional core of synchronized BatchNorm: one autograd Function, one collective each way.

Forward, on every rank of the group:
  1. local count, mean and biased variance per channel (BatchNorm's own kernel, float32 or wider);
  2. one ``all_gather`` of the packed ``[count, mean, var]`` (float64, so counts stay exact);
  3. the same merge everywhere, Chan's parallel formula in float64, which stays exact where
     the textbook ``E[x^2] - E[x]^2`` cancels catastrophically (channels with mean 1e4, std 1);
     with equal counts on every rank, one pass of BatchNorm's statistics kernel over the rows;
  4. one fused eval-mode ``torch.batch_norm`` pass with the global statistics, keeping dtype and
     memory format.

Backward: one fused pass gives the local ``sum(dy)`` and ``sum(dy * x_hat)``; one collective of the
two packed sums (float64 on every rank, whatever its input's dtype), added up so that every rank
gets bit-identical numbers; the input gradient in closed form, in the statistics' dtype and
rounded once to the input's: its ``a * dy`` term while the sums travel, then one fused pass.
With ``create_graph=True`` these first derivatives stay in the graph; asking for a second raises
(the summed statistics are not differentiated again).

The all-reduce instead of the all-gather: each rank sends ``[n, n m, M2 + n m^2]`` (its count, mean
``m`` and sum of squared deviations ``M2``), one all-reduce gives the group's sums, from which every
rank computes the same mean and variance. Where a channel's mean lies far from 0 against its
spread those sums cancel, and every rank sees it in the sums it received: then, and only then, a
second all-reduce sums the moments again shifted by the first round's mean. Nothing that decides
this, or that the result depends on, is one rank's own state (docs/layer.md, "Agreement").

When the input needs no gradient, backward needs no collective (weight and bias gradients are
local shares).

The same code compiles with ``torch.compile(fullgraph=True)``: no ``.item()`` or data-dependent
branch on the traced path (the all-reduce runs its second round at every step there), and where
tracing needs another op (the collective, the moments, the single-value check)
``torch.compiler.is_compiling()`` picks it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from syncbn.comm import start_all_gather, start_all_reduce, start_sum

_SINGLE_VALUE_ERROR = "Expected more than 1 value per channel when training, got input size {}"


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32, or float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def values_per_channel(x: torch.Tensor) -> int:
    return x.numel() // x.size(1) if x.size(1) else 0


def _as_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t.to(dtype)``, without the call (a few microseconds each) when nothing changes."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def local_moments(x: torch.Tensor) -> torch.Tensor:
    """This rank's ``[count, mean_0..C-1, var_0..C-1]`` as one float64 tensor, ready to gather."""
    count = values_per_channel(x)
    if count == 0:
        return torch.zeros(2 * x.size(1) + 1, dtype=torch.float64, device=x.device)
    x = _cast(x, stat_dtype(x.dtype))
    if torch.compiler.is_compiling():
        # batch_norm_update_stats has no meta kernel to trace; inductor fuses this into one pass.
        var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], correction=0)
    else:
        # BatchNorm's own statistics kernel (CPU and CUDA): mean and biased variance, 3-20x faster
        # than torch.var_mean over the (N, *) dimensions, and just as stable.
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    # The count in float64, exact past float32's 2^24; cat promotes mean and var to it.
    return torch.cat([torch.full((1,), count, dtype=torch.float64, device=x.device), mean, var])


def group_count(gathered: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor | int, bool]:
    """The group's values per channel, after BatchNorm's check that there is more than one, and
    whether every rank had as many. Eager: a Python int, and a ValueError as torch's. Compiled: a
    float64 scalar tensor (no ``.item()``, so no graph break), False, and the same check as an
    assertion inside the graph, raised when it runs."""
    if torch.compiler.is_compiling():  # the graph's message is a constant: no shapes in it
        total = gathered[:, 0].sum()
        torch._assert_async(total != 1, "Expected more than 1 value per channel when training, got 1 value per "
                                         "channel in the whole group")
        return total, False
    counts = gathered[:, 0].tolist()
    return checked_count(int(sum(counts)), x), min(counts) == max(counts)


def checked_count(count: int, x: torch.Tensor) -> int:
    """The group's values per channel, after BatchNorm's check that there is more than one."""
    if count == 1:
        raise ValueError(_SINGLE_VALUE_ERROR.format(f"{tuple(x.shape)} on this rank, 1 in the whole group"))
    return count


def _at_least_one(count: torch.Tensor | int) -> torch.Tensor | int:
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)


def merge_moments(gathered: torch.Tensor, count: torch.Tensor | int, equal_counts: bool) -> torch.Tensor:
    """Merge per-rank ``[count, mean, var]`` rows (W, 2C+1) into the global mean and biased variance,
    rows of one (2, C) float64 tensor. With no value anywhere both are 0.

    Chan et al.: M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2, never a difference of large sums.
    """
    channels = (gathered.size(1) - 1) // 2
    if equal_counts:
        # Equal weights: the mean of the means, and the mean of the variances plus the (biased)
        # variance of the means; BatchNorm's statistics kernel over the rows gives all three at once.
        # In place on a slice: ``moments[1] += ...`` would also copy the sum back onto itself.
        mean, var = torch.batch_norm_update_stats(gathered, None, None, 0.0)
        mean[channels + 1 :].add_(var[1 : channels + 1])
        return mean[1:].view(2, channels)
    weights = gathered[:, :1].T / _at_least_one(count)
    moments = weights @ gathered[:, 1:]  # the weighted means of the means and of the variances
    deviation = gathered[:, 1 : channels + 1] - moments[:, :channels]
    moments[:, channels:] += weights @ (deviation * deviation)
    return moments.view(2, channels)


# The all-reduce's first round sums the moments about 0. Where a channel's squared mean exceeds
# this many times its variance, those sums have cancelled more digits than the bound in
# docs/layer.md allows, and a second round sums the moments about the first round's mean.
CANCELLATION_LIMIT = 64.0


def shifted_sums(moments: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """From this rank's ``[n, mean, var]`` (``local_moments``), ``[n (m - s), M2 + n (m - s)^2]`` per
    channel in float64 (``M2 = n var``; ``s``: a shift every rank shares, None for 0): the group's
    sums of these, with its count, give its mean and variance (``unshift``)."""
    count, mean, var = moments.split([1, *[(moments.numel() - 1) // 2] * 2])
    deviation = mean if shift is None else mean - shift
    shifted = count * deviation
    return torch.cat([shifted, count * var + shifted * deviation])


def unshift(summed: torch.Tensor, shift: torch.Tensor | None, count: torch.Tensor | int) -> torch.Tensor:
    """The group's mean and biased variance, rows of one (2, C) float64 tensor, from its sums
    ``[S1, S2]`` about ``shift`` (None: 0): ``mean = s + S1 / N``, ``var = (S2 - S1^2 / N) / N``.
    The subtraction cancels as much as ``(mean - s)^2`` exceeds the variance (docs/layer.md).
    With no value anywhere: the shift and 0, which nothing uses."""
    s1, s2 = summed.view(2, -1) / _at_least_one(count)
    mean = s1 if shift is None else shift + s1
    return torch.stack([mean, (s2 - s1 * s1).clamp_(min=0)])


def cancels(summed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Whether the first round's sums ``[S1, S2]`` about 0 cancel in some channel, a 0-d bool tensor:
    ``mean^2 > CANCELLATION_LIMIT * var``, or a sum that is not finite (a NaN or an overflow in the
    step's data). Read off the summed values alone, so every rank decides alike."""
    s1, s2 = summed.view(2, -1) / count.clamp(min=1)
    square = s1 * s1
    return ~(square <= CANCELLATION_LIMIT * (s2 - square)).all()


def reduced_moments(moments: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup | None,
                    phase: str = "forward") -> tuple[torch.Tensor | int, torch.Tensor]:
    """The group's count and ``[mean, var]`` (2, C) by all-reduce: the sums about 0, then, where
    they cancel (always, compiled: the graph cannot branch on them), the sums about the first
    round's mean, which every rank received alike."""
    first = start_all_reduce(torch.cat([moments[:1], shifted_sums(moments, None)]), group, phase)()
    if torch.compiler.is_compiling():
        count, second = group_count(first[:1].view(1, 1), x)[0], True
    else:
        # One read of the summed values: the count, and whether they cancel.
        total, cancelled = torch.stack([first[0], cancels(first[1:], first[0]).to(first.dtype)]).tolist()
        count, second = checked_count(int(total), x), bool(cancelled)
    if not second:
        return count, unshift(first[1:], None, count)
    shift = first[1 : x.size(1) + 1] / _at_least_one(count)
    return count, unshift(start_all_reduce(shifted_sums(moments, shift), group, phase)(), shift, count)


def _update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor | int,
    momentum: float,
) -> None:
    """As ``nn.BatchNorm``: ``r = (1 - m) r + m s``, with the unbiased variance of the global batch.
    Nothing changes where the group had no value: compiled (``count`` a tensor), by a momentum of 0
    there instead of a branch."""
    if running_mean is None or running_var is None or (isinstance(count, int) and count == 0):
        return
    if isinstance(count, torch.Tensor):
        momentum = _cast((count > 0).to(count.dtype) * momentum, running_mean.dtype)
    unbiased = var * (count / (count - 1))
    running_mean.lerp_(_cast(mean, running_mean.dtype), momentum)
    running_var.lerp_(_cast(unbiased, running_var.dtype), momentum)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the union of the group's batches."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group, collective):
        moments = local_moments(x)
        if collective == "all_reduce":
            count, stats = reduced_moments(moments, x, group)
        else:  # Chan's merge of the gathered rows
            gathered = start_all_gather(moments, group, "forward")()
            count, equal_counts = group_count(gathered, x)
            stats = merge_moments(gathered, count, equal_counts)
        mean, var = _cast(stats, stat_dtype(x.dtype))
        _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        ctx.eps, ctx.group, ctx.collective = eps, group, collective
        ctx.weight_dtype = None if weight is None else weight.dtype
        # Compiled, the count is a tensor of the graph and must be saved as one.
        ctx.count = None if isinstance(count, torch.Tensor) else count
        ctx.save_for_backward(x, weight, mean, var, count if ctx.count is None else None)
        # Even on a rank with no values: the output must depend on the received statistics, or a
        # compiler would drop the collective there as dead code and its peers would wait forever.
        return _normalize(x, mean, var, _cast(weight, mean.dtype), _cast(bias, mean.dtype), eps)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return *_gradients(ctx, grad_out, *saved), None, None, None, None, None, None
        # create_graph=True: the first derivatives are kept, the second refused.
        return *_FirstDerivatives.apply(ctx, grad_out, *saved), None, None, None, None, None, None


class _FirstDerivatives(torch.autograd.Function):
    """The first derivatives under ``create_graph=True``, computed here so that they are new tensors
    (changeable in place, as torch's are) with edges to what they depend on (the incoming gradient,
    the input, the weight): asked for again (double backward, a gradient penalty), they raise,
    rather than give a second derivative that treats the group's summed statistics and this rank's
    statistics as constants."""

    @staticmethod
    def forward(ctx, forward_ctx, grad_out, x, weight, mean, var, count):
        return _gradients(forward_ctx, grad_out, x, weight, mean, var, count)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "SyncBatchNorm has no second derivative: its input gradient depends on every rank's batch "
            "through the gathered sums, which are not differentiated again (double backward, e.g. a "
            "gradient penalty through the layer, is not supported; the first derivative with "
            "create_graph=True is)"
        )


def _gradients(ctx, grad_out, x, weight, mean, var, count) -> tuple[torch.Tensor | None, ...]:
    """The input, weight and bias gradients (those asked for); the input's needs the group's sums.
    Half-precision input is worked on in the statistics' dtype (float32) and the input gradient
    rounded to its dtype once, as torch's BatchNorm kernels do: its terms, rounded each and then
    added, would lose the digits where ``dy`` is mostly its mean, and overflow where ``dy`` is large."""
    x_stat, grad_stat = _cast(x, mean.dtype), _cast(grad_out, mean.dtype)
    sum_dy, sum_dy_xhat = _local_grad_sums(grad_stat, x_stat, mean, var, ctx.eps)
    grad_weight = _cast(sum_dy_xhat, ctx.weight_dtype) if ctx.needs_input_grad[1] else None
    grad_bias = _cast(sum_dy, ctx.weight_dtype) if ctx.needs_input_grad[2] else None
    grad_input = None
    if ctx.needs_input_grad[0]:
        # Every rank sends, even one with no values: its peers may have some. float64 on every rank,
        # whatever its input's dtype, so that the collective has one size everywhere.
        packed = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
        sums = start_sum(packed, ctx.group, "backward", ctx.collective)
        count = ctx.count if count is None else count
        per_sum, grad_input = _scaled_grad(grad_stat, x_stat, weight, var, ctx.eps, count)  # while the sums travel
        grad_input = _cast(_add_shift(grad_input, x_stat, mean, var, ctx.eps, per_sum, _cast(sums(), var.dtype)),
                           x.dtype)
    return grad_input, grad_weight, grad_bias


def _local_grad_sums(grad_out, x, mean, var, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(dy)`` and ``sum(dy * x_hat)`` over this rank's values: eval-mode BatchNorm backward
    computes exactly these as its bias and weight gradients, in one fused pass."""
    if x.numel() == 0:
        zeros = torch.zeros(x.size(1), dtype=stat_dtype(x.dtype), device=x.device)
        return zeros, zeros.clone()
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_out, x, None, mean, var, None, None, False, eps, [False, True, True]
    )
    return sum_dy, sum_dy_xhat


def _scaled_grad(grad_out, x, weight, var, eps, count) -> tuple[torch.Tensor, torch.Tensor]:
    """What the input gradient needs that the other ranks do not give: with ``a`` = weight /
    sqrt(var + eps) per channel, ``-a / count`` (the factor of the group's sums) and ``a * dy``."""
    scale = (var + eps).rsqrt_()
    if weight is not None:
        scale.mul_(_cast(weight, scale.dtype))
    return scale / -_at_least_one(count), grad_out * _cast(_as_channel(scale, x), x.dtype)


def _add_shift(grad_input, x, mean, var, eps, per_sum, sums) -> torch.Tensor:
    """dx = a * (dy - mean(dy) - x_hat * mean(dy * x_hat)): to ``a * dy`` add the two terms from the
    group's ``sums`` = [sum(dy), sum(dy * x_hat)], times ``per_sum`` = ``-a / count``.

    They are an affine map of x per channel, i.e. an eval-mode BatchNorm with weight
    ``-a * mean_dy_xhat`` and bias ``-a * mean_dy``: one fused pass that keeps the memory format.
    Also on a rank with no values: the gathered sums must be used (see forward).
    """
    shift_bias, shift_weight = sums.view(2, -1) * per_sum
    return grad_input.add_(_normalize(x, mean, var, shift_weight, shift_bias, eps))


def _normalize(x, mean, var, weight, bias, eps) -> torch.Tensor:
    """Eval-mode BatchNorm, ``(x - mean) / sqrt(var + eps) * weight + bias`` in one fused pass that
    keeps dtype and memory format: ``torch.batch_norm`` itself, without ``F.batch_norm``'s Python
    checks (``eps`` is checked once, in ``sync_batch_norm``)."""
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)


def sync_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
    group: dist.ProcessGroup | None,
    collective: str = "all_gather",
) -> torch.Tensor:
    """Training-mode batch norm with statistics over every rank of ``group`` (or this rank's batch
    alone for None: what a compiled layer with ``momentum=None`` runs outside a group, where
    ``F.batch_norm`` cannot take the cumulative average's momentum as a traced value).

    ``collective``: ``"all_gather"``, one all-gather each way (Chan's merge of every rank's
    moments); ``"all_reduce"``, one all-reduce each way of the moments' sums, a second in forward
    where they cancel (``reduced_moments``): its traffic does not grow with the number of ranks.

    Gradients: ``x.grad`` is the gradient of the *sum* of all ranks' losses; ``weight.grad`` and
    ``bias.grad`` are this rank's share of it, so their sum over ranks (or DDP's average, paired
    with DDP's averaged upstream gradients) is the gradient of BatchNorm over the global batch.
    """
    if eps <= 0:  # as F.batch_norm in training; the layer's own passes run it in eval mode
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    return SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum, eps, group, collective)
