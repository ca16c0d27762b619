"""The trainer end to end: CPU simulation, torchrun, world-size invariance, the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from syncbn import trainer
from syncbn.config import Config, register, to_config
from syncbn.distributed import DistContext
from syncbn.plot import SUMMARY_COLUMNS
from syncbn.plot import main as plot_main

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"norm", "weight_scale", "world_size", "epoch", "train_acc", "test_acc", "train_loss", "diverged", "seconds"}


def compose_config(*overrides: str) -> Config:
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def run(args: list[str], timeout: float = 180, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cpu_simulation_runs_two_ranks_and_writes_metrics(tmp_path):
    result = run([sys.executable, "-m", "syncbn.train", "dist.nproc=2", "train.epochs=2", f"hydra.run.dir={tmp_path}"])
    assert "CPU simulation: 2 ranks" in result.stdout + result.stderr
    assert "epoch 2/2" in result.stdout
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(set(r) == METRIC_KEYS and r["world_size"] == 2 for r in records)
    assert (tmp_path / ".hydra" / "config.yaml").exists() and (tmp_path / "train.log").exists()


def test_torchrun_standalone_through_the_launch_wrapper(tmp_path):
    run_dir = tmp_path / "run"
    run(["bash", "launch/torchrun.sh", "--standalone", "--nproc-per-node=2", "--", "train.epochs=1"],
        SYNCBN_RUN_DIR=str(run_dir))
    [record] = read_metrics(run_dir)
    assert record["world_size"] == 2 and record["epoch"] == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoint.pt", "metrics.jsonl", "train.log"]
    assert "epoch 1/1" in (run_dir / "train.log").read_text()


def fit_on_rank(config: Config) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return trainer.fit(config, DistContext(rank, rank, world_size, torch.device("cpu"), "gloo"))


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
    at 4 ranks (25 samples per rank) does not; a rerun is identical."""
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
