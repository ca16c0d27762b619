"""Train the MNIST MLP with DDP and synchronized BatchNorm (Hydra app).

    python -m syncbn.train                                    # one process, world size 1
    python -m syncbn.train norm=bn model.weight_scale=0.05    # any key of conf/ can be overridden
    python -m syncbn.train dist.nproc=4                       # CPU simulation: 4 Gloo ranks here
    launch/torchrun.sh --standalone --nproc-per-node=4 -- norm=syncbn   # torchrun: NCCL on GPUs, else Gloo
    torchrun --standalone --nproc-per-node=2 -m syncbn.train hydra.run.dir=outputs/run1
    python -m syncbn.train +experiment=weight_scale_sweep dist.nproc=2       # the sweep, as one job
    python -m syncbn.train +experiment=weight_scale_sweep 'sweep.seeds=[0,1,2]'
    python -m syncbn.train -m +experiment=weight_scale_sweep_per_run dist.nproc=2   # a job per network
    python -m syncbn.train +experiment=batch_size_study       # per-device batch 64 ... 2, five norms, 4 fused jobs
    python -m syncbn.train -m +experiment=batch_size_study_per_run   # the same study, a run per row
    python -m syncbn.train hydra.run.dir=outputs/run1 dist.nproc=2 dist.max_restarts=2   # resumable
    python -m syncbn.train train.dtype=float64 dist.nproc=4   # float64: the same metrics at every world size
    python -m syncbn.train train.compile=true dist.nproc=2    # torch.compile the network, then DDP
    python -m syncbn.train --debug ...                        # tracebacks instead of one-line errors
    python -m syncbn.train --check ...                        # check the command, start nothing (exit 0 or 1)

Ctrl-C (or SIGTERM) stops every rank and prints where to resume, exit status 130 (143).

Under torchrun every rank runs this app: pass one ``hydra.run.dir`` to all of them (the launch/
scripts do); ranks other than 0 write nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from syncbn import distributed, launchers, slurm
from syncbn.endings import (KNOWN_FAILURES, interrupts_in_one_line, one_line_errors, raise_on_sigterm, stopped_line,
                            ranks_die_on_interrupt)
from syncbn.errors import ConfigError
from syncbn.plan import finished, plan_jobs, preflight
from syncbn.training import checkpoint, loop, stopping
from syncbn.training.config import Config, register, to_config

log = logging.getLogger("syncbn.train")
register()


def run_rank(config: Config, run_dir: Path) -> list[dict]:
    """One rank of the run, inside its process group."""
    with distributed.process_group(config.dist) as ctx:
        return loop.fit(config, ctx, run_dir)


def run_simulated_rank(config: Config, run_dir: Path) -> list[dict]:
    """A rank started by ``launch_local``: a fresh process, so set up its logging first."""
    ranks_die_on_interrupt()
    stopping.listen((signal.SIGTERM,))  # the launcher passes its SIGTERM on: stop at the next step
    if int(os.environ["RANK"]) == 0:
        logging.basicConfig(
            level=logging.INFO,
            format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
            handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")],
        )
    distributed.share_cpu_threads()
    try:
        with checkpoint.claim(run_dir, checkpoint.RANK_LOCK) if int(os.environ["RANK"]) == 0 else contextlib.nullcontext():
            history = run_rank(config, run_dir)
    except stopping.StopRequested as stop:  # checkpointed at the step: the launcher reports
        distributed.leave(stop.status)
    except BaseException:
        distributed.leave_after_the_launcher_looks()
        raise
    distributed.skip_teardown_at_exit()
    return history


def output_dir(hydra_config) -> Path:
    """The run's directory. An empty ``hydra.run.dir=`` is refused: Hydra would write the run into
    the working directory, among whatever else is there."""
    if not str(hydra_config.run.dir).strip():
        raise ConfigError("hydra.run.dir is empty: name a directory for the run, or leave the key out "
                          "(outputs/DATE/TIME)")
    return Path(hydra_config.runtime.output_dir)


@contextlib.contextmanager
def nothing_left_if_refused(run_dir: Path) -> Iterator[None]:
    """A command refused before it takes its directory leaves nothing behind: Hydra has made the
    directory and its empty ``train.log`` by then. Only a directory holding that alone is removed,
    never one another run has written into, and with it its parents below the working directory
    that are left empty (``outputs/DATE/``); a directory elsewhere may have been empty before."""
    try:
        yield
    except KNOWN_FAILURES:
        remove_if_untouched(run_dir)
        raise


def remove_if_untouched(run_dir: Path) -> None:
    """Remove ``run_dir`` if it holds nothing but Hydra's empty ``train.log`` (see above)."""
    log_file = run_dir / "train.log"
    if not owns_run_dir() or run_dir.absolute() == Path.cwd():
        return
    if [p.name for p in run_dir.iterdir()] != ["train.log"] or log_file.stat().st_size:
        return
    log_file.unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()
        for directory in run_dir.absolute().parents:
            if Path.cwd() not in directory.parents or any(directory.iterdir()):
                break
            directory.rmdir()


def owns_run_dir() -> bool:
    """This process writes the run directory: the app itself, or global rank 0 under torchrun."""
    return int(os.environ.get("RANK", 0)) == 0


def start_over(config: Config, run_dir: Path) -> None:
    """``train.resume=false``: the run the directory holds, if any, moves aside before this one writes."""
    moved = None if config.train.resume else checkpoint.set_aside(run_dir)
    if moved is not None:
        log.info("train.resume=false: the run that was in %s is now in %s", run_dir, moved)


def save_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra's ``.hydra/`` record of the run, written once the run holds its directory and its
    checkpoint (if any) agrees. Hydra itself would write it before the app runs, over the record of
    the run that owns the directory even when this one is then refused; so ``hydra.output_subdir``
    is null in conf/config.yaml and the app writes the same three files here."""
    record = run_dir / ".hydra"
    record.mkdir(exist_ok=True)
    hydra_config = HydraConfig.get()
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_config}), record / "hydra.yaml")
    OmegaConf.save(hydra_config.overrides.task, record / "overrides.yaml")


def train(config: Config, world_size: int, run_dir: Path) -> None:
    if config.dist.nproc > 1 and not distributed.launched():
        log.info("CPU simulation: %d ranks through the elastic launcher, output in %s", world_size, run_dir)
        distributed.launch_local(run_simulated_rank, (config, run_dir), world_size, config.dist.max_restarts)
    else:
        if not distributed.launched():  # this process is the rank: SIGTERM stops it at the next step
            stopping.listen((signal.SIGTERM,))
        run_rank(config, run_dir)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def nothing_to_train(reasons: list[str | None], run_dir: Path) -> str | None:
    if not all(reasons):
        return None
    return reasons[0] if len(reasons) == 1 else f"{run_dir} holds the {len(reasons)} finished jobs of the study: nothing to train"


def stop_as_submitit_asks() -> None:
    """In a submitit job: its signal (before a time limit, a preemption) and SIGTERM stop the ranks
    at the next step, checkpointed; for its signal, rank 0 then hands over to submitit's own
    handler, which requeues the job (the Hydra launcher's checkpoint resubmits the same job)."""
    found = slurm.submitit_requeue()
    if found is not None:
        signum, handler = found
        stopping.listen((signum, signal.SIGTERM))
        stopping.requeue_with(signum, handler)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    # A launcher plugin (submitit) calls this in each rank's process, past ``cli``.
    os.environ.update(slurm.torchrun_variables(os.environ))
    stop_as_submitit_asks()
    with one_line_errors():
        run_dir = output_dir(HydraConfig.get())
        with nothing_left_if_refused(run_dir):
            config, overrides = to_config(cfg), list(HydraConfig.get().overrides.task)
            if distributed.launched():
                launchers.check_world_size(config.dist.nproc, overrides, int(os.environ["WORLD_SIZE"]),
                                             launcher_name())
            jobs, summarize = plan_jobs(config, run_dir, overrides)
            for job in jobs:
                preflight(job.config, job.world_size)
            if os.environ.get("SYNCBN_CHECK_ONLY") == "1":
                finished(jobs)
                remove_if_untouched(run_dir)
                return
        with checkpoint.claim(run_dir) if owns_run_dir() else contextlib.nullcontext():
            reasons = finished(jobs)
            reason = nothing_to_train(reasons, run_dir)
            if reason:
                if owns_run_dir():
                    print(f"syncbn.train: {reason}", file=sys.stderr)
                return
            if owns_run_dir():
                start_over(jobs[0].config, run_dir)
                save_hydra_files(cfg, run_dir)
            for job in (job for job, reason in zip(jobs, reasons) if reason is None):
                if owns_run_dir() and job.describe is not None:
                    job.run_dir.mkdir(exist_ok=True)
                    job.describe(job.run_dir)
                with interrupts_in_one_line(job.run_dir, how_to_resume(run_dir)):
                    announce_stops(job.run_dir, how_to_resume(run_dir))
                    train(job.config, job.world_size, job.run_dir)
            if summarize is not None and owns_run_dir():
                summarize(run_dir)


def launcher_name() -> str:
    """What decided this launched run's world size, as a user would set it."""
    if slurm.is_task() or "SLURM_JOB_ID" in os.environ:
        return "srun (the job's tasks: sbatch --nodes x --ntasks-per-node)"
    if "SUBMITIT_EXECUTOR" in os.environ:
        return "submitit (hydra.launcher.nodes x hydra.launcher.tasks_per_node)"
    return "torchrun (--nnodes x --nproc-per-node)"


def announce_stops(run_dir: Path, resume: str) -> None:
    """Where this process is a rank that no agent reports for (an srun task, a run of one process),
    its rank 0 says where the run stopped on a stop signal; under an agent, the agent's process."""
    agent = distributed.launched() and not (slurm.is_task() or slurm.in_submitit_job())
    stopping.announce_with(None if agent else lambda stop: stopped_line(stop, run_dir, resume))


def how_to_resume(run_dir: Path) -> str:
    """Run the same command, with the output directory pinned if the command left it to the clock."""
    if slurm.is_task():
        return slurm.how_to_resume(os.environ, run_dir)
    hydra_config = HydraConfig.get()
    multirun = hydra_config.mode == RunMode.MULTIRUN
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(override.startswith(f"{key}=") for override in hydra_config.overrides.hydra):
        return f"run the same command to resume from {run_dir}"
    return f"run the same command with {override_for(key, hydra_config.sweep.dir if multirun else run_dir)} to resume"


def override_for(key: str, path: Path | str) -> str:
    """``key=path`` as one shell word that Hydra reads back as ``path``."""
    return shlex.quote(hydra_override(key, path))


def hydra_override(key: str, path: Path | str) -> str:
    """``key=path`` as Hydra reads it back as ``path``: quoted where the path holds anything but
    plain characters (a space, quotes, ``=``...)."""
    value = str(path)
    if not re.fullmatch(r"[\w./:@+-]+", value):
        # Inside Hydra's quotes a backslash escapes only a quote, or the backslashes before one.
        value = "'" + re.sub(r"(\\+)(?='|$)", r"\1\1", value).replace("'", "\\'") + "'"
    return f"{key}={value}"


def cli() -> None:
    """``python -m syncbn.train [--debug] [--check] [overrides]``."""
    for flag, variable in (("--debug", "SYNCBN_DEBUG"), ("--check", "SYNCBN_CHECK_ONLY")):
        if flag in sys.argv:
            sys.argv.remove(flag)
            os.environ[variable] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach one_line_errors, not Hydra's printer
    with interrupts_in_one_line(), one_line_errors():
        take_place_among_ranks()
        main()


def take_place_among_ranks() -> None:
    """A rank's place (an srun task's read from SLURM), how it ends on a signal, and its logging."""
    slurm_task = slurm.torchrun_variables(os.environ)
    os.environ.update(slurm_task)
    if distributed.launched():
        ranks_die_on_interrupt()
        # SIGTERM (a preemption, scancel, an agent passing its own on) stops every rank at the next
        # step, checkpointed; SLURM's warning before the time limit too, and the job requeues itself.
        stopping.listen((signal.SIGTERM, signal.SIGUSR1) if slurm.is_task() else (signal.SIGTERM,))
    else:  # the launcher of the CPU simulation, or the run itself: until training starts
        signal.signal(signal.SIGTERM, raise_on_sigterm)
    if int(os.environ.get("RANK", 0)) > 0:
        # torchrun starts every rank with the same command line: only rank 0 writes Hydra's files.
        sys.argv += ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


if __name__ == "__main__":
    cli()
    distributed.skip_teardown_at_exit()
