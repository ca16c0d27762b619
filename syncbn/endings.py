"""How a run ends when it does not finish: a signal, or a known failure, each in one line that says
where training stopped and how to resume (a traceback only with ``--debug``), with the exit status
a shell expects; a rank started by an agent hands its failure to the agent instead.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from syncbn import distributed, slurm
from syncbn.errors import ConfigError
from syncbn.training import checkpoint, stopping
from syncbn.training.checkpoint import CheckpointError
from syncbn.training.data import DataError


EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as a shell reports it


def ranks_die_on_interrupt() -> None:
    """A rank that an agent started (torchrun, the CPU simulation) ends at once on Ctrl-C, silently:
    the agent gets the same signal, stops every rank and reports it once. The checkpoint on disk is
    always complete (written aside, then renamed), so nothing is lost but the steps since it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def raise_on_sigterm(signum: int, frame) -> None:
    raise SignalException(f"Process {os.getpid()} got signal: {signal.Signals(signum)}", sigval=signal.Signals(signum))


def interrupting_signal(error: BaseException) -> signal.Signals | None:
    """SIGINT or SIGTERM if ``error`` is how one reached this process (or killed its ranks first)."""
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(error, SignalException):
        return error.sigval
    if isinstance(error, ChildFailedError):
        _, failure = error.get_first_failure()
        if -failure.exitcode in EXIT_STATUS:
            return signal.Signals(-failure.exitcode)
        if failure.exitcode == EXIT_STATUS[signal.SIGTERM]:  # a rank that stopped at a step on SIGTERM
            return signal.SIGTERM
    return None


def where_training_stopped(run_dir: Path | None, resume: str) -> str:
    if run_dir is None:
        return "before training started"
    state = checkpoint.load(run_dir)
    if state is None:
        return f"before the first checkpoint; {run_dir} has nothing to resume"
    progress = state["progress"]
    return f"at epoch {progress['epoch']}, step {progress['step']} (the last checkpoint); {resume}"


def stopped_line(stop: stopping.StopRequested, run_dir: Path, resume: str) -> str:
    """A stop at a step boundary (``syncbn.training.stopping``): its checkpoint is the last one."""
    if stop.signum == signal.SIGUSR1:
        where = where_training_stopped(run_dir, resume).replace("; ", "; launch/slurm.sbatch requeues the job, or ", 1)
        return f"stopped by SIGUSR1 (SLURM's warning before the time limit) {where}"
    return f"interrupted by {signal.Signals(stop.signum).name} {where_training_stopped(run_dir, resume)}"


@contextlib.contextmanager
def interrupts_in_one_line(run_dir: Path | None = None, resume: str = "") -> Iterator[None]:
    """Ctrl-C or SIGTERM: every rank is stopped (the launcher's job), then one line and 130 / 143.
    A rank that stopped at a step boundary ends with its signal's status: silently where an agent
    started it (the agent's process reports), else with the line from rank 0."""
    try:
        yield
    except stopping.StopRequested as stop:  # rank 0 has said so, where no agent reports for it
        if os.environ.get("SYNCBN_DEBUG") == "1":
            raise
        requeue = stopping.requeuer(stop.signum)
        if requeue is not None and int(os.environ.get("RANK", 0)) == 0:
            requeue(stop.signum, None)  # submitit's protocol: the job's checkpoint, a requeue, the end
        distributed.leave(stop.status)
    except (KeyboardInterrupt, SignalException, ChildFailedError) as error:
        received = interrupting_signal(error)
        if received is None or os.environ.get("SYNCBN_DEBUG") == "1":
            raise
        print(f"syncbn.train: interrupted by {received.name} {where_training_stopped(run_dir, resume)}", file=sys.stderr)
        sys.exit(EXIT_STATUS[received])


def peer_failure(error: BaseException) -> bool:
    """A failure of the process group rather than of this rank's code: a peer that stopped, died or
    never joined (torch's store, network and backend errors; Gloo's transport errors, whose
    RuntimeError the layer's own message wraps)."""
    causes = [error, error.__cause__]
    return any(isinstance(cause, dist.DistError) or (isinstance(cause, RuntimeError) and "gloo/transport" in str(cause))
               for cause in causes)


def describe(error: BaseException) -> str:
    """One line for a known failure: Hydra's and OmegaConf's messages with their causes, a failed
    rank's own message, a failed submitit job's, a failed process group's, or ours."""
    if (job := describe_failed_job(error)) is not None:
        return job
    if peer_failure(error) and not isinstance(error, ChildFailedError):
        # Its last line says what the backend saw; this rank's traceback says nothing about the peer.
        detail = (str(error).strip().splitlines() or [""])[-1]
        return (f"rank {os.environ.get('RANK', 0)}: the process group failed (a peer stopped, died or never joined "
                f"within dist.timeout_s): {type(error).__name__}: {detail}")
    if isinstance(error, ChildFailedError):
        rank, failure = distributed.first_failure(error)
        reason = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        exit_text = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        return f"rank {rank} failed ({exit_text}): {reason}".rstrip(": ")
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or type(error).__name__}: {error.filename}"
    parts = [str(error)] + ([str(error.__cause__)] if isinstance(error, HydraException) and error.__cause__ else [])
    lines = [line.strip() for part in parts for line in part.splitlines()]
    lines = list(itertools.takewhile(lambda line: not line.startswith("Config search path"), lines))
    return " ".join(line for line in lines if line and not line.startswith(("reference_type", "object_type")))


class JobFailed(RuntimeError):
    """A job of a submitit multirun failed; its message is the job's one line."""


def describe_failed_job(error: BaseException) -> str | None:
    """The one line of a submitit job that failed (submitit's FailedJobError carries the job's
    traceback, whose last line is the ``JobFailed`` raised there), or None for anything else."""
    if isinstance(error, JobFailed):  # handed back by Hydra's submitit launcher as the job's result
        found = str(error)
    elif type(error).__name__ == "FailedJobError":  # submitit's, for a job that ended otherwise
        lines = [line.removeprefix(f"{__name__}.JobFailed: ") for line in str(error).splitlines()
                 if line.startswith(f"{__name__}.JobFailed: ")]
        found = lines[-1] if lines else str(error).strip().splitlines()[0]
    else:
        return None
    return f"a job of the multirun failed: {found.removeprefix('syncbn.train: error: ')}"


# OSError: a run directory that cannot be made or written (Hydra makes it before the app runs).
KNOWN_FAILURES = (ConfigError, DataError, CheckpointError, HydraException, OmegaConfBaseException, ChildFailedError,
                  OSError)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Known failures end the process with one line on stderr (a traceback with ``--debug``).

    It exits from inside the Hydra job too, so that Hydra adds no lines of its own."""
    try:
        yield
    except Exception as error:
        if os.environ.get("SYNCBN_DEBUG") == "1":
            raise
        if "TORCHELASTIC_ERROR_FILE" in os.environ:
            report_to_the_launcher(error)
        if slurm.is_task():
            # srun ends the step once a task fails: a rank whose collective failed because its peer
            # died is ended during this wait, silently (srun names the task that failed first)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            distributed.leave_after_the_launcher_looks()
        if not isinstance(error, KNOWN_FAILURES) and describe_failed_job(error) is None and not peer_failure(error):
            raise
        line = f"syncbn.train: error: {describe(error)}"
        print(line, file=sys.stderr)
        if slurm.in_submitit_job():  # an exception submitit hands back to the launching process
            raise JobFailed(line) from None
        sys.exit(1)


def report_to_the_launcher(error: Exception) -> NoReturn:
    """A torchrun rank's failure goes to the error file torchrun reads, unprinted: ``syncbn.torchrun``
    names the first rank to fail with its cause, in one line. Each rank printing its own would
    repeat it, and a rank that fails only because a peer died (its collective's connection reset)
    would print a traceback of that second failure."""
    distributed.record_failure(error)
    distributed.leave_after_the_launcher_looks()
    distributed.exit_now(1)
