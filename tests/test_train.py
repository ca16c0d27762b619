"""The trainer end to end: CPU simulation, torchrun, world-size invariance, the sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.distributed as dist
from app import ROOT, compose_config, run

from syncbn import trainer
from syncbn.config import Config
from syncbn.distributed import DistContext
from syncbn.plot import SUMMARY_COLUMNS
from syncbn.plot import main as plot_main

METRIC_KEYS = {"norm", "weight_scale", "world_size", "epoch", "train_acc", "test_acc", "train_loss", "diverged", "seconds"}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SIMULATION = [sys.executable, "-m", "syncbn.train", "dist.nproc=2", "train.epochs=3", "train.checkpoint_every_steps=7"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 3-epoch CPU simulation on 2 ranks, checkpointing every 7 steps, never interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, run([*SIMULATION, f"hydra.run.dir={run_dir}"])


def test_cpu_simulation_runs_two_ranks_and_writes_metrics(uninterrupted):
    run_dir, result = uninterrupted
    assert "CPU simulation: 2 ranks" in result.stdout + result.stderr
    assert "epoch 3/3" in result.stdout
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(set(r) == METRIC_KEYS and r["world_size"] == 2 and not r["diverged"] for r in records)
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "train.log").exists()


def final_model(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_a_killed_rank_is_restarted_and_the_run_resumes_bit_exactly(uninterrupted, tmp_path):
    """Rank 1 is SIGKILLed after step 25 (epoch 3, step 5); the elastic launcher restarts both ranks,
    which resume from the step-21 checkpoint and end exactly where the uninterrupted run ended."""
    reference_dir, _ = uninterrupted
    run([*SIMULATION, "dist.max_restarts=1", "fault.kill_rank=1", "fault.kill_at_step=25", f"hydra.run.dir={tmp_path}"])
    assert "resumed from" in (tmp_path / "train.log").read_text() and "epoch 3, step 1" in (tmp_path / "train.log").read_text()
    assert strip(read_metrics(tmp_path)) == strip(read_metrics(reference_dir))
    resumed, reference = final_model(tmp_path), final_model(reference_dir)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)


def test_without_restarts_a_killed_rank_ends_the_launch_with_one_line(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "syncbn.train", "dist.nproc=2", "fault.kill_rank=1", "fault.kill_at_step=3",
         "dist.timeout_s=20", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("syncbn.train: error:")]
    assert ours == ["syncbn.train: error: rank 1 failed (signal SIGKILL): Signal 9 (SIGKILL) received by PID "
                    + ours[0].rsplit(" ", 1)[-1]], result.stderr
    assert time.monotonic() - started < 60


def test_torchrun_standalone_through_the_launch_wrapper(tmp_path):
    run_dir = tmp_path / "run"
    run(["bash", "launch/torchrun.sh", "--standalone", "--nproc-per-node=2", "--", "train.epochs=1"],
        SYNCBN_RUN_DIR=str(run_dir))
    [record] = read_metrics(run_dir)
    assert record["world_size"] == 2 and record["epoch"] == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoint.pt", "metrics.jsonl", "train.log"]
    assert "epoch 1/1" in (run_dir / "train.log").read_text()


def fit_on_rank(config: Config, run_dir: Path | None = None) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return trainer.fit(config, DistContext(rank, rank, world_size, torch.device("cpu")), run_dir)


def strip(records: list[dict]) -> list[dict]:
    """The metrics without wall time."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_same_training(a: list[dict], b: list[dict], train_size: int, test_size: int) -> None:
    for x, y in zip(a, b, strict=True):
        assert abs(x["train_acc"] - y["train_acc"]) <= 1 / train_size + 1e-12, (x, y)
        assert abs(x["test_acc"] - y["test_acc"]) <= 1 / test_size + 1e-12, (x, y)
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4), (x, y)


def test_syncbn_trains_the_same_at_every_world_size_and_local_bn_does_not(gloo_group):
    """Same seed, global batch 100: SyncBN at 1, 2 and 4 ranks matches epoch by epoch; plain BN
    at 4 ranks (25 samples per rank) does not, and one process with 4 ghost slices reproduces it;
    a rerun is identical."""
    syncbn = compose_config("train.epochs=3", "model.weight_scale=0.05")
    local_bn = compose_config("train.epochs=3", "model.weight_scale=0.05", "norm=bn")
    one = gloo_group(1).run(fit_on_rank, syncbn)[0]
    two = gloo_group(2).run(fit_on_rank, syncbn)
    four = gloo_group(4).run(fit_on_rank, syncbn)
    assert strip(two[0]) == strip(two[1]) and strip(four[0]) == strip(four[3]), "ranks report the same global metrics"
    for other in (two[0], four[0]):
        assert_same_training(one, other, 1000, 4000)
    bn_four = gloo_group(4).run(fit_on_rank, local_bn)[0]
    with pytest.raises(AssertionError):
        assert_same_training(one, bn_four, 1000, 4000)
    assert max(abs(a["train_loss"] / b["train_loss"] - 1) for a, b in zip(one, bn_four)) > 1e-3

    ghost = compose_config("train.epochs=3", "model.weight_scale=0.05", "norm=bn", "norm.ghost_slices=4")
    assert_same_training(bn_four, gloo_group(1).run(fit_on_rank, ghost)[0], 1000, 4000)

    again = gloo_group(2).run(fit_on_rank, syncbn)[0]
    assert strip(again) == strip(two[0])


def test_short_sweep_writes_summary_and_figure_and_plot_redraws_them(tmp_path):
    run([sys.executable, "-m", "syncbn.train", "-m", "+experiment=weight_scale_sweep",
         "model.weight_scale=0.1,0.01", "train.epochs=2", f"hydra.sweep.dir={tmp_path}"])
    summary, figure = tmp_path / "summary.csv", tmp_path / "weight_scale_sweep.png"
    lines = summary.read_text().splitlines()
    assert lines[0].split(",") == SUMMARY_COLUMNS
    rows = [dict(zip(SUMMARY_COLUMNS, line.split(","))) for line in lines[1:]]
    assert sorted({(r["norm"], float(r["weight_scale"])) for r in rows}) == [
        ("none", 0.01), ("none", 0.1), ("syncbn", 0.01), ("syncbn", 0.1)]
    assert sorted(int(r["epoch"]) for r in rows) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert matplotlib.image.imread(figure).shape[0] > 200

    summary.unlink()
    figure.unlink()
    plot_main([str(tmp_path)])
    assert summary.read_text().splitlines() == lines and figure.exists()


def test_rerun_in_the_same_directory_resumes_and_resume_false_starts_over(gloo_group, tmp_path):
    fresh = gloo_group(1).run(fit_on_rank, compose_config("train.epochs=3"))[0]
    gloo_group(1).run(fit_on_rank, compose_config("train.epochs=2"), tmp_path)
    resumed = gloo_group(1).run(fit_on_rank, compose_config("train.epochs=3"), tmp_path)[0]
    assert strip(resumed) == strip(fresh)
    assert strip(read_metrics(tmp_path)) == strip(fresh)
    restarted = gloo_group(1).run(fit_on_rank, compose_config("train.epochs=1", "train.resume=false"), tmp_path)[0]
    assert strip(restarted) == strip(fresh[:1])
    assert len(read_metrics(tmp_path)) == 1


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run ``python -m syncbn.train ARGS`` in this process; its exit code and stderr."""
    from syncbn import train

    monkeypatch.setattr(sys, "argv", ["syncbn.train", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    code = 0
    try:
        train.cli()
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["train.epochs=abc"], "Error merging override train.epochs=abc Value 'abc' of type 'str' could not be converted to Integer"),
    (["train.epoch=3"], "Key 'epoch' not in 'TrainConfig'"),
    (["+train.foo=1"], "unknown config key train.foo"),
    (["norm=batchnorm"], "Could not find 'norm/batchnorm' Available options in 'norm': bn groupnorm layernorm none syncbn"),
    (["optim=rmsprop"], "Could not find 'optim/rmsprop'"),
    (["data=imagenet"], "Could not find 'data/imagenet'"),
    (["optim.lr=0"], "optim.lr must be > 0, got 0.0"),
    (["train.epochs=0"], "train.epochs must be >= 1, got 0"),
    (["model.weight_scale=0"], "model.weight_scale must be > 0, got 0.0"),
    (["model.hidden=[]"], "model.hidden must list at least one hidden layer width"),
    (["dist.nproc=3"], "train.global_batch_size=100 is not divisible by the world size 3"),
    (["dist.nproc=4", "train.global_batch_size=2"], "train.global_batch_size=2 is smaller than the world size 4"),
    (["dist.nproc=0"], "dist.nproc must be >= 1, got 0"),
    (["data.train_size=5000"], "data.train_size=5000 is larger than the 4999 training images of data=mnist5k"),
    (["dist.backend=nccl"], "dist.backend=nccl needs CUDA devices"),
    (["+experiment=batch_size_study", "study.per_device_batch=48"], "study.per_device_batch=48 must divide train.global_batch_size=64"),
    (["+experiment=batch_size_study", "data.train_size=4000"], "needs data.train_size divisible by train.global_batch_size=64"),
    (["+experiment=batch_size_study", "dist.nproc=2"], "study.per_device_batch sets the world size itself: leave dist.nproc at 1"),
])
def test_bad_input_is_one_line_naming_it(monkeypatch, capsys, tmp_path, overrides, message):
    code, err = cli(monkeypatch, capsys, *overrides, f"hydra.run.dir={tmp_path}")
    assert code == 1
    assert err.strip().splitlines() == [err.strip()] and err.startswith("syncbn.train: error: "), err
    assert message in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_or_corrupt_mnist_files_are_one_line(monkeypatch, capsys, tmp_path, tiny_mnist):
    root, _ = tiny_mnist
    code, err = cli(monkeypatch, capsys, "data=mnist", "data.download=false", f"data.root={tmp_path / 'none'}",
                    f"hydra.run.dir={tmp_path / 'a'}")
    assert code == 1 and f"full MNIST is not in {tmp_path / 'none' / 'MNIST' / 'raw'}" in err and "data=mnist5k" in err
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:5])
    code, err = cli(monkeypatch, capsys, "data=mnist", "data.download=false", f"data.root={root}",
                    "data.train_size=10", f"hydra.run.dir={tmp_path / 'b'}")
    assert code == 1 and f"{labels} is truncated or corrupt" in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_of_another_shape_or_world_size_is_refused_before_training(monkeypatch, capsys, tmp_path):
    assert cli(monkeypatch, capsys, "train.epochs=1", "model.hidden=[20]", f"hydra.run.dir={tmp_path}")[0] == 0
    code, err = cli(monkeypatch, capsys, "model.hidden=[30]", f"hydra.run.dir={tmp_path}")
    assert f"the checkpoint in {tmp_path} holds a model of another shape" in err and "train.resume=false" in err
    code, err = cli(monkeypatch, capsys, "model.hidden=[20]", "dist.nproc=2", f"hydra.run.dir={tmp_path}")
    assert code == 1 and "was written at world size 1, this run has 2" in err


def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(monkeypatch, capsys, tmp_path):
    """Without normalisation, weight scale 1.0 blows the loss up in the first epoch; 0.29 learns."""
    code, _ = cli(monkeypatch, capsys, "-m", "+experiment=weight_scale_sweep", "norm=none",
                  "model.weight_scale=1.0,0.2928644564625237", "train.epochs=2", f"hydra.sweep.dir={tmp_path}")
    assert code == 0
    rows = [line.split(",") for line in (tmp_path / "summary.csv").read_text().splitlines()[1:]]
    diverged = [row for row in rows if row[SUMMARY_COLUMNS.index("diverged")] == "True"]
    assert len(diverged) == 1 and diverged[0][SUMMARY_COLUMNS.index("epoch")] == "1"
    assert len(rows) == 3, "the diverged run stopped after one epoch, the other trained both"
