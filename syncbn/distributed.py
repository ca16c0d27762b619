"""Process-group plumbing: setup and teardown, backend and device choice, rank-0 helpers."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count the collectives this process issues inside the block, by name (``c10d::allreduce_``...).

    Every c10d collective, from Python or from DDP's C++ reducer, passes through the dispatcher as
    a ``c10d::`` op, so the profiler sees them all, whatever the backend. The counter is filled
    when the block exits.
    """
    counts: Counter = Counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield counts
    counts.update(event.name for event in prof.events() if event.name.startswith("c10d::"))
