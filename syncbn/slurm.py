"""A task that SLURM's ``srun`` started is a rank, as a torchrun worker is: its place is read from
SLURM's variables and given torchrun's names, so the rest of the trainer has one launched path.

``srun`` (not ``sbatch``) sets ``SLURM_STEP_NUM_TASKS``: a batch script's own shell has the job's
variables too, but it is one process, not a rank. Where torchrun runs under ``srun`` (one task per
node), torchrun's own variables are already set and win.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from syncbn.errors import ConfigError

PORTS = (29500, 16_000)  # the rendezvous port of a job step: the first, and how many are used


def first_host(hostlist: str) -> str:
    """The first host of a SLURM host list: ``node[07-09,12],gpu1`` -> ``node07``."""
    depth, end = 0, len(hostlist)
    for at, char in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = at
            break
    host = hostlist[:end]
    while "[" in host:
        prefix, rest = host.split("[", 1)
        ranges, suffix = rest.split("]", 1)
        host = prefix + ranges.split(",")[0].split("-")[0] + suffix
    return host


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks per node, ``2(x3),1`` -> ``[2, 2, 2, 1]``, in node order."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if match is None:
            raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={spec} is not SLURM's count(xN),... form")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def rendezvous_port(job_id: str, step_id: str) -> int:
    """A port every task of the step derives alike; two steps running at once get two ports."""
    first, count = PORTS
    return first + (int(job_id) * 16 + int(step_id)) % count


def torchrun_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a task ``srun`` or submitit's local executor started, else
    nothing. ``MASTER_ADDR`` and ``MASTER_PORT`` set by the user (for a port the cluster allows)
    are kept."""
    if "RANK" in environ:
        return {}
    if "SUBMITIT_LOCAL_GLOBALID" in environ:
        return submitit_local_variables(environ)
    if "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])[int(environ["SLURM_NODEID"])]),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(environ["SLURM_STEP_NODELIST"]),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(rendezvous_port(environ["SLURM_JOB_ID"],
                                                                         environ["SLURM_STEP_ID"])),
    }


def in_submitit_job(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a task of a job submitit started (its local executor's or SLURM's)."""
    return "SUBMITIT_EXECUTOR" in environ


def submitit_requeue() -> tuple[signal.Signals, Callable] | None:
    """In a submitit job: the signal submitit asks for before a time limit or a preemption (SIGUSR2
    unless SUBMITIT_PREEMPT_SIGNAL), and the handler it set for it, which calls the job's
    ``checkpoint``, requeues the job and exits (its checkpoint-and-requeue protocol)."""
    if not in_submitit_job():
        return None
    signum = signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]
    return signum, signal.getsignal(signum)


def is_task(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a process that ``srun`` started (a rank, or torchrun under srun)."""
    return "SLURM_STEP_NUM_TASKS" in environ


def how_to_resume(environ: Mapping[str, str], run_dir: Path) -> str:
    """A job resumes by its own ID (requeued, it keeps its directory) or by a new one given the directory."""
    return (f"scontrol requeue {environ['SLURM_JOB_ID']}, or sbatch with SYNCBN_RUN_DIR={run_dir}, "
            f"resumes from {run_dir}")


def submitit_local_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """submitit's local executor starts a job's tasks on this machine, as srun would on one node."""
    tasks = environ["SUBMITIT_LOCAL_NTASKS"]
    return {"RANK": environ["SUBMITIT_LOCAL_GLOBALID"], "WORLD_SIZE": tasks,
            "LOCAL_RANK": environ["SUBMITIT_LOCAL_LOCALID"], "LOCAL_WORLD_SIZE": tasks,
            "MASTER_ADDR": environ.get("MASTER_ADDR") or "127.0.0.1",
            "MASTER_PORT": environ.get("MASTER_PORT") or str(rendezvous_port(environ["SUBMITIT_LOCAL_JOB_ID"], "0"))}


class TaskThreads(Callback):
    """Hydra callback (every multirun, conf/config.yaml). A multirun sent through submitit starts
    each rank as a process of its own: their ``OMP_NUM_THREADS`` is set here, before they start, to
    the CPUs each task is given (1 unless ``hydra.launcher.cpus_per_task``), as torchrun sets 1 for
    its ranks. A process that starts with another count can round differently (seen here: the last
    bits of the first epoch's loss against the same job on ``dist.nproc=2``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = config.hydra.launcher
        if "submitit" in str(launcher.get("_target_", "")):
            os.environ.setdefault("OMP_NUM_THREADS", str(launcher.get("cpus_per_task") or 1))
