"""The layer's collectives: started on the process group's own calls, waited for when the result is
needed, and a failure named by the layer's phase and the collective. Traced by ``torch.compile``,
the functional collectives instead, ordered inside the graph by their data dependences."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# The process group's own all-gather (torch 2.14 named it all_gather_single), not the ``dist``
# function around it: that wrapper's checks are Python work on every call, and CPU work right
# after a latency-bound collective costs more than its own time (docs/performance.md).
_group_all_gather = getattr(dist.ProcessGroup, "all_gather_single", None) or dist.ProcessGroup._allgather_base


def start_sum(packed: torch.Tensor, group: dist.ProcessGroup | None, phase: str,
              collective: str) -> Callable[[], torch.Tensor]:
    """Start adding up every rank's ``packed``: an all-reduce, or an all-gather whose rows are then
    added in rank order; either way every rank gets the same bits."""
    if collective == "all_reduce":
        return start_all_reduce(packed, group, phase)
    gathered = start_all_gather(packed, group, phase)
    return lambda: gathered().sum(0)


def start_all_reduce(packed: torch.Tensor, group: dist.ProcessGroup | None, phase: str) -> Callable[[], torch.Tensor]:
    """Start summing ``packed`` over the group, in place; the function returned waits for the sum.
    Gloo's and NCCL's algorithms reduce each part of the vector once and hand that result to every
    rank, so every rank gets the same bits. The process group's own call, as for the all-gather."""
    if group is None:
        return lambda: packed
    if torch.compiler.is_compiling():
        summed = funcol.all_reduce(packed, "sum", group)
        return lambda: summed
    return _started(lambda: group.allreduce([packed]), packed, phase, group.size(), "all_reduce")


def start_all_gather(packed: torch.Tensor, group: dist.ProcessGroup | None, phase: str) -> Callable[[], torch.Tensor]:
    """Start gathering every rank's ``packed`` as the rows of a (W, n) tensor; the function returned
    waits for them. Work that does not need them belongs in between, while they travel: on a
    latency-bound collective (Gloo, small payloads) CPU work there costs nothing as long as it takes
    less time than the collective, and work placed after it costs more than its own time
    (``python -m syncbn.bench``: local BN's work after the collectives and while they travel)."""
    if group is None:  # this rank alone
        return lambda: packed.view(1, -1)
    world_size = group.size()
    if torch.compiler.is_compiling():
        # Traced as a functional collective: inside the graph, ordered by its data dependences.
        gathered = funcol.all_gather_tensor(packed, 0, group).view(world_size, -1)
        return lambda: gathered
    out = packed.new_empty(world_size * packed.numel())
    return _started(lambda: _group_all_gather(group, out, packed), out.view(world_size, -1), phase, world_size,
                    "all_gather")


def _started(start: Callable[[], dist.Work], result: torch.Tensor, phase: str, world_size: int,
             collective: str) -> Callable[[], torch.Tensor]:
    """Start a collective that writes ``result``; the function returned waits for it. A failure,
    starting or waiting, names the layer's phase and the collective."""
    try:
        work = start()
    except RuntimeError as error:
        raise _failed(phase, world_size, error, collective) from error

    def wait() -> torch.Tensor:
        try:
            work.wait()
        except RuntimeError as error:
            raise _failed(phase, world_size, error, collective) from error
        return result

    return wait


def _failed(phase: str, world_size: int, error: RuntimeError, collective: str = "all_gather") -> RuntimeError:
    # The backend's message (a timeout, a closed connection) does not say which call it was.
    detail = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return RuntimeError(
        f"SyncBatchNorm {phase}: {collective} over {world_size} ranks failed, a rank stopped, died or took "
        f"a different path before joining it (process-group timeout / connection loss): {detail}"
    )
