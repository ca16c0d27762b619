"""Faults at moments no test chose: a seeded random schedule of kills, signals and hung ranks injected
into real runs on every launcher, each run then resumed the documented way and compared with the
same run uninterrupted.

    python -m tests.chaos --faults 100 --seed 0          # docs/reliability.md's figures (about an hour)
    python -m tests.chaos --faults 6 --launchers simulation torchrun --seed 1

A fault is one of: SIGKILL of a random rank or of the launcher, SIGTERM or SIGINT to the launcher,
SIGSTOP of one rank (a hung peer: the others must fail within ``dist.timeout_s`` and the launcher
say so), at a moment drawn uniformly over the run's own duration (its start-up, its steps, a
checkpoint every step, each epoch's evaluation), on the CPU simulation, torchrun standalone, the
two-node script (two torchruns on localhost) or SLURM (the local one-node cluster of
``tests/slurm_cluster.py``), for a single run or a fused sweep. After it the run is resumed as
docs/reliability.md says (the same command; SLURM: ``sbatch`` with ``SYNCBN_RUN_DIR``) until it
finishes, and checked: its metrics and final parameters against the uninterrupted run's, bit for
bit; its processes, every one of which carries a tag in its environment, gone; no file in its
directory or its temporary directory that a finished run does not leave; the lines the fault made
the launcher print, and the time from the fault to the launcher's end (SLURM: to the job's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("simulation", "torchrun", "multinode", "slurm")
FAULTS = ("kill_rank", "kill_launcher", "term_launcher", "int_launcher", "stop_rank")
TIMEOUT_S = 15  # dist.timeout_s of every run: a hung peer is noticed within it
GRACE_S = 30  # torch's launchers' grace before they SIGKILL ranks that did not end on SIGTERM (a stopped one)
RUN = ["data.train_size=400", "model.hidden=[20]", "train.epochs=12", "train.checkpoint_every_steps=1",
       f"dist.timeout_s={TIMEOUT_S}"]
WORKLOADS = {"single": RUN, "sweep": [*RUN, "+experiment=weight_scale_sweep", "sweep.weight_scales=[1.0,0.01]"]}
# What a finished run's directory holds, and nothing else.
EXPECTED = {".hydra", ".lock", ".rank.lock", "checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "train.log",
            "summary.csv", "weight_scale_sweep.png"}


@dataclass(frozen=True)
class Fault:
    launcher: str
    workload: str
    kind: str
    moment: float  # fraction of the uninterrupted run's duration


def schedule(faults: int, seed: int, launchers: tuple[str, ...]) -> list[Fault]:
    rng = random.Random(seed)
    return [Fault(rng.choice(launchers), rng.choice(list(WORKLOADS)), rng.choice(FAULTS), rng.random())
            for _ in range(faults)]


@dataclass
class Outcome:
    fault: Fault
    resumes: int = 0
    differs: bool = False
    left_behind: int = 0
    stray_files: list[str] = field(default_factory=list)
    seconds_to_message: float | None = None
    hit: str = ""  # what the fault struck (a rank's pid, the launcher's, or nothing yet)
    lines: list[str] = field(default_factory=list)
    hung: bool = False  # the launcher did not end after the fault within its deadline


def tagged(tag: str) -> list[tuple[int, str, dict[str, str], int]]:
    """Every live process whose environment carries ``tag``: (pid, command line, environment, ppid)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in item)
            if environ.get("SYNCBN_CHAOS_TAG") != tag:
                continue
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state == "Z":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append((int(proc.name), cmdline, environ, int(ppid)))
        except (OSError, ValueError):
            continue
    return found


def ranks(tag: str) -> list[int]:
    """The run's ranks: torchrun's workers and srun's tasks carry their rank in their environment; the
    CPU simulation's are forked from its rank server."""
    processes = tagged(tag)
    servers = {pid for pid, cmdline, _, _ in processes if "forkserver" in cmdline}
    return [pid for pid, cmdline, environ, ppid in processes
            if ppid in servers or ("RANK" in environ and "TORCHELASTIC_RUN_ID" in environ)
            or ("SLURM_PROCID" in environ and "syncbn.train" in cmdline and "--check" not in cmdline
                and Path(cmdline.split()[0]).name != "srun")]  # srun itself has the batch step's SLURM_PROCID


class Launch:
    """One attempt of a run on a launcher: started, watched, and ended."""

    def __init__(self, launcher: str, overrides: list[str], run_dir: Path, tag: str, tmp: Path, cluster=None):
        self.launcher, self.run_dir, self.tag, self.cluster = launcher, run_dir, tag, cluster
        self.env = {**os.environ, "SYNCBN_CHAOS_TAG": tag, "TMPDIR": str(tmp), "SYNCBN_RUN_DIR": str(run_dir),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.processes: list[subprocess.Popen] = []
        self.job: str | None = None
        for command, env in self.commands(overrides):
            if launcher == "slurm":  # sbatch answers with the job's ID, and the job runs on
                done = subprocess.run(command, cwd=ROOT, env={**self.env, **env}, text=True, capture_output=True,
                                      timeout=60)
                self.job = done.stdout.strip().split(";")[0]
                assert self.job.isdigit(), done.stderr
                continue
            self.processes.append(subprocess.Popen(command, cwd=ROOT, env={**self.env, **env}, text=True,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                   start_new_session=True))

    def commands(self, overrides: list[str]) -> list[tuple[list[str], dict]]:
        if self.launcher == "simulation":
            return [([sys.executable, "-m", "syncbn.train", "dist.nproc=2", *overrides,
                      f"hydra.run.dir={self.run_dir}"], {})]
        if self.launcher == "torchrun":
            return [(["bash", "launch/torchrun.sh", "--standalone", "--nproc-per-node=2", "--", *overrides], {})]
        if self.launcher == "multinode":
            node = {"HEAD": f"localhost:{_free_port()}", "NNODES": "2", "RUN_ID": self.tag, "OMP_NUM_THREADS": "1",
                    "JOIN_TIMEOUT_S": str(TIMEOUT_S)}  # a node whose peer died before the rendezvous waits this long
            return [(["bash", "launch/multinode.sh", *overrides], node)] * 2
        return [(["sbatch", "--parsable", f"--output={self.run_dir}.out", "launch/slurm.sbatch", *overrides],
                 {"SLURM_CONF": self.cluster.env["SLURM_CONF"]})]

    def launcher_pid(self, rng: random.Random) -> int | None:
        if self.launcher != "slurm":
            return rng.choice(self.processes).pid
        srun = [pid for pid, cmdline, _, _ in tagged(self.tag) if cmdline.startswith("srun ")]
        return srun[0] if srun else None

    def inject(self, kind: str, rng: random.Random) -> str:
        """The fault; what it hit."""
        if kind in ("kill_rank", "stop_rank"):
            deadline = time.monotonic() + 30  # a moment in the start-up: the first rank to start
            while not (found := ranks(self.tag)) and time.monotonic() < deadline and not self.ended():
                time.sleep(0.05)
            if not found:
                return "no rank yet"
            pid = rng.choice(found)
            os.kill(pid, signal.SIGKILL if kind == "kill_rank" else signal.SIGSTOP)
            return f"rank pid {pid}"
        signum = {"kill_launcher": signal.SIGKILL, "term_launcher": signal.SIGTERM, "int_launcher": signal.SIGINT}[kind]
        if self.launcher == "slurm" and kind == "term_launcher":  # a user's (or a preemption's) scancel
            self.cluster.run("scancel", self.job)
            return f"scancel {self.job}"
        pid = self.launcher_pid(rng)
        if pid is None:
            return "no launcher yet"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        return f"launcher pid {pid}"

    def ended(self) -> bool:
        if self.launcher == "slurm":
            return self.cluster.state(self.job) not in {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING"}
        return all(process.poll() is not None for process in self.processes)

    def wait(self, timeout: float) -> bool:
        """Whether the attempt ended within ``timeout`` (a SLURM job: left the queue)."""
        deadline = time.monotonic() + timeout
        if self.launcher == "slurm":
            while self.cluster.state(self.job) in {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING"}:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
            return True
        try:
            for process in self.processes:
                process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            return False
        return True

    def finished(self) -> bool:
        if self.launcher == "slurm":
            return self.cluster.state(self.job) == "COMPLETED"
        return all(process.returncode == 0 for process in self.processes)

    def stderr_lines(self) -> list[str]:
        if self.launcher == "slurm":  # the job's log: its training lines too, which are not the fault's
            out = Path(f"{self.run_dir}.out")
            lines = out.read_text().splitlines() if out.exists() else []
            return [line for line in lines if not line.startswith(("[20", "wrote "))]
        return [line for process in self.processes for line in (process.stderr.read() or "").splitlines()]

    def kill_everything(self) -> int:
        """Kill what is left of the run; how many processes that was."""
        left = tagged(self.tag)
        for pid, _, _, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.job is not None:
            self.cluster.run("scancel", "--full", self.job)
        return len(left)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def final_state(run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    metrics = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return metrics, torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def settle(tag: str, seconds: float = 15) -> None:
    """Give the run's processes the time they take to end after their launcher (ms to a few s)."""
    deadline = time.monotonic() + seconds
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass
class Reference:
    seconds: float
    metrics: list[dict]
    model: dict[str, torch.Tensor]


def reference(launcher: str, workload: str, root: Path, cluster) -> Reference:
    """The run uninterrupted: how long it takes, what it ends with."""
    name = f"reference-{launcher}-{workload}"
    (root / f"{name}-tmp").mkdir()
    start = time.monotonic()
    launch = Launch(launcher, WORKLOADS[workload], root / name, name, root / f"{name}-tmp", cluster)
    assert launch.wait(600) and launch.finished(), f"the uninterrupted {launcher} {workload} run failed: " \
        f"{launch.stderr_lines()[-20:]}"
    seconds = time.monotonic() - start
    settle(name)
    return Reference(seconds, *final_state(root / name))


def stray_files(run_dir: Path, tmp: Path) -> list[str]:
    """Files a finished run does not leave: in its directory, or in its temporary directory (but
    inductor's cache, torchinductor_USER, which persists by design, as any cache in ~/.cache)."""
    found = [p.name for p in run_dir.iterdir() if p.name not in EXPECTED]
    found += [str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp")]
    return found + [f"$TMPDIR/{p.name}" for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]


def one_fault(fault: Fault, ref: Reference, root: Path, rng: random.Random, cluster) -> Outcome:
    tag = f"chaos-{uuid.uuid4().hex[:10]}"
    run_dir, tmp = root / tag, root / f"{tag}-tmp"
    tmp.mkdir()
    outcome = Outcome(fault)
    overrides = WORKLOADS[fault.workload]
    launch = Launch(fault.launcher, overrides, run_dir, tag, tmp, cluster)
    time.sleep(fault.moment * ref.seconds)
    before = len(launch.stderr_lines()) if fault.launcher == "slurm" else 0
    outcome.hit = launch.inject(fault.kind, rng)
    injected = time.monotonic()
    if launch.wait(TIMEOUT_S + GRACE_S + 60):
        outcome.seconds_to_message = round(time.monotonic() - injected, 2)
    else:  # its processes go first: reading the pipes of live ones would wait with them
        outcome.hung = True
        outcome.left_behind = launch.kill_everything()
    outcome.lines = [line for line in launch.stderr_lines()[before:] if line.strip()]
    settle(tag)
    outcome.left_behind += launch.kill_everything()
    settle(tag, 5)
    while not (run_dir / "metrics.jsonl").exists() or not launch.finished():
        if outcome.resumes == 4:
            outcome.differs = True  # never finished
            return outcome
        outcome.resumes += 1
        launch = Launch(fault.launcher, overrides, run_dir, tag, tmp, cluster)
        launch.wait(600)
        settle(tag)
        outcome.left_behind += launch.kill_everything()
    metrics, model = final_state(run_dir)
    outcome.differs = metrics != ref.metrics or model.keys() != ref.model.keys() or any(
        not torch.equal(model[k], ref.model[k]) for k in model)
    outcome.stray_files = stray_files(run_dir, tmp)
    return outcome


def own_lines(lines: list[str]) -> list[str]:
    """The lines the project printed: not srun's, slurmstepd's or the batch shell's job-control notices
    (a SLURM job's log holds those too, whatever the program in it does)."""
    return [line for line in lines if not line.startswith(("srun: ", "slurmstepd")) and "slurm_script: line " not in line]


def report(outcomes: list[Outcome]) -> str:
    rows = ["| launcher | fault | faults | struck a process | resumes | runs that differ | processes left | "
            "stray files | hung | worst s to its end | most lines (the app's) |", "|---" * 11 + "|"]
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault((outcome.fault.launcher, outcome.fault.kind), []).append(outcome)
    for (launcher, kind), group in sorted(groups.items()):
        times = [o.seconds_to_message for o in group if o.seconds_to_message is not None]
        struck = sum(not o.hit.startswith("no ") for o in group)
        rows.append(f"| {launcher} | {kind} | {len(group)} | {struck} | {sum(o.resumes for o in group)} | "
                    f"{sum(o.differs for o in group)} | {sum(o.left_behind for o in group)} | "
                    f"{sum(len(o.stray_files) for o in group)} | {sum(o.hung for o in group)} | "
                    f"{max(times) if times else '-'} | {max(len(o.lines) for o in group)} "
                    f"({max(len(own_lines(o.lines)) for o in group)}) |")
    return "\n".join(rows)


@contextlib.contextmanager
def maybe_cluster(launchers: tuple[str, ...], root: Path) -> Iterator[object]:
    if "slurm" not in launchers:
        yield None
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import slurm_cluster

    home = root / "slurm"
    home.mkdir()
    cluster, daemons = slurm_cluster.start(home)
    try:
        yield cluster
    finally:
        cluster.run("scancel", "--full", "--partition=tests")
        daemons.stop()


def chaos(faults: int, seed: int, launchers: tuple[str, ...], root: Path, log=print, save=None) -> list[Outcome]:
    plan = schedule(faults, seed, launchers)
    rng = random.Random(seed + 1)
    outcomes = []
    with maybe_cluster(launchers, root) as cluster:
        references = {}
        for fault in plan:
            key = (fault.launcher, fault.workload)
            if key not in references:
                references[key] = reference(*key, root, cluster)
            outcomes.append(one_fault(fault, references[key], root, rng, cluster))
            o = outcomes[-1]
            log(f"{len(outcomes)}/{faults} {fault.launcher} {fault.workload} {fault.kind} at "
                f"{fault.moment:.2f} ({o.hit}): resumes {o.resumes}, differs {o.differs}, left {o.left_behind}, "
                f"stray {o.stray_files}, {o.seconds_to_message} s, lines {o.lines}")
            if save is not None:  # every outcome on disk as it comes: a run cut short still reports
                save(outcomes)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launchers", nargs="+", choices=LAUNCHERS, default=list(LAUNCHERS))
    parser.add_argument("--out", type=Path, default=Path("outputs/chaos.json"), help="every fault's outcome")
    parser.add_argument("--report", type=Path, help="print the table of a run's --out file, and run nothing")
    args = parser.parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        print(report([Outcome(**dict(o, fault=Fault(**o["fault"]))) for o in saved["outcomes"]]))
        print(f"{len(saved['outcomes'])} faults in {saved['minutes']} min: {saved['command']}")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def save(outcomes: list[Outcome]) -> None:
        minutes = (time.monotonic() - start) / 60
        args.out.write_text(json.dumps(dict(command=" ".join(["python -m tests.chaos", *(argv or sys.argv[1:])]),
                                            minutes=round(minutes, 1), outcomes=[asdict(o) for o in outcomes]), indent=1))

    with tempfile.TemporaryDirectory(prefix="syncbn-chaos-") as scratch:
        outcomes = chaos(args.faults, args.seed, tuple(args.launchers), Path(scratch), save=save)
    save(outcomes)
    minutes = (time.monotonic() - start) / 60
    print(report(outcomes))
    print(f"{len(outcomes)} faults in {minutes:.1f} min; every outcome in {args.out}")
    bad = [o for o in outcomes if o.differs or o.left_behind or o.stray_files or o.hung or len(own_lines(o.lines)) > 3]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
