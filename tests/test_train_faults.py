"""The faults a user causes, reproduced as a user would cause them (real processes, signals and
files): a killed launcher, a run directory asked for twice."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time
from pathlib import Path

from app import ROOT, live_processes, read_metrics

from syncbn.checkpoint import RANK_LOCK

SMALL = ["data.train_size=200", "model.hidden=[20]", "train.checkpoint_every_steps=2"]  # 2 steps an epoch


def app(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "syncbn.train", "dist.nproc=2", *SMALL, *overrides, f"hydra.run.dir={run_dir}"]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.05)


def is_locked(path: Path) -> bool:
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def test_ranks_end_with_their_killed_launcher_and_no_second_run_writes_their_directory(tmp_path):
    """``kill -9`` of the launching process, which cannot pass the signal on: both ranks are gone
    within 10 s; a rerun started at once is refused while any of them lives, then resumes the
    run, whose metrics hold every epoch once."""
    launcher = subprocess.Popen(app(tmp_path, "train.epochs=40"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: (tmp_path / "checkpoint.pt").exists() or launcher.poll() is not None, 90, "a checkpoint")
    assert launcher.poll() is None, "the run ended before it could be killed"
    assert is_locked(tmp_path / RANK_LOCK), "the writing rank holds the directory itself"
    assert (tmp_path / RANK_LOCK).read_text() != f"pid {launcher.pid}\n", "held by rank 0, not the launcher"
    launcher.kill()
    launcher.wait()
    refused = 0
    while True:
        rerun = subprocess.run(app(tmp_path, "train.epochs=40"), cwd=ROOT, capture_output=True, text=True, timeout=180)
        if rerun.returncode == 0:
            break
        assert rerun.returncode == 1 and "belongs to a run still going" in rerun.stderr, rerun.stderr
        refused += 1
        assert refused < 10, "a rank of the killed run still holds the directory"
    wait_for(lambda: not live_processes(launcher.pid), 10, "the killed launcher's ranks to end")
    assert [record["epoch"] for record in read_metrics(tmp_path)] == list(range(1, 41))


def test_a_run_is_refused_while_a_rank_of_an_earlier_one_still_writes_its_directory(tmp_path):
    """A rank from before (here: this test process) holding the rank lock: one line, exit 1."""
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / RANK_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("pid 4242\n")
        lock.flush()
        result = subprocess.run(app(tmp_path, "train.epochs=1"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"syncbn.train: error: {tmp_path} belongs to a run still going (pid 4242); "
                                          "wait for it or pick another hydra.run.dir"]
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / ".hydra").exists()
