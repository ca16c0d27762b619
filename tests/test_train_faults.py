"""The faults a user causes, reproduced as a user would cause them (real processes, signals and
files): a killed launcher, a run directory asked for twice, a fresh start over an old run,
checkpoints deleted under their metrics."""

from __future__ import annotations

import fcntl
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from app import ROOT, live_processes, read_metrics, run, strip
from omegaconf import OmegaConf

from syncbn.training.checkpoint import RANK_LOCK, REPLACED

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
    launcher = subprocess.Popen(app(tmp_path, "train.epochs=12"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: (tmp_path / "checkpoint.pt").exists() or launcher.poll() is not None, 90, "a checkpoint")
    assert launcher.poll() is None, "the run ended before it could be killed"
    assert is_locked(tmp_path / RANK_LOCK), "the writing rank holds the directory itself"
    assert (tmp_path / RANK_LOCK).read_text() != f"pid {launcher.pid}\n", "held by rank 0, not the launcher"
    launcher.kill()
    launcher.wait()
    refused = 0
    while True:
        rerun = subprocess.run(app(tmp_path, "train.epochs=12"), cwd=ROOT, capture_output=True, text=True, timeout=180)
        if rerun.returncode == 0:
            break
        assert rerun.returncode == 1 and "belongs to a run still going" in rerun.stderr, rerun.stderr
        refused += 1
        assert refused < 10, "a rank of the killed run still holds the directory"
    wait_for(lambda: not live_processes(launcher.pid), 10, "the killed launcher's ranks to end")
    assert [record["epoch"] for record in read_metrics(tmp_path)] == list(range(1, 13))


def test_a_run_is_refused_while_a_rank_of_an_earlier_one_still_writes_its_directory(tmp_path):
    """A rank from before (here: this test process) holding the rank lock: one line, exit 1."""
    with open(tmp_path / RANK_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("pid 4242\n")
        lock.flush()
        result = subprocess.run(app(tmp_path, "train.epochs=1"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"syncbn.train: error: {tmp_path} belongs to a run still going (pid 4242); "
                                          "wait for it or pick another hydra.run.dir"]
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / ".hydra").exists()


def one_process(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "syncbn.train", *SMALL, *overrides, f"hydra.run.dir={run_dir}"]


def recorded_lr(run_dir: Path) -> float:
    return OmegaConf.load(run_dir / ".hydra" / "config.yaml").optim.lr


def test_a_fresh_start_moves_the_old_run_aside_so_a_kill_before_its_first_checkpoint_mixes_no_runs(tmp_path):
    """``train.resume=false optim.lr=0.05`` over a finished lr 0.01 run, SIGKILLed after its first
    step: the directory holds the new run's config and no checkpoint or metrics, the old run sits
    whole in replaced/; the original command then trains its run again, to the same metrics."""
    run(one_process(tmp_path, "train.epochs=2"))
    finished = read_metrics(tmp_path)
    killed = subprocess.run(one_process(tmp_path, "train.epochs=2", "train.resume=false", "optim.lr=0.05",
                                        "fault.kill_rank=0", "fault.kill_at_step=1"), cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [replaced] = (tmp_path / REPLACED).iterdir()
    assert recorded_lr(replaced) == 0.01 and read_metrics(replaced) == finished
    assert torch.load(replaced / "checkpoint.pt", weights_only=True)["progress"]["history"] == finished
    assert recorded_lr(tmp_path) == 0.05 and not list(tmp_path.glob("*.pt")) and read_metrics(tmp_path) == []
    run(one_process(tmp_path, "train.epochs=2"))
    assert recorded_lr(tmp_path) == 0.01 and strip(read_metrics(tmp_path)) == strip(finished)


def test_metrics_whose_checkpoints_are_gone_are_not_restarted_over_but_moved_aside_by_a_fresh_start(tmp_path):
    run(one_process(tmp_path, "train.epochs=1"))
    finished = read_metrics(tmp_path)
    for path in tmp_path.glob("*.pt"):
        path.unlink()
    refused = subprocess.run(one_process(tmp_path, "train.epochs=1"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"syncbn.train: error: {tmp_path} holds 1 line(s) of metrics.jsonl but no checkpoint to continue them from; "
        f"train.resume=false starts over and moves them to {tmp_path / REPLACED}"]
    assert read_metrics(tmp_path) == finished
    run(one_process(tmp_path, "train.epochs=1", "train.resume=false"))
    [replaced] = (tmp_path / REPLACED).iterdir()
    assert read_metrics(replaced) == finished and strip(read_metrics(tmp_path)) == strip(finished)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_checkpoint(tmp_path):
    """Every write past 30 kB fails (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) in a 2-rank run:
    one line naming the checkpoint file and the OS's reason, exit 1, no temporary file left."""
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run(app(tmp_path, "train.epochs=1"), cwd=ROOT, capture_output=True, text=True, timeout=120,
                            preexec_fn=small_files)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"syncbn.train: error: rank 0 failed (exit code 1): CheckpointError: cannot write the checkpoint "
        f"{tmp_path / '.checkpoint.pt.tmp'} (File too large); the last complete one is kept"]
    assert not (tmp_path / ".checkpoint.pt.tmp").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_the_command_of_a_faulted_run_resumes_it_and_says_which_checkpoint_it_read(tmp_path):
    """The same command, fault keys and all, continues instead of killing the same rank at the same
    step again; from ``checkpoint.prev.pt`` (a save stopped between its renames) it names that file."""
    command = [sys.executable, "-m", "syncbn.train", *SMALL, "train.epochs=3", "fault.kill_rank=0",
               "fault.kill_at_step=3", f"hydra.run.dir={tmp_path}"]
    assert subprocess.run(command, cwd=ROOT, capture_output=True, timeout=120).returncode == -signal.SIGKILL
    (tmp_path / "checkpoint.pt").rename(tmp_path / "checkpoint.prev.pt")
    run(command)
    assert f"resumed from {tmp_path / 'checkpoint.prev.pt'}: epoch 2, step 0" in (tmp_path / "train.log").read_text()
    assert [record["epoch"] for record in read_metrics(tmp_path)] == [1, 2, 3]


def test_check_starts_nothing_and_leaves_nothing_for_a_good_command_and_refuses_a_bad_resume(tmp_path):
    check = [sys.executable, "-m", "syncbn.train", "--check", *SMALL, "train.epochs=1"]
    result = subprocess.run([*check, f"hydra.run.dir={tmp_path / 'new'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "") and not (tmp_path / "new").exists()
    run(one_process(tmp_path / "old", "train.epochs=1"))
    before = sorted(p.name for p in (tmp_path / "old").iterdir())
    result = subprocess.run([*check, "optim.lr=0.5", f"hydra.run.dir={tmp_path / 'old'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "was trained with other settings: optim.lr=0.01 there, 0.5 here" in result.stderr
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == before


def test_a_rank_killed_before_the_first_checkpoint_is_restarted_once_and_the_run_finishes(tmp_path):
    """The restarted ranks start from scratch (nothing to resume): the fault, for the launcher's
    first attempt only, does not fire again, so one restart is enough."""
    run(app(tmp_path, "train.epochs=2", "dist.max_restarts=1", "fault.kill_rank=1", "fault.kill_at_step=1"))
    assert [record["epoch"] for record in read_metrics(tmp_path)] == [1, 2]
