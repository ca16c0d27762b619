"""torchrun for ``syncbn.train``, reporting as the CPU simulation does: one line, not a box.

    python -m syncbn.torchrun --standalone --nproc-per-node=4 -- norm=syncbn train.epochs=5
    SYNCBN_RUN_DIR=outputs/exp1 python -m syncbn.torchrun --standalone --nproc-per-node=2

(``launch/torchrun.sh`` and ``launch/multinode.sh`` run it.) Flags before ``--`` go to torchrun,
the rest are Hydra overrides. torchrun starts every rank with the same command and each rank runs
the Hydra app: left alone, each would stamp its own ``outputs/DATE/TIME``. The directory is chosen
here, once, and handed to every rank (only rank 0 writes into it).

What torchrun itself would print is replaced by the app's lines: bad input is checked once before
any rank starts; a failed rank is named with its cause (ranks hand their errors to torchrun through
its error file instead of printing them); SIGINT/SIGTERM stop every rank and end in one line that
says where training stopped and how to resume, exit 130/143.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from torch.distributed import run as torchrun
from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousTimeoutError

from syncbn import distributed, endings, train


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's flags and the Hydra overrides, on either side of the first ``--``."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def run_dir_of(environ: dict[str, str], overrides: list[str] = ()) -> tuple[Path, str]:
    """The run directory (SYNCBN_RUN_DIR, or a ``hydra.run.dir=`` of the overrides, the last one as
    Hydra reads them, or a fresh one from the clock), and how to resume the run in it."""
    given = [o.partition("=")[2] for o in overrides if o.lstrip("+~").partition("=")[0] == "hydra.run.dir"]
    if environ.get("SYNCBN_RUN_DIR") or given:
        run_dir = Path(environ.get("SYNCBN_RUN_DIR") or given[-1].strip("'\""))
        return run_dir, f"run the same command to resume from {run_dir}"
    run_dir = Path("outputs", datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f"))
    return run_dir, f"run the same command with SYNCBN_RUN_DIR={shlex.quote(str(run_dir))} to resume"


# Each rank's command: Ctrl-C reaches every rank in the terminal's foreground group, and a rank still
# importing torch would print a KeyboardInterrupt traceback (torchrun stops them all and the wrapper
# reports once); so the first thing a rank does, before any import, is to die on SIGINT silently.
RANK_BOOTSTRAP = ("import signal; signal.signal(signal.SIGINT, signal.SIG_DFL); import runpy; "
                  "runpy.run_module('syncbn.train', run_name='__main__', alter_sys=True)")


def rank_command() -> list[str]:
    """``python -m syncbn.train`` as each rank runs it: with SIGINT silent from its first line."""
    return [sys.executable, "-c", RANK_BOOTSTRAP]


def one_node_world_size(args) -> int | None:
    """The world size torchrun will start, where one node decides it; else None (several nodes,
    whose checks would each make and remove the directory they share at once, or a count that
    torchrun decides: ``gpu``, ``auto``)."""
    if args.nnodes not in ("1", "1:1") or not args.nproc_per_node.isdigit():
        return None
    return int(args.nproc_per_node)


def check(world_size: int, overrides: list[str]) -> int:
    """``python -m syncbn.train --check`` as rank 0 of that world sees it: its exit status. An
    interrupt meanwhile waits for the check to end (seconds), which removes the directory it made."""
    environ = {**os.environ, "RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "localhost", "MASTER_PORT": "0"}
    checking = subprocess.Popen([sys.executable, "-m", "syncbn.train", "--check", *overrides], env=environ)
    try:
        return checking.wait()
    except BaseException:
        checking.wait()
        raise


@contextlib.contextmanager
def peers_gone(run_dir: Path, resume: str) -> Iterator[None]:
    """Another node's torchrun, which held the rendezvous, ended (stopped, killed): this one's agent
    loses the store it shares with it; or the other nodes never joined. One line, which says where
    training stopped, not torch's traceback of its store client."""
    try:
        yield
    except RendezvousTimeoutError:  # their launchers ended before it, or never started
        print("syncbn.train: error: the other nodes did not join the rendezvous within its join timeout "
              f"(JOIN_TIMEOUT_S of launch/multinode.sh, 600 s by default): training stopped "
              f"{endings.where_training_stopped(run_dir, resume)}", file=sys.stderr)
        sys.exit(1)
    except RendezvousError as error:
        print(f"syncbn.train: error: the rendezvous with the other nodes is gone ({type(error).__name__}): every "
              f"node stopped {endings.where_training_stopped(run_dir, resume)}", file=sys.stderr)
        sys.exit(1)


def end_when_the_rendezvous_closes() -> None:
    """Another node's agent whose workers failed closes the rendezvous and ends; an agent whose own
    workers still run never looks: torch's agent asks the rendezvous only how many nodes wait to
    join. Where one of those workers hangs (stopped, or waiting on a peer that is gone), the node
    waited forever (found by the chaos run: a rank SIGSTOPped on the node holding the store). Asked
    that, the rendezvous now also says whether it closed, by raising: the agent stops its workers
    (SIGKILL after its grace, for one that cannot stop) and ``peers_gone`` says so in one line."""
    from torch.distributed.elastic.rendezvous import RendezvousClosedError
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    waiting = DynamicRendezvousHandler.num_nodes_waiting
    if getattr(waiting, "ends_when_closed", False):
        return

    def num_nodes_waiting(self: DynamicRendezvousHandler) -> int:
        count = waiting(self)
        if self.is_closed():
            raise RendezvousClosedError("another node ended and closed the rendezvous")
        return count

    num_nodes_waiting.ends_when_closed = True  # type: ignore[attr-defined]
    DynamicRendezvousHandler.num_nodes_waiting = num_nodes_waiting  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, endings.raise_on_sigterm)  # torchrun's own handler comes with the ranks
    launcher_args, overrides = split(argv)
    run_dir, resume = run_dir_of(dict(os.environ), overrides)
    overrides = [train.hydra_override("hydra.run.dir", run_dir), train.hydra_override("hydra.sweep.dir", run_dir),
                 *(o for o in overrides if o.lstrip("+~").partition("=")[0] != "hydra.run.dir")]
    with endings.interrupts_in_one_line(run_dir, resume), endings.one_line_errors(), peers_gone(run_dir, resume):
        args = torchrun.parse_args([*launcher_args, "--no-python", *rank_command(), *overrides])
        world_size = one_node_world_size(args)
        if world_size is not None and (status := check(world_size, overrides)):
            sys.exit(status)
        distributed.quiet_launcher()
        end_when_the_rendezvous_closes()
        logging.getLogger(torchrun.__name__).setLevel(logging.ERROR)  # its OMP_NUM_THREADS notice
        log_dir = args.log_dir = distributed.elastic_log_dir()  # torchrun's own would stay in /tmp
        try:
            torchrun.run(args)
        finally:
            shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
