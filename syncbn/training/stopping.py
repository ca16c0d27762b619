"""A run told to stop writes a checkpoint at the next step boundary and ends, losing nothing.

The signals: SIGTERM (a user's ``kill``, a launcher passing its own on, a scheduler preempting the
job) and SIGUSR1 (what ``launch/slurm.sbatch`` asks SLURM to send some time before the job's time
limit). A handler only notes the signal; every step, the ranks agree whether any of them got one, by
one MAX all-reduce started when the step starts and read when it ends (its latency hides behind
the step's work), so every rank stops after the same step, whichever rank the signal reached first.
Then rank 0 writes the checkpoint, every rank waits for it, rank 0 says so in one line where no
agent reports for it (``announce_with``: srun's tasks, a run of one process) and, for SIGUSR1, leaves
the file ``requeue`` in the run directory for the batch script, which requeues the job; every rank
waits for that too (srun ends a step's other tasks once one exits, which would cut the line), and
each ends: 143 for SIGTERM (the shell's 128 + 15), 0 for SIGUSR1 (the job goes on, requeued).
SIGINT (Ctrl-C) still stops at once (``syncbn.endings``).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from syncbn.distributed import DistContext

log = logging.getLogger(__name__)

# SIGTERM: the shell's 128 + 15. SIGUSR1: the step ends cleanly (srun adds no lines of its own), and
# the file REQUEUE_MARK tells the batch script to requeue the job.
STATUS = {signal.SIGTERM: 143, signal.SIGUSR1: 0, signal.SIGUSR2: 0}

REQUEUE_MARK = "requeue"  # in the run directory: stopped on SLURM's warning, to be requeued

_received = {"signal": 0, "at": 0.0}  # the stop signal this process got (0: none) and when
_announcer: list[Callable[[StopRequested], str]] = []  # rank 0's line on a stop, where it says one
_requeuers: dict[int, Callable] = {}  # a signal's handler to call after its stop (submitit's requeue)


def note(signum: int, frame=None) -> None:
    """The handler: remember the signal (SIGTERM outranks SIGUSR1: a preemption is not a requeue)."""
    if signum > _received["signal"]:
        _received["signal"], _received["at"] = signum, time.monotonic()


def listen(signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
    """Stop at the next step on these signals, in a rank's process."""
    for signum in signals:
        signal.signal(signum, note)


def announce_with(line: Callable[[StopRequested], str] | None) -> None:
    """Rank 0 prints ``line(stop)`` when the ranks stop (None: it stays silent: an agent reports)."""
    _announcer[:] = [] if line is None else [line]


def announcement(stop: StopRequested) -> str | None:
    return _announcer[0](stop) if _announcer else None


def requeue_with(signum: int, handler: Callable) -> None:
    """After a stop on ``signum``, rank 0 calls ``handler(signum, None)``: submitit's own handler for
    its signal, which calls the job's checkpoint, requeues the job and ends the process."""
    _requeuers[signum] = handler


def requeuer(signum: int) -> Callable | None:
    return _requeuers.get(signum)


def received() -> int:
    return _received["signal"]


def seconds_since_signal() -> float | None:
    """Since this process noted its stop signal; None where only a peer got one."""
    return time.monotonic() - _received["at"] if _received["signal"] else None


class StopRequested(Exception):
    """Raised on every rank after the checkpoint of the step at which the ranks agreed to stop."""

    def __init__(self, signum: int, epoch: int, step: int):
        self.signum, self.epoch, self.step = signum, epoch, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch}, step {step}")

    @property
    def status(self) -> int:
        return STATUS[signal.Signals(self.signum)]


class StopVote:
    """Every step's agreement: the largest stop signal any rank has noted (0: go on)."""

    def __init__(self, ctx: DistContext):
        self.alone = ctx.world_size == 1
        self.flag = torch.zeros(1, dtype=torch.int32, device=ctx.device)
        self.work: dist.Work | None = None

    def start(self) -> None:
        if not self.alone:
            self.flag.fill_(received())
            self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)

    def result(self) -> int:
        if self.alone:
            return received()
        self.work.wait()
        return int(self.flag.item())


def stop(signum: int, ctx: DistContext, epoch: int, step: int, run_dir: Path | None) -> NoReturn:
    """After the checkpoint of the step at which the ranks agreed to stop (rank 0 writes it): every
    rank waits until it is on disk, rank 0 logs it, leaves the requeue mark for SIGUSR1 and says
    where the run stopped, every rank waits for that too, then ``StopRequested`` on every rank."""
    everyone_waits(ctx)
    stopped = StopRequested(signum, epoch, step)
    if ctx.is_main:
        since = seconds_since_signal()
        log.info("stopping on %s: checkpoint written at epoch %d, step %d%s", signal.Signals(signum).name, epoch, step,
                 "" if since is None else f", {since:.2f} s after the signal")
        if signum == signal.SIGUSR1 and run_dir is not None:
            (run_dir / REQUEUE_MARK).write_text(f"epoch {epoch}, step {step}\n")
        if (line := announcement(stopped)) is not None:
            print(f"syncbn.train: {line}", file=sys.stderr, flush=True)
    everyone_waits(ctx)
    raise stopped


def everyone_waits(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()
