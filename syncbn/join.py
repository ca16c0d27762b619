"""Uneven inputs: torch's ``Join`` with the layer's own ``Joinable``, so that DDP ranks that run out of
batches take part in the synchronized BatchNorm steps of the ranks that have not.

    with syncbn.join(ddp_model):              # syncbn.join(ddp_model, zero_optimizer, ...): other Joinables too
        for x, y in loader:                    # ranks may hold different numbers of batches
            loss_fn(ddp_model(x), y).backward()
            optimizer.step(); optimizer.zero_grad()

torch's ``Join`` lets a rank that has joined shadow DDP's collectives, but nothing shadows a
synchronized BatchNorm's, so its peers would wait for it forever (torch documents
``nn.SyncBatchNorm`` as unsupported there). Here a rank that has joined runs, each time its peers
run a step, the model itself on an empty batch (its last batch's shape, no samples) and backward
through the outputs its own last step's loss used (in a thread, beside DDP's own join hook): every
SyncBatchNorm layer then issues exactly the collectives its peers issue, in their order (a branching model's, a second all-reduce round's
included: the same code decides), contributing no value, and updates its running statistics with
the same numbers as they do. So each step's statistics are those of the ranks still training, the
gradients follow DDP's rule (a joined rank contributes zeros, divided by the initial world size),
and every rank ends with the same parameters (DDP's last-joiner broadcast) and running statistics.

The layers' collectives move to a process group of their own (a twin of each group, with the same
ranks) while the context is open, because a joined rank issues them in this Joinable's hook, not
interleaved with DDP's gradient buckets as its peers do; the twins are made on every rank when the
context opens and dropped when it closes. Requirements (docs/layer.md): DDP without
``broadcast_buffers`` (``forward_sync_buffers`` from torch 2.14: a broadcast before each forward
would block the peers before the layer's collectives), checked when the context opens; only
training steps inside the context, as DDP's own Join assumes; a model that accepts an empty batch;
every step with the same arguments beside the batch and the same outputs used by its loss (a
joined rank repeats its own last step's), which the ranks check at the end by comparing their
running statistics. A rank that runs no batch at all inside the context needs ``example``, one
batch (its positional arguments) to take the shape of, and backpropagates through every output.
A rank that cannot take part says why and ends its process, which fails its peers' collectives at
once. ``syncbn.joinable(model)`` gives the Joinable for a ``Join`` of your own, listed first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_flatten, tree_map

from syncbn.batchnorm import SyncBatchNorm, _bn_group


def _emptied(args: tuple, kwargs: dict) -> tuple:
    """A step's arguments with each batch tensor as a batch of zero samples (same trailing shape,
    dtype, device, grad flag). The batch is the first tensor argument's first dimension: tensors of
    that length are per-sample and emptied; other tensors (a per-feature scale) and non-tensors are
    kept as they are."""
    leaves = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor) and leaf.dim()]
    batch = leaves[0].size(0) if leaves else None

    def empty(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.size(0) != batch:
            return value
        return value.new_empty((0, *value.shape[1:])).requires_grad_(value.requires_grad)

    return tree_map(empty, (tuple(args), dict(kwargs)))


class SyncBatchNormJoinable(Joinable):
    """The layer's Joinable for ``model`` (a DDP module or a plain one): records each step's input
    shapes and the outputs its loss used, tells ``Join`` that this rank has not joined, and, once it
    has, runs the model on an empty batch for each of its peers' steps (``_Shadow``)."""

    def __init__(self, model: nn.Module, example: Any = None) -> None:
        super().__init__()
        ddp = model if isinstance(model, DistributedDataParallel) else None
        if ddp is not None and getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", False)):
            raise ValueError("syncbn.join: the DDP module broadcasts its buffers before every forward, a collective "
                             "its joined ranks cannot shadow before the layer's; build it with broadcast_buffers=False "
                             "(forward_sync_buffers=False from torch 2.14): the layer's statistics are equal on every "
                             "rank already")
        self.model = model
        self.network = ddp.module if ddp is not None else model
        self.layers = [m for m in self.network.modules() if isinstance(m, SyncBatchNorm)]
        self._process_group = ddp.process_group if ddp is not None else dist.group.WORLD
        parameter = next(self.network.parameters(), None)
        self._device = parameter.device if parameter is not None else torch.device("cpu")
        self._step: tuple | None = None if example is None else _emptied(example if isinstance(example, tuple)
                                                                         else (example,), {})
        self._used: set[int] = set()  # which outputs of the last step a loss reached
        self._last_used: set[int] = set()
        self._shadowing = False  # a plain module's own hooks run in the shadow steps too: they skip them
        # Each layer's group as it runs (a BN group of group_size made here, on every rank, if not yet);
        # a layer alone (group_size 1) runs no collective and keeps its settings.
        self.layers = [layer for layer in self.layers if layer.group_size != 1]
        self._settings = [(layer.process_group, layer.group_size) for layer in self.layers]
        self._groups = [_bn_group(size) if size is not None else group for group, size in self._settings]
        self._twins = _twin_groups(self._groups)
        for layer, group in zip(self.layers, self._groups):
            layer.process_group, layer.group_size = self._twins[_ranks(group)], None
        # Groups smaller than the training group can end, all their ranks joined, while others train:
        # then each step says which ranks still train (decided from the twins, which every rank holds).
        whole = _ranks(self._process_group)
        self._activity = dist.new_group(list(whole)) if any(ranks != whole for ranks in self._twins) else None
        self._activity_sent: tuple[torch.Tensor, dist.Work] | None = None
        self.closed = False
        self._hooks = [model.register_forward_pre_hook(self._before_step, with_kwargs=True),
                       model.register_forward_hook(self._after_step)]

    def _before_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._shadowing:
            return
        if self._join_config.enable and not self._join_config.is_first_joinable:
            raise RuntimeError("syncbn.joinable(model) must come first in Join's list of joinables: its hook runs "
                               "the layers' collectives, which must not wait behind another joinable's")
        self._step = _emptied(args, kwargs)
        self._last_used, self._used = self._used, set()
        Join.notify_join_context(self)
        if self._activity is not None:
            self._wait_activity()
            training = torch.zeros(dist.get_world_size(), device=self._device)
            training[dist.get_rank()] = 1
            self._activity_sent = training, dist.all_reduce(training, group=self._activity, async_op=True)

    def _wait_activity(self) -> None:
        if self._activity_sent is not None:
            self._activity_sent[1].wait()
            self._activity_sent = None

    def _layers_with_peers(self) -> list[SyncBatchNorm]:
        """The layers whose group holds a rank that trains this step (every layer, without BN groups)."""
        if self._activity is None:
            return self.layers
        training = torch.zeros(dist.get_world_size(), device=self._device)
        dist.all_reduce(training, group=self._activity)
        ranks = set(training.nonzero().flatten().tolist())
        return [layer for layer, group in zip(self.layers, self._groups) if ranks & set(_ranks(group))]

    def _after_step(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._shadowing:
            return
        for index, tensor in enumerate(tree_flatten(output)[0]):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(lambda grad, index=index: self._used.add(index))

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return _Shadow(self)

    @property
    def join_device(self) -> torch.device:
        return self._device

    @property
    def join_process_group(self) -> dist.ProcessGroup:
        return self._process_group

    def shadow_step(self) -> None:
        """One of the peers' steps, on an empty batch of this rank's last step's shape, for the layers
        whose group still trains; every other BatchNorm (alone, or in a group whose ranks have all
        joined) is left as it was, in eval mode for the step, as one process that no longer holds
        their batches would leave it. Nothing runs where no layer has a peer that trains."""
        shadowed = self._layers_with_peers()
        if not shadowed:
            return
        if self._step is None:
            raise RuntimeError(f"syncbn.join: rank {dist.get_rank()} ran no batch inside the join context and was "
                               "given no example, so it cannot take part in its peers' steps; pass "
                               "syncbn.join(model, example=one_batch)")
        args, kwargs = self._step
        # The outputs this rank's last step backpropagated through; having run none, every output.
        used = self._used or self._last_used or None
        resting = [m for m in self.network.modules()
                   if isinstance(m, _BatchNorm) and m.training and not any(m is layer for layer in shadowed)]
        self._shadowing = True
        try:
            for module in resting:
                module.training = False
            outputs = tree_flatten(self.network(*args, **kwargs))[0]
            roots = [t for i, t in enumerate(outputs)
                     if (used is None or i in used) and isinstance(t, torch.Tensor) and t.requires_grad]
            if roots:
                torch.autograd.backward(roots, [torch.zeros_like(t) for t in roots])
        finally:
            for module in resting:
                module.training = True
            self._shadowing = False

    def check_statistics_agree(self) -> None:
        """Every rank must end with its group's running statistics: a joined rank that took other
        steps than its peers' (its last step's non-batch arguments or loss outputs were not theirs)
        would not, and says so here, on every rank, rather than train on silently. Each layer is
        compared among the ranks of its own group (BN groups differ from one another by design)."""
        mine = torch.tensor([_digest(layer) for layer in self.layers], dtype=torch.float64, device=self._device)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(self._process_group))]
        dist.all_gather(everyone, mine, group=self._process_group)
        table = torch.stack(everyone) if everyone else mine.new_empty(0, 0)
        for index, group in enumerate(self._groups):
            column = table[list(_ranks(group)), index]
            if not torch.equal(column, column[:1].expand_as(column)):
                raise RuntimeError("syncbn.join: the ranks ended with different running statistics: a joined rank's "
                                   "steps were not its peers' (each joined rank repeats the arguments other than the "
                                   "batch, and the outputs its loss used, of its own last step; docs/layer.md)")

    def drop_twins(self) -> None:
        self._wait_activity()
        for twin in [*self._twins.values(), self._activity]:
            if isinstance(twin, dist.ProcessGroup):  # a rank outside a group holds a placeholder
                dist.destroy_process_group(twin)
        self._twins, self._activity = {}, None

    def close(self) -> None:
        """The layers back on their own groups, the hooks removed, the twins dropped."""
        self.closed = True
        for hook in self._hooks:
            hook.remove()
        for layer, (group, size) in zip(self.layers, self._settings):
            layer.process_group, layer.group_size = group, size
        self.drop_twins()


class _Shadow(JoinHook):
    """Each of the peers' steps in a thread of its own, so that DDP's join hook, which runs next, can
    take part in the collectives its peers make on their own group before and after the layers'
    (rebuilding the gradient buckets, before the forward; the buckets, after) while the thread takes
    part in the layers'. A step's thread is waited for before the next, and at the end."""

    def __init__(self, joinable: SyncBatchNormJoinable) -> None:
        self.joinable = joinable
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            self.joinable.shadow_step()
        except BaseException as error:
            print(f"syncbn.join: rank {dist.get_rank()} could not take part in its peers' step, and ends: "
                  f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
            # Its peers wait for it in the layers' collectives, and the main thread in DDP's: only the
            # end of this process closes its connections, which fails their collectives at once
            # rather than at the process group's timeout (30 minutes by default).
            os._exit(1)

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def main_hook(self) -> None:
        self.wait()
        self.thread = threading.Thread(target=self._run, name="syncbn-join-shadow", daemon=True)
        self.thread.start()

    def post_hook(self, is_last_joiner: bool) -> None:
        try:
            self.wait()
            self.joinable.check_statistics_agree()
        finally:
            self.joinable.close()


def _digest(layer: SyncBatchNorm) -> int:
    """48 bits of a SHA-256 of a layer's running statistics (exact in a float64)."""
    digest = hashlib.sha256()
    for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
        if buffer is not None:
            digest.update(buffer.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:6], "big")


def _ranks(group: dist.ProcessGroup | None) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group or dist.group.WORLD))


def _twin_groups(groups: list[dist.ProcessGroup | None]) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """A new group for each group any rank's layers use, made by every rank in the same order (torch
    requires every rank to create every group): the ranks' lists are gathered first."""
    mine = sorted({_ranks(group) for group in groups})
    everyone: list[list[tuple[int, ...]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    all_groups = sorted({ranks for listed in everyone for ranks in listed})
    return {ranks: dist.new_group(list(ranks)) for ranks in all_groups}


def joinable(model: nn.Module, example: Any = None) -> SyncBatchNormJoinable:
    """The layer's Joinable, for a ``Join`` of your own: list it first, then ``model`` if it is a
    DDP module, then any other joinables. Call on every rank (it makes the twin groups)."""
    return SyncBatchNormJoinable(model, example)


@contextlib.contextmanager
def join(model: nn.Module, *joinables: Joinable, example: Any = None,
         throw_on_early_termination: bool = False) -> Iterator[SyncBatchNormJoinable]:
    """torch's ``Join`` over the layer's Joinable, ``model`` (if a DDP module) and ``joinables``."""
    layer_joinable = joinable(model, example)
    ddp = [model] if isinstance(model, DistributedDataParallel) else []
    try:
        with Join([layer_joinable, *ddp, *joinables], throw_on_early_termination=throw_on_early_termination):
            yield layer_joinable
    finally:
        if not layer_joinable.closed:  # an exception inside skips Join's post hooks
            layer_joinable.close()
