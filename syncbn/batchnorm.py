"""``SyncBatchNorm``: BatchNorm over the global batch of a process group, on any backend.

A drop-in for ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` that also runs on CPU/Gloo,
where ``nn.SyncBatchNorm`` refuses to run. Same parameters, buffers and ``state_dict`` keys as
torch's BatchNorm, so checkpoints move freely between the two.

Use with DDP::

    model = convert_sync_batchnorm(model)
    model = DistributedDataParallel(model, forward_sync_buffers=False)  # torch < 2.14: broadcast_buffers

``broadcast_buffers=False``: every rank already computes the same running statistics from the same
global batch, so DDP's default re-broadcast from rank 0 is one extra collective per step for nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from syncbn.cost import CostModel, model_for, resolve_model
from syncbn.functional import sync_batch_norm

# Each way: every rank's moments gathered, their shifted sums reduced, or the one a cost model
# says is cheaper for the group's size and the layer's channels (syncbn/cost.py).
COLLECTIVES = ("auto", "all_gather", "all_reduce")

_PLAIN_BY_INPUT_DIM: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def _check_input(layer: _BatchNorm, input: torch.Tensor) -> None:
    if input.dim() >= 2 and input.size(1) == layer.num_features:  # the common case, checked once
        return
    name = type(layer).__name__
    if input.dim() < 2:
        raise ValueError(
            f"{name} expects input of shape (N, C, *) with at least 2 dimensions, "
            f"got a {input.dim()}D input of shape {tuple(input.shape)}"
        )
    raise ValueError(
        f"{name}({layer.num_features}) expects {layer.num_features} channels in dim 1, "
        f"got input of shape {tuple(input.shape)} with {input.size(1)} channels"
    )


_GROUPS: dict[tuple[dist.ProcessGroup, int], list[dist.ProcessGroup]] = {}


def bn_groups(group_size: int) -> dist.ProcessGroup:
    """This rank's BN group: ranks ``0..k-1``, ``k..2k-1``, ... of the world (``k = group_size``) share
    their statistics. torch requires every rank to create every group, in the same order: the first
    call in a world creates them all, on every rank (call it on every rank, as ``init_process_group``
    is); later calls return them. WORLD for the whole world; for ``k = 1`` a group of this rank alone
    (a ``process_group`` of None would mean the world)."""
    group = _bn_group(group_size)
    if group is None:
        world, rank = dist.group.WORLD, dist.get_rank()
        if (world, 1) not in _GROUPS:
            _GROUPS[world, 1] = [dist.new_group([each]) for each in range(dist.get_world_size())]
        return _GROUPS[world, 1][rank]
    return group


def _bn_group(group_size: int) -> dist.ProcessGroup | None:
    """``bn_groups``, but None for ``k = 1``: the layer needs no group to normalize alone."""
    _check_group_size(group_size, None)
    world, world_size = dist.group.WORLD, dist.get_world_size()
    if world_size % group_size:
        raise ValueError(f"SyncBatchNorm group_size={group_size} does not divide the world size {world_size}: the "
                         "groups are ranks 0..k-1, k..2k-1, ...")
    if group_size == 1:
        return None
    if group_size == world_size:
        return world
    if (world, group_size) not in _GROUPS:
        _GROUPS[world, group_size] = [dist.new_group(list(range(start, start + group_size)))
                                      for start in range(0, world_size, group_size)]
    return _GROUPS[world, group_size][dist.get_rank() // group_size]


def _check_group_size(group_size: int | None, process_group: dist.ProcessGroup | None) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"SyncBatchNorm group_size must be a whole number >= 1, got {group_size!r}")
    if process_group is not None:
        raise ValueError("SyncBatchNorm takes group_size or process_group, not both: group_size makes the groups of "
                         "consecutive ranks itself")


def _check_collective(collective: str) -> None:
    if collective not in COLLECTIVES:
        raise ValueError(f"SyncBatchNorm collective must be one of {', '.join(COLLECTIVES)}, got {collective!r}")


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover every rank of ``process_group`` (default: WORLD).

    Input ``(N, C, *)`` of any rank >= 2. In training mode, inside an initialized group of more than
    one rank, it normalizes with the mean and biased variance of all ranks' samples together and
    updates the running statistics with the unbiased variance of that global batch: one collective in
    forward, one in backward. Per-rank batch sizes may differ and may be zero. In eval mode, without
    a process group, or in a group of one, it is exactly ``F.batch_norm`` with no communication.

    ``collective``: ``"all_gather"`` (every rank's moments, W x (2C + 1) values arrive at each rank),
    ``"all_reduce"`` (their sums: 2C + 1 values, whatever W, and 2C more in the rare steps whose
    channels lie so far from 0 that the sums cancel), or ``"auto"`` (the default): the cheaper of the
    two for the group's backend and size and the layer's channels by ``cost_model``
    (``syncbn/cost.py``; None: the model measured for Gloo, or NCCL's tuner's for an NCCL group; or
    a model, or the name of a shipped one, ``"gloo"`` or ``"nccl"``), shown in the repr once chosen.
    Both are exact: their statistics agree to float64's rounding. Which one runs, and every value
    its result depends on, comes from the step's data, what every rank received, and the layer's
    construction, never from one rank's history (docs/layer.md, "Agreement").

    Gradients: the input gradient is the gradient of the sum of every rank's loss; ``weight.grad``
    and ``bias.grad`` are this rank's share of it. DDP's averaging of all gradients therefore gives
    the gradient of the mean of the ranks' losses, as for every other layer.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        collective: str = "auto",
        cost_model: CostModel | str | None = None,
        group_size: int | None = None,
    ) -> None:
        # torch's keywords as torch takes them: ``bias`` (with ``affine``, a weight and no bias)
        # exists from torch 2.14 on, and only a torch that has it is passed it.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **({} if bias else {"bias": False}))
        _check_collective(collective)
        _check_group_size(group_size, process_group)
        if group_size is not None and dist.is_initialized():
            _bn_group(group_size)  # every rank builds the model: every rank makes every group, outside any graph
        self.group_size = group_size
        self.collective = collective
        self.cost_model = resolve_model(cost_model)  # ``auto``'s; None: by the group's backend
        self.auto_choice: str | None = None  # what ``auto`` chose in the last training step
        self.auto_key: tuple | None = None  # what it chose by: the model's inputs in that step
        self.process_group = process_group
        self.plain_class: type[_BatchNorm] | None = None
        self.last_input_dim: int | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_input(self, input)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Checked in full only when the input's rank or channels change (nn.Module's __setattr__
        # costs a microsecond): at one rank this layer must cost what F.batch_norm does.
        if input.dim() != self.last_input_dim or input.size(1) != self.num_features:
            self._check_input_dim(input)
            self.last_input_dim = input.dim()
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                self.running_mean is None and self.running_var is None, 0.0, self.eps)
        momentum, running_mean, running_var = self.momentum, None, None
        if self.track_running_stats:
            running_mean, running_var, batches = self.running_mean, self.running_var, self.num_batches_tracked
            if batches is not None:
                batches.add_(1)
                momentum = 1.0 / float(batches) if momentum is None else momentum
        momentum = 0.0 if momentum is None else momentum
        group = self._group()
        # Compiled, the cumulative average's momentum 1/n is a traced value, which F.batch_norm
        # cannot take without a graph break (pytorch/pytorch#194504); the synchronized core can.
        alone_compiled = self.momentum is None and running_mean is not None and torch.compiler.is_compiling()
        if group is not None or alone_compiled:
            collective = "all_gather" if group is None else self._collective_for(group)
            return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, momentum, self.eps, group,
                                   collective)
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, True, momentum, self.eps)

    def _collective_for(self, group: dist.ProcessGroup) -> str:
        """The collective of this step. ``auto`` asks the cost model for the group's backend and size
        and the layer's channels: what every rank of the group shares, so every rank chooses alike."""
        if self.collective != "auto":
            return self.collective
        # Chosen again only when what it depends on changes: the model costs microseconds a step.
        compiling = torch.compiler.is_compiling()
        key = (group.size(), group._get_backend_name(), self.cost_model, compiling)
        if key != self.auto_key:
            world_size, backend = key[:2]
            model = self.cost_model or model_for(backend)
            # Compiled, the all-reduce's forward runs both its rounds at every step.
            self.auto_choice = model.choose(world_size, self.num_features, reduce_rounds=2 if compiling else 1)
            self.auto_key = key
        return self.auto_choice

    def extra_repr(self) -> str:
        chose = f" (chose {self.auto_choice})" if self.collective == "auto" and self.auto_choice else ""
        groups = "" if self.group_size is None else f", group_size={self.group_size}"
        return super().extra_repr() + f", collective={self.collective}{chose}{groups}"

    def _group(self) -> dist.ProcessGroup | None:
        """The group of more than one rank whose batches the training statistics span, or None: no
        group, a group of one, or a rank outside ``process_group``. (``ProcessGroup.size()`` rather
        than ``dist.get_world_size``: cheaper, and a group of one pays it on every call.)"""
        if self.group_size is not None:
            group = _bn_group(self.group_size) if dist.is_initialized() else None
        else:
            group = self.process_group or dist.group.WORLD
        return group if isinstance(group, dist.ProcessGroup) and group.size() > 1 else None


class GhostBatchNorm(_BatchNorm):
    """One process that normalizes like ``slices`` DDP ranks with plain, unsynchronized BatchNorm.

    In training, slice r of the batch is the samples r, r + S, r + 2S, ... (S = ``slices``): rank r's
    share of a global batch as ``DistributedSampler`` and the trainer deal out positions. Each
    slice is normalized with its own statistics. The running statistics
    follow slice 0 alone: under DDP's default ``broadcast_buffers=True`` every forward starts from
    rank 0's buffers, so rank 0's are the ones that last. ``tests/test_batchnorm.py`` checks the
    emulation against real Gloo ranks, step by step. Eval mode is plain BatchNorm.
    """

    def __init__(self, num_features: int, slices: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, True, True, device, dtype)
        if slices < 1:
            raise ValueError(f"GhostBatchNorm needs at least 1 slice, got {slices}")
        self.slices = slices

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_input(self, input)
        if self.training and input.size(0) % self.slices:
            raise ValueError(
                f"GhostBatchNorm with {self.slices} slices needs a batch divisible by {self.slices}, got {input.size(0)}"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        parts = [
            F.batch_norm(input[index :: self.slices], self.running_mean if index == 0 else None,
                         self.running_var if index == 0 else None, self.weight, self.bias, True, momentum, self.eps)
            for index in range(self.slices)
        ]
        return torch.stack(parts, dim=1).flatten(0, 1)


def _move_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    """Give ``target`` the very parameter and buffer objects of ``source``, its mode and its ``qconfig``."""
    for name in ("weight", "bias"):
        setattr(target, name, getattr(source, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(target, name, getattr(source, name))
    target.train(source.training)
    if hasattr(source, "qconfig"):  # quantization's settings travel with the layer, as torch's convert keeps them
        target.qconfig = source.qconfig
    return target


def _norm_args(module: _BatchNorm) -> dict:
    return dict(
        num_features=module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",
    )


def _replace_layers(module: nn.Module, replace, path: str = "") -> nn.Module:
    """Apply ``replace`` (layer, its dotted path -> new layer, or None to descend) through the tree."""
    replaced = replace(module, path)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        new_child = _replace_layers(child, replace, f"{path}.{name}" if path else name)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None,
                           collective: str = "auto", cost_model: CostModel | str | None = None,
                           group_size: int | None = None) -> nn.Module:
    """Replace every torch BatchNorm (1d/2d/3d, ``nn.SyncBatchNorm``) in ``module`` by ours, each with
    ``collective``, ``cost_model`` and ``group_size`` (BN groups of that many consecutive ranks, made
    by ``bn_groups`` on every rank where the world exists, else at the first training step; under
    ``torch.compile``, convert after ``init_process_group``). ``GhostBatchNorm``, which emulates unsynchronized ranks on
    purpose, is left as it is; a lazy BatchNorm that has not seen an input yet is refused (it has
    no channels yet: run one forward pass first, as DDP needs too).

    The new layers hold the same parameter and buffer objects and the same train/eval mode.
    Containers are changed in place; the (possibly new) root is returned.
    """

    _check_collective(collective)
    _check_group_size(group_size, process_group)
    cost_model = resolve_model(cost_model)  # refused here, even where no layer is converted
    if group_size is not None and dist.is_initialized():
        _bn_group(group_size)  # refused here too, and made on every rank even where no layer is converted

    def to_sync(layer: nn.Module, path: str) -> SyncBatchNorm | None:
        if not isinstance(layer, _BatchNorm) or isinstance(layer, (SyncBatchNorm, GhostBatchNorm)):
            return None
        if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
            raise ValueError(f"convert_sync_batchnorm: {type(layer).__name__} at {path or 'the root'!r} has not "
                             "seen an input yet, so it has no channels to synchronize; run one forward pass "
                             "before converting")
        converted = _move_state(layer, SyncBatchNorm(**_norm_args(layer), process_group=process_group,
                                                     collective=collective, cost_model=cost_model,
                                                     group_size=group_size))
        if not isinstance(layer, nn.SyncBatchNorm):
            converted.plain_class = type(layer)
        return converted

    return _replace_layers(module, to_sync)


def _plain_class_for(layer: SyncBatchNorm) -> type[_BatchNorm]:
    if layer.plain_class is not None:
        return layer.plain_class
    if layer.last_input_dim is None:
        raise ValueError(
            "revert_sync_batchnorm cannot tell whether a SyncBatchNorm should become BatchNorm1d, 2d or 3d: "
            "it was not made by convert_sync_batchnorm and has not seen an input yet; run one forward pass first"
        )
    if layer.last_input_dim not in _PLAIN_BY_INPUT_DIM:
        raise ValueError(f"no plain torch BatchNorm takes the {layer.last_input_dim}D input this SyncBatchNorm last saw")
    return _PLAIN_BY_INPUT_DIM[layer.last_input_dim]


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Inverse of :func:`convert_sync_batchnorm`, for single-device inference and export.

    Each ``SyncBatchNorm`` becomes the plain torch BatchNorm class it was converted from, or else the
    one for the input rank it last saw, holding the same parameter and buffer objects.
    """

    def to_plain(layer: nn.Module, path: str) -> _BatchNorm | None:
        if not isinstance(layer, SyncBatchNorm):
            return None
        return _move_state(layer, _plain_class_for(layer)(**_norm_args(layer)))

    return _replace_layers(module, to_plain)
