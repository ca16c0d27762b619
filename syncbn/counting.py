"""Counting the collectives a block of code issues, by the profiler, which sees every c10d op
(from Python or from DDP's C++ reducer) whatever the backend: the tests' and the bench's way to
check one collective each way."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator

from torch.profiler import ProfilerActivity, profile


# Kineto's own notices ("USDT: ... profiler_start", "STAGE: ...", a CUDA probe's "ERROR: ...") are
# written by its C++ logger straight to file descriptor 2, whatever its log level says.
_KINETO_NOTICE = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def _without_kineto_notices() -> Iterator[None]:
    """Hold back what is written to fd 2 inside the block, then pass on all but Kineto's notices."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _KINETO_NOTICE.match(line)))


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count the collectives this process issues inside the block, by name (``c10d::allreduce_``...).

    Every c10d collective, from Python or from DDP's C++ reducer, passes through the dispatcher as
    a ``c10d::`` op, so the profiler sees them all, whatever the backend. The counter is filled
    when the block exits.
    """
    counts: Counter = Counter()
    prof = profile(activities=[ProfilerActivity.CPU])
    with _without_kineto_notices():
        prof.start()
    try:
        yield counts
    finally:
        with _without_kineto_notices():
            prof.stop()
    counts.update(event.name for event in prof.events() if event.name.startswith("c10d::"))
