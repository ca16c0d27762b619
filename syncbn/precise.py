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
population needs the layers before it finished, so the data is run once per layer (each pass stops
at the layer it measures: about L / 2 forward passes for L layers in a chain).

The population is the same whether the layers synchronize over the world, over BN groups, or not
at all: at inference every rank normalizes with one set of statistics, and with the weights equal
on every rank (DDP) the activations of the whole set are one population. So every rank's
statistics are merged over ``process_group`` (the world by default), whatever the layer's own group.
``num_batches_tracked`` is left as it is. Layers without running statistics, and layers the forward
does not call, are left alone; a layer the forward calls twice is refused (its second input would
depend on its own new statistics).
"""

from __future__ import annotations

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


def _layer_moments(network: nn.Module, layer: nn.Module, batches: Iterable, device: torch.device) -> torch.Tensor:
    """This rank's moments of everything ``layer`` receives over ``batches``."""
    total = torch.zeros(1 + 2 * layer.num_features, dtype=torch.float64, device=device)

    def measure(module: nn.Module, args: tuple) -> None:
        nonlocal total
        total = _merge(total, _moments(args[0]))
        raise _Reached

    hook = layer.register_forward_pre_hook(measure)
    try:
        for batch in batches:
            try:
                network(_input(batch, device))
            except _Reached:
                pass
    finally:
        hook.remove()
    return total


def _merged(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The ranks' moments merged in rank order: the same bits on every rank."""
    if group is None:
        return local
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, local, group=group)
    total = torch.zeros_like(local)
    for part in everyone:
        total = _merge(total, part)
    return total


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


def _agreed_order(order: list[str] | BaseException | None, group: dist.ProcessGroup | None) -> list[str]:
    """Every rank's order of the layers (or the error a rank met finding it), the same on every rank:
    a rank with no batch takes its peers', and one rank's error is every rank's."""
    everyone: list[list[str] | BaseException | None] = [order]
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
    return orders[0] if orders else []


def _own_order(network: nn.Module, batches: Iterable, device: torch.device) -> list[str] | BaseException | None:
    """This rank's order of the layers; None with no batch; the error of a batch or network it cannot measure."""
    first = next(iter(batches), None)
    if first is None:
        return None
    try:
        return _call_order(network, _input(first, device))
    except (TypeError, ValueError) as error:
        return type(error)(*error.args)  # without its traceback, which does not pickle


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
        names = _agreed_order(_own_order(network, batches, device), group)
        modules, counts = dict(network.named_modules()), {}
        for name in names:
            layer = modules[name]
            count, mean, m2 = _merged(_layer_moments(network, layer, batches, device), group).tensor_split(
                [1, 1 + layer.num_features])
            if count.item() < 2:
                raise ValueError(f"syncbn.precise_bn: BatchNorm layer {name!r} received {int(count.item())} value(s) "
                                 "per channel over the whole data; an unbiased variance needs 2 or more")
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(m2 / (count - 1))
            counts[name] = int(count.item())
        return counts
    finally:
        for module, training in modes.items():
            module.training = training
