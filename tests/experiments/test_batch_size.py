"""The batch-size study: how each per-device batch is executed, and its CSV and figure end to end."""

from __future__ import annotations

import csv
import json
import sys

import matplotlib.image
import pytest
from omegaconf import OmegaConf
from app import compose_config, run

from syncbn.experiments import batch_size
from syncbn.training.config import Config, ConfigError


def study_config(*overrides: str) -> Config:
    return compose_config("+experiment=batch_size_study", *overrides)


@pytest.mark.parametrize("norm,per_device_batch,max_real_ranks,world_size,execution,nproc,ghost_slices", [
    ("syncbn", 64, 2, 1, "real", 1, None),
    ("bn", 32, 2, 2, "real", 2, None),
    ("bn", 16, 2, 4, "ghost", 1, 4),
    ("bn", 2, 2, 32, "ghost", 1, 32),
    ("bn", 16, 4, 4, "real", 4, None),
    ("syncbn", 16, 2, 4, "one-process", 1, None),
    ("layernorm", 2, 2, 32, "one-process", 1, None),
    ("groupnorm", 8, 2, 8, "one-process", 1, None),
    ("none", 4, 2, 16, "one-process", 1, None),
])
def test_a_per_device_batch_becomes_real_ranks_ghost_slices_or_one_process(
        norm, per_device_batch, max_real_ranks, world_size, execution, nproc, ghost_slices):
    config = study_config(f"norm={norm}", f"study.per_device_batch={per_device_batch}", f"study.max_real_ranks={max_real_ranks}")
    layout = batch_size.plan(config)
    assert layout == batch_size.Layout(per_device_batch, world_size, execution)
    assert type(layout.world_size) is int
    arranged = layout.apply(config)
    assert (arranged.dist.nproc, arranged.norm.ghost_slices) == (nproc, ghost_slices)
    assert arranged.train == config.train and arranged.model == config.model


def test_an_ordinary_run_has_no_layout():
    assert batch_size.plan(study_config("study.per_device_batch=null")) is None


EQUAL_BATCHES = ("the batch-size study needs data.train_size divisible by train.global_batch_size=64, so that every "
                 "step splits into equal per-device batches; got {}")


@pytest.mark.parametrize("overrides,message", [
    (["study.per_device_batch=0"], "study.per_device_batch=0 must divide train.global_batch_size=64"),
    (["study.per_device_batch=24"], "study.per_device_batch=24 must divide train.global_batch_size=64"),
    (["study.max_real_ranks=0"], "study.max_real_ranks must be >= 1, got 0"),
    (["study.max_real_ranks=0", "study.per_device_batch=null"], "study.max_real_ranks must be >= 1, got 0"),
    (["dist.nproc=4"], "study.per_device_batch sets the world size itself: leave dist.nproc at 1 and start it without "
                       "torchrun"),
    (["norm=bn", "norm.ghost_slices=2"], "study.per_device_batch sets norm.ghost_slices itself: leave it null"),
    (["data.train_size=null"], EQUAL_BATCHES.format(None)),
    (["data.train_size=3900"], EQUAL_BATCHES.format(3900)),
    (["norm=bn", "study.per_device_batch=1"], "norm=bn with model=mlp normalizes over the per-device batch and needs 2 "
                                               "samples or more, got 1"),
])
def test_layouts_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError) as refusal:
        batch_size.plan(study_config(*overrides))
    assert str(refusal.value) == message


@pytest.mark.parametrize("overrides", [["study.max_real_ranks=1"], ["norm=bn", "study.per_device_batch=2"],
                                       ["norm=bn", "model=cnn", "study.per_device_batch=1"],
                                       ["norm=syncbn", "study.per_device_batch=1"], ["data.train_size=128"]])
def test_layouts_at_the_limits_are_planned(overrides):
    assert batch_size.plan(study_config(*overrides)) is not None


def test_epochs_to_reach_is_the_first_epoch_at_or_above_the_target():
    records = [dict(epoch=e, train_acc=a) for e, a in enumerate([0.5, 0.89, 0.9, 0.95, 0.88], start=1)]
    assert batch_size.epochs_to_reach(records) == 3
    assert batch_size.epochs_to_reach(records, 0.96) is None


def test_only_finished_runs_become_rows(tmp_path, capsys):
    """A run is finished when its last epoch is the planned one or it diverged."""
    layout = dict(norm="bn", model="mlp", seed=0, epochs=3, per_device_batch=4, world_size=16, execution="ghost")
    epochs = {"done": [0.8, 0.92, 0.95], "running": [0.8], "diverged": [0.1]}
    for name, accuracies in epochs.items():
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / batch_size.LAYOUT_FILE).write_text(json.dumps(layout))
        records = [dict(epoch=e, train_acc=a, test_acc=a - 0.05, train_loss=1.0 / e, diverged=name == "diverged", seconds=1.234)
                   for e, a in enumerate(accuracies, start=1)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / batch_size.LAYOUT_FILE).write_text(json.dumps(layout))
    rows = batch_size.read_study(tmp_path)  # in directory order: diverged, done
    assert [(r["epochs"], r["diverged"], r["epochs_to_90pct_train_acc"], r["seconds"]) for r in rows] == [
        (1, True, None, 1.23), (3, False, 2, 3.7)]
    assert [(r["final_train_acc"], r["final_test_acc"], r["final_train_loss"]) for r in rows] == [
        (0.1, 0.1 - 0.05, 1.0), (0.95, 0.95 - 0.05, 1.0 / 3)]
    assert all(r.items() >= {k: v for k, v in layout.items() if k != "epochs"}.items() for r in rows)  # epochs: trained
    assert "skipped 2 unfinished runs: running, started" in capsys.readouterr().err


@pytest.mark.processes
def test_a_tiny_study_writes_the_csv_and_the_figure(tmp_path):
    """2 per-device batches (32: 2 real ranks; 4: 16 emulated), 1 seed, 1 epoch, both models, in
    float64 so that real ranks and one process can be held to the same numbers."""
    command = [sys.executable, "-m", "syncbn.train", "-m", "+experiment=batch_size_study", "study.per_device_batch=32,4",
               "seed=0", "train.epochs=1", "train.dtype=float64", "data.train_size=640", "norm=syncbn,bn", f"hydra.sweep.dir={tmp_path}"]
    run(command, timeout=240)

    with (tmp_path / "batch_study.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == batch_size.COLUMNS
        rows = list(reader)
    layouts = {(r["model"], r["norm"], r["per_device_batch"]): (r["world_size"], r["execution"]) for r in rows}
    assert layouts == {
        (model, norm, batch): layout
        for model in ("mlp", "cnn")
        for norm, batch, layout in [("syncbn", "32", ("2", "real")), ("syncbn", "4", ("16", "one-process")),
                                    ("bn", "32", ("2", "real")), ("bn", "4", ("16", "ghost"))]
    }
    assert all(r["seed"] == "0" and r["epochs"] == "1" and r["diverged"] == "False" for r in rows)
    assert all(0 <= float(r["final_test_acc"]) <= 1 and float(r["final_train_loss"]) > 0 for r in rows)
    assert all(r["epochs_to_90pct_train_acc"] in ("", "1") for r in rows)
    assert (tmp_path / "0-mlp-syncbn-b32-seed0" / batch_size.LAYOUT_FILE).exists()
    assert json.loads((tmp_path / "3-mlp-bn-b4-seed0" / batch_size.LAYOUT_FILE).read_text())["execution"] == "ghost"

    by_key = {(r["model"], r["norm"], r["per_device_batch"]): r for r in rows}
    for model in ("mlp", "cnn"):
        real, one_process = by_key[(model, "syncbn", "32")], by_key[(model, "syncbn", "4")]
        # SyncBN on 2 real ranks trains like one process on the global batch: in float64 the two
        # differ by summation order only (~1e-16), so predictions agree and losses to 1e-9.
        assert (real["final_train_acc"], real["final_test_acc"]) == (one_process["final_train_acc"], one_process["final_test_acc"])
        assert float(real["final_train_loss"]) == pytest.approx(float(one_process["final_train_loss"]), rel=1e-9)

    image = matplotlib.image.imread(tmp_path / "batch_study.png")
    assert image.shape[1] > 1.8 * image.shape[0], "two panels side by side"
    before = (tmp_path / "batch_study.csv").read_text()
    (tmp_path / "batch_study.csv").unlink()
    batch_size.main([str(tmp_path)])
    assert (tmp_path / "batch_study.csv").read_text() == before


def study_row(model: str, norm: str, batch: int, seed: int, accuracy: float) -> dict:
    return dict(model=model, norm=norm, per_device_batch=batch, seed=seed, final_test_acc=accuracy)


def test_the_table_has_a_row_per_model_and_norm_in_the_studys_order_and_a_column_per_batch_largest_first():
    rows = [study_row("cnn", "bn", 4, 0, 0.5), study_row("mlp", "none", 32, 0, 0.25), study_row("mlp", "bn", 4, 0, 0.125),
            study_row("mlp", "bn", 4, 1, 0.375), study_row("mlp", "bn", 32, 0, 0.75), study_row("mlp", "custom", 4, 0, 1.0),
            study_row("mlp", "syncbn", 32, 0, 0.625)]
    assert batch_size.accuracy_table(rows).splitlines() == [
        "| model | norm | b=32 | b=4 |",
        "|---|---|---|---|",
        "| mlp | BatchNorm (synchronized) | 0.625 (0.625-0.625) |  |",
        "| mlp | BatchNorm (per rank) | 0.750 (0.750-0.750) | 0.250 (0.125-0.375) |",
        "| mlp | no normalization | 0.250 (0.250-0.250) |  |",
        "| mlp | custom |  | 1.000 (1.000-1.000) |",
        "| cnn | BatchNorm (per rank) |  | 0.500 (0.500-0.500) |",
    ]


def test_rows_are_ordered_by_model_mlp_first_norm_batch_largest_first_and_seed():
    keys = [("cnn", "bn", 4, 0), ("mlp", "none", 4, 0), ("mlp", "bn", 2, 0), ("mlp", "bn", 4, 1), ("mlp", "bn", 4, 0),
            ("aaa", "syncbn", 4, 0), ("mlp", "syncbn", 2, 0)]
    rows = [dict(model=m, norm=n, per_device_batch=b, seed=s) for m, n, b, s in keys]
    assert [(r["model"], r["norm"], r["per_device_batch"], r["seed"]) for r in sorted(rows, key=batch_size._order)] == [
        ("mlp", "syncbn", 2, 0), ("mlp", "bn", 4, 0), ("mlp", "bn", 4, 1), ("mlp", "bn", 2, 0), ("mlp", "none", 4, 0),
        ("aaa", "syncbn", 4, 0), ("cnn", "bn", 4, 0)]


def test_a_directory_without_finished_study_runs_is_refused_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished study run"):
        batch_size.read_study(tmp_path)


def finished_run(sweep_dir, name: str, norm: str, batch: int, world_size: int, execution: str, accuracy: float) -> None:
    run_dir = sweep_dir / name
    run_dir.mkdir()
    config = study_config(f"norm={norm}", "seed=0", "train.epochs=1")
    assert batch_size.Layout(batch, world_size, execution).save(config, run_dir) == run_dir / batch_size.LAYOUT_FILE
    record = dict(epoch=1, train_acc=accuracy, test_acc=accuracy, train_loss=0.5, diverged=False, seconds=2.0)
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")


def test_a_layout_is_saved_with_the_run_it_belongs_to(tmp_path):
    config = study_config("norm=groupnorm", "seed=3", "train.epochs=7", "model=cnn")
    path = batch_size.Layout(8, 8, "one-process").save(config, tmp_path)
    assert path.read_text().endswith("\n") and json.loads(path.read_text()) == dict(
        norm="groupnorm", model="cnn", seed=3, epochs=7, per_device_batch=8, world_size=8, execution="one-process")


def test_redrawing_a_study_writes_its_csv_and_figure_and_prints_the_table(tmp_path, capsys):
    finished_run(tmp_path, "a", "bn", 4, 16, "ghost", 0.5)
    finished_run(tmp_path, "b", "bn", 32, 2, "real", 0.75)
    batch_size.main([str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"wrote {tmp_path / 'batch_study.csv'}", f"wrote {tmp_path / 'batch_study.png'}"]
    assert out[2:] == batch_size.accuracy_table(batch_size.read_study(tmp_path)).splitlines()
    with (tmp_path / "batch_study.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["per_device_batch"], r["execution"], r["final_test_acc"]) for r in rows] == [
        ("32", "real", "0.75"), ("4", "ghost", "0.5")]
    assert (tmp_path / "batch_study.png").read_bytes()[:4] == b"\x89PNG"
    assert batch_size._emulated_batches(batch_size.read_study(tmp_path), "mlp") == [4]


def test_redrawing_a_directory_without_a_study_exits_1_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        batch_size.main([str(tmp_path)])
    assert exit_.value.code == 1 and capsys.readouterr().err.startswith(
        f"syncbn.experiments.batch_size: error: no finished study run (a study.json and its metrics.jsonl) under {tmp_path}")


def test_the_hydra_callback_summarizes_the_studys_sweep_directory(tmp_path):
    finished_run(tmp_path, "a", "syncbn", 64, 1, "real", 0.5)
    batch_size.BatchStudySummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert (tmp_path / "batch_study.csv").exists() and (tmp_path / "batch_study.png").exists()


def test_help_says_what_the_command_does_and_what_it_takes(capsys):
    with pytest.raises(SystemExit) as exit_:
        batch_size.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and out == (
        "usage: syncbn.experiments.batch_size [-h] sweep_dir Redraw a batch-size study's batch_study.csv and batch_study.png. "
        "positional arguments: sweep_dir the study's sweep directory (multirun/batch_size_study/...) options: -h, "
        "--help show this help message and exit")
