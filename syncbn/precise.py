"""Exact distributed PreciseBN: each BatchNorm layer's running statistics recomputed, with the weights
as they are, as the population statistics of what the layer sees over a whole data set.

    syncbn.precise_bn(model, train_loader)     # on every rank, each with its shard; then evaluate

BatchNorm's running statistics are an exponential average of batch statistics taken while the
weights moved, from batches as small as the per-device (or BN-group) batch. Wu and Johnson
("Rethinking 'Batch' in BatchNorm", 2021) replace them after training by the population's: every
layer's ``running_mean`` and ``running_var`` become the mean and the unbiased variance, per channel,
of every value the layer receives over the given data. Here that is exact: each rank accumulates
the count, mean and sum of squared deviations of its shard in float64 (Chan's pairwise merge,
batch by batch), and the ranks' sums are merged the same way after one all-gather per layer, in
rank order, so every rank ends with the same bits, equal to one process's over the whole set.

Which inputs a layer sees: its inputs at inference. The layers run in eval mode, layer by layer in
the order the forward calls them, each layer's population taken with every layer before it already
normalizing by its new population statistics (as the network will at test time), so the statistics
describe exactly the activations that evaluation feeds each layer. torch's ``swa_utils.update_bn``
(and fvcore's PreciseBN) take one pass in train mode instead, where the earlier layers normalize by
each batch's own statistics, which are not what inference gives them. The price: a layer's
population needs the layers that feed it finished, so the data is run once per level: layers no
unfinished layer feeds share a pass (a NaN probe on one batch finds which layers feed which; siblings
such as a network's branches, or a fused sweep's members, are one level), each pass stopping at its
level's last layer, about L / 2 forward passes for a chain of L layers. Where a level held several
layers, one more pass checks that each layer's inputs give the same bits with every layer on its new
statistics (the probe can miss a dependency whose NaN a model hides), and measures again, one layer
at a time, from the first that does not.

The population is the same whether the layers synchronize over the world, over BN groups, or not
at all: at inference every rank normalizes with one set of statistics, and with the weights equal
on every rank (DDP) the activations of the whole set are one population. So every rank's
statistics are merged over ``process_group`` (the world by default), whatever the layer's own group.
``num_batches_tracked`` is left as it is. Layers without running statistics, and layers the forward
does not call, are left alone; a layer the forward calls twice is refused (its second input would
depend on its own new statistics).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel


class _Reached(Exception):
    """Raised by the measured layer's pre-hook: nothing after it is needed."""


def _input(batch: Any, device: torch.device) -> torch.Tensor:
    """A batch's input: the batch itself, or the first item of a tuple or list (a DataLoader's)."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor):
        raise TypeError("syncbn.precise_bn: each batch must be an input tensor, or a tuple or list whose first item "
                        f"is one, got {type(batch).__name__}" + (f" of {type(x).__name__}" if x is not batch else ""))
    return x.to(device, non_blocking=True)


def _call_order(network: nn.Module, batch: torch.Tensor) -> list[str]:
    """The names of the BatchNorm layers with running statistics, in the order one forward calls them."""
    calls: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
             for name, module in network.named_modules() if isinstance(module, _BatchNorm)]
    try:
        network(batch)
    finally:
        for hook in hooks:
            hook.remove()
    twice = next((name for name in calls if calls.count(name) > 1), None)
    if twice is not None:
        raise ValueError(f"syncbn.precise_bn: the forward calls BatchNorm layer {twice!r} {calls.count(twice)} times; "
                         "its later inputs would depend on its own new statistics, which have no single population")
    modules = dict(network.named_modules())
    return [name for name in calls if modules[name].running_mean is not None and modules[name].running_var is not None]


def _levels(network: nn.Module, batch: torch.Tensor, names: list[str]) -> list[int]:
    """Each layer's level: 0 where its input depends on no other layer's output, else one more than
    the highest level of the layers it depends on, found on one batch by making each layer's output
    NaN in turn and seeing which later layers' inputs turn NaN. Layers of one level are measured in
    one pass (siblings: the branches of a network, the members of a fused sweep); a network that
    cannot take a NaN leaves every layer a level of its own, one pass each."""
    modules, levels = dict(network.named_modules()), [0] * len(names)
    for index, name in enumerate(names):
        tainted: set[int] = set()
        hooks = [modules[name].register_forward_hook(lambda module, args, output: torch.full_like(output, float("nan")))]
        hooks += [modules[later].register_forward_pre_hook(
            lambda module, args, kwargs, j=j: tainted.add(j) if torch.isnan(_layer_input(args, kwargs)).any() else None,
            with_kwargs=True) for j, later in enumerate(names) if j > index]
        try:
            network(batch)
        except Exception:  # noqa: BLE001 - whatever it raises on NaN, one layer at a time is right
            return list(range(len(names)))
        finally:
            for hook in hooks:
                hook.remove()
        for later in tainted:
            levels[later] = max(levels[later], levels[index] + 1)
    return levels


def _merge(into: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Chan's merge of two ``[count, mean_0..C-1, M2_0..C-1]`` moment rows (float64)."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = (row.tensor_split([1, 1 + (row.numel() - 1) // 2]) for row in (into, part))
    n = n_a + n_b
    delta, share = mean_b - mean_a, n_b / n.clamp(min=1)  # two empty rows: zeros, not 0 / 0
    return torch.cat([n, mean_a + delta * share, m2_a + m2_b + delta.square() * (n_a * share)])


def _moments(x: torch.Tensor) -> torch.Tensor:
    """``[count, mean, M2]`` per channel (dim 1) of one batch, in float64."""
    values = x.detach().to(torch.float64).transpose(0, 1).reshape(x.size(1), -1)
    mean = values.mean(1) if values.size(1) else values.new_zeros(values.size(0))
    m2 = (values - mean[:, None]).square().sum(1)
    return torch.cat([values.new_tensor([values.size(1)]), mean, m2])


def _layers_moments(network: nn.Module, layers: list[nn.Module], batches: Iterable,
                    device: torch.device) -> list[torch.Tensor]:
    """This rank's moments of everything each of ``layers`` receives over ``batches``, in one pass
    each batch, cut once the last of them (in call order) has its input."""
    totals = [torch.zeros(1 + 2 * layer.num_features, dtype=torch.float64, device=device) for layer in layers]
    seen: set[int] = set()

    def measure(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        totals[index] = _merge(totals[index], _moments(_layer_input(args, kwargs)))
        seen.add(index)
        if len(seen) == len(layers):
            raise _Reached

    hooks = [layer.register_forward_pre_hook(functools.partial(measure, index), with_kwargs=True)
             for index, layer in enumerate(layers)]
    try:
        for batch in batches:
            seen.clear()
            try:
                network(_input(batch, device))
            except _Reached:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    return totals


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A BatchNorm's input, passed by position or as ``input=``."""
    return args[0] if args else kwargs["input"]


def _merged(local: list[torch.Tensor] | BaseException, shapes: list[int], group: dist.ProcessGroup | None,
            device: torch.device) -> list[torch.Tensor]:
    """The ranks' moments of each layer merged in rank order (one all-gather): the same bits on every
    rank. ``local`` is the error of a rank that could not run its batches: every rank raises, none
    waits for it (its flag travels with the moments)."""
    failed = isinstance(local, BaseException)
    rows = [torch.zeros(n, dtype=torch.float64, device=device) for n in shapes] if failed else local
    flat = torch.cat([*rows, torch.tensor([float(failed)], dtype=torch.float64, device=device)])
    everyone = [flat]
    if group is not None:
        everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, flat, group=group)
    if failed:
        raise local
    stopped = [rank for rank, part in enumerate(everyone) if part[-1].item()]
    if stopped:
        raise RuntimeError(f"syncbn.precise_bn: rank(s) {stopped} could not run their batches (their error says why)")
    totals = [torch.zeros_like(row) for row in rows]
    for part in everyone:
        totals = [_merge(total, row) for total, row in zip(totals, part[:-1].split(shapes))]
    return totals


def _check_batches(batches: Iterable) -> None:
    if iter(batches) is batches:
        raise TypeError("syncbn.precise_bn: batches must be iterable again for each layer (a list, a DataLoader), "
                        f"got a one-shot iterator ({type(batches).__name__})")


def _group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _device(network: nn.Module) -> torch.device:
    tensor = next(iter([*network.parameters(), *network.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


Plan = tuple[list[str], list[int]]  # the layers in call order, and each one's level


def _agreed_order(order: Plan | BaseException | None, group: dist.ProcessGroup | None) -> Plan:
    """Every rank's order of the layers (or the error a rank met finding it), the same on every rank:
    a rank with no batch takes its peers', and one rank's error is every rank's."""
    everyone: list[Plan | BaseException | None] = [order]
    if group is not None:
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, order, group=group)
    error = next((theirs for theirs in everyone if isinstance(theirs, BaseException)), None)
    if error is not None:
        raise error
    orders = [theirs for theirs in everyone if theirs is not None]
    if any(theirs != orders[0] for theirs in orders):
        raise RuntimeError(f"syncbn.precise_bn: the ranks' forwards call the BatchNorm layers in different orders: "
                           f"{orders[0]} and {next(o for o in orders if o != orders[0])}")
    if not orders:
        raise ValueError("syncbn.precise_bn: no rank has a batch: the statistics would be left as they were")
    return orders[0]


def _own_order(network: nn.Module, batches: Iterable, device: torch.device) -> Plan | BaseException | None:
    """This rank's order of the layers and their levels; None with no batch; the error of a batch or
    network it cannot measure."""
    first = next(iter(batches), None)
    if first is None:
        return None
    try:
        batch = _input(first, device)
        names = _call_order(network, batch)
        return names, _levels(network, batch, names)
    except (TypeError, ValueError, RuntimeError) as error:  # a batch of the wrong shape: RuntimeError
        return type(error)(*error.args)  # without its traceback, which does not pickle


def _measure(network: nn.Module, modules: dict[str, nn.Module], names: list[str], batches: Iterable,
             device: torch.device, group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """Measure ``names`` in one pass and set their statistics; their merged moment rows."""
    rows = _merged(_own_moments(network, [modules[name] for name in names], batches, device),
                   _shapes(modules, names), group, device)
    for name, row in zip(names, rows):
        _set_statistics(name, modules[name], row)
    return dict(zip(names, rows))


def _own_moments(network: nn.Module, layers: list[nn.Module], batches: Iterable,
                 device: torch.device) -> list[torch.Tensor] | BaseException:
    """``_layers_moments``, or the error of a batch this rank cannot run (for ``_merged`` to share)."""
    try:
        return _layers_moments(network, layers, batches, device)
    except Exception as error:  # noqa: BLE001 - any error of the rank's own batch is every rank's
        return error


def _shapes(modules: dict[str, nn.Module], names: list[str]) -> list[int]:
    return [1 + 2 * modules[name].num_features for name in names]


def _set_statistics(name: str, layer: nn.Module, row: torch.Tensor) -> None:
    count, mean, m2 = row.tensor_split([1, 1 + layer.num_features])
    if count.item() < 2:
        raise ValueError(f"syncbn.precise_bn: BatchNorm layer {name!r} received {int(count.item())} value(s) "
                         "per channel over the whole data; an unbiased variance needs 2 or more")
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(m2 / (count - 1))


def _verified(network: nn.Module, modules: dict[str, nn.Module], names: list[str], measured: dict[str, torch.Tensor],
              batches: Iterable, device: torch.device, group: dist.ProcessGroup | None) -> None:
    """Layers measured together are right only if none fed another (the NaN probe sees most ways one
    can, not all): one more pass over every layer, on the new statistics, must give each the same
    bits; from the first that differs, the layers are measured again one at a time, in call order.
    (Right, the new statistics are the population of inputs that they themselves produce: the same
    bits again. The statistics of a feed-forward network are the one set that does.)"""
    again = _merged(_own_moments(network, [modules[name] for name in names], batches, device),
                    _shapes(modules, names), group, device)
    wrong = next((index for index, (name, row) in enumerate(zip(names, again)) if not torch.equal(row, measured[name])),
                 None)
    for name in names[wrong:] if wrong is not None else []:
        measured.update(_measure(network, modules, [name], batches, device, group))


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable, process_group: dist.ProcessGroup | None = None) -> dict[str, int]:
    """Set every BatchNorm layer's running statistics of ``model`` (a DDP module's network) to the
    population statistics of its inputs over ``batches`` (this rank's shard; inputs, or tuples whose
    first item is the input), merged over ``process_group``'s ranks (the world). Call it on every
    rank. Returns the count of values per channel each layer's statistics are over, by name."""
    _check_batches(batches)  # before any collective: every rank calls it with the same kind of batches
    network = model.module if isinstance(model, DistributedDataParallel) else model
    group, device = _group(process_group), _device(network)
    modes = {module: module.training for module in network.modules()}
    network.eval()
    try:
        names, levels = _agreed_order(_own_order(network, batches, device), group)
        modules = dict(network.named_modules())
        measured: dict[str, torch.Tensor] = {}
        for level in sorted(set(levels)):
            together = [name for name, own in zip(names, levels) if own == level]
            measured.update(_measure(network, modules, together, batches, device, group))
        if len(set(levels)) < len(names):
            _verified(network, modules, names, measured, batches, device, group)
        return {name: int(row[0].item()) for name, row in measured.items()}
    finally:
        for module, training in modes.items():
            module.training = training
