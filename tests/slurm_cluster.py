"""A real single-node SLURM cluster on this machine, for the tests: Debian's munged, slurmctld and
slurmd (``.ci/run`` installs them), started without systemd from a slurm.conf written here, and
stopped by PID. No accounting; limits are enforced at submission, so an impossible job is refused
instead of left pending.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
START_S = 90  # the cluster must be up in this long, or the tests say why not


@dataclass
class Cluster:
    home: Path
    env: dict[str, str]

    def run(self, *command: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout)

    def state(self, job_id: str) -> str:
        """The job's state (``COMPLETED``, ``FAILED``, ``CANCELLED``, ``RUNNING``, ``PENDING``...)."""
        shown = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return shown.split("JobState=", 1)[1].split()[0]

    def wait_for(self, job_id: str, states: set[str], timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.state(job_id)) not in states:
            assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout} s"
            time.sleep(0.2)
        return state


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def why_not() -> str | None:
    """Why this machine cannot start the cluster, or None."""
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not found; .ci/run installs it with apt)"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root, and this is not root"
    return None


def write_config(home: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    config = home / "slurm.conf"
    config.write_text(f"""ClusterName=syncbn-tests
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={home}/munge.socket,cred_expire=5
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd.pid
SlurmctldLogFile={home}/slurmctld.log
SlurmdLogFile={home}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
EnforcePartLimits=ALL
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=tests Nodes=ALL Default=YES MaxTime=60 State=UP OverSubscribe=YES
""")
    return config


def sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Daemons:
    processes: list[subprocess.Popen]
    conf: str = ""  # their SLURM_CONF, which the job steps' slurmstepd inherit

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        # A step's slurmstepd can outlive slurmd, idle, when its job was cancelled mid-step: the chaos
        # runs found them after the cluster was gone. Those of this cluster go with it.
        for pid in steps_of(self.conf):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def steps_of(conf: str) -> list[int]:
    """The slurmstepd processes of the cluster whose config is ``conf``."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if (Path(environ.parent, "comm").read_text().startswith("slurmstepd")
                    and f"SLURM_CONF={conf}".encode() in environ.read_bytes().split(b"\0")):
                found.append(int(environ.parent.name))
    return found if conf else []


def start(home: Path) -> tuple[Cluster, Daemons]:
    """The cluster, up with its node idle, or AssertionError saying what did not start (its log)."""
    for directory in ("state", "spool"):
        (home / directory).mkdir()
    key = home / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    config = write_config(home)
    env = {**os.environ, "SLURM_CONF": str(config)}
    log = open(home / "daemons.log", "w")
    commands = [
        [sbin("munged"), "-F", "-f", f"--socket={home}/munge.socket", f"--key-file={key}",
         f"--pid-file={home}/munged.pid", f"--seed-file={home}/munged.seed", f"--log-file={home}/munged.log"],
        [sbin("slurmctld"), "-D", "-i", "-f", str(config)],
        [sbin("slurmd"), "-D", "-f", str(config)],
    ]
    daemons = Daemons([], str(config))
    cluster = Cluster(home, env)
    deadline = time.monotonic() + START_S
    try:
        for command in commands:
            daemons.processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
            if command[0].endswith("munged"):
                while not (home / "munge.socket").exists():
                    assert time.monotonic() < deadline and daemons.processes[0].poll() is None, "munged did not start"
                    time.sleep(0.05)
        while "idle" not in cluster.run("sinfo", "-h", "-o", "%t").stdout:
            assert all(p.poll() is None for p in daemons.processes), f"a daemon ended: {(home / 'daemons.log').read_text()}"
            assert time.monotonic() < deadline, f"no idle node in {START_S} s: {(home / 'slurmctld.log').read_text()[-2000:]}"
            time.sleep(0.1)
    except BaseException:
        daemons.stop()
        raise
    return cluster, daemons


def running(home: Path) -> Iterator[Cluster]:
    """The cluster for a test session: started, yielded, then every job cancelled and every daemon stopped."""
    cluster, daemons = start(home)
    try:
        yield cluster
    finally:
        cluster.run("scancel", "--full", "--partition=tests")
        daemons.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.slurm_cluster start|stop DIR``: the tests' one-node cluster for a user to try
    ``sbatch launch/slurm.sbatch`` on this machine (as root, with Debian's slurmctld, slurmd,
    slurm-client and munge installed); start prints the ``export SLURM_CONF=...`` to run first."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.slurm_cluster", description=main.__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("home", type=Path, help="a folder for the cluster's config, state and logs (made by start)")
    args = parser.parse_args(argv)
    pids = args.home / "daemons.pids"
    if args.action == "start":
        if reason := why_not():
            print(f"cannot start the cluster: {reason}")
            return 1
        args.home.mkdir(parents=True, exist_ok=False)
        _, daemons = start(args.home)
        pids.write_text(" ".join(str(process.pid) for process in daemons.processes))
        print(f"export SLURM_CONF={args.home / 'slurm.conf'}   # then: sbatch launch/slurm.sbatch ...; "
              f"stop it with python -m tests.slurm_cluster stop {args.home}")
        return 0
    for pid in reversed([int(pid) for pid in pids.read_text().split()]):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    pids.unlink()
    print(f"stopped the cluster of {args.home}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
