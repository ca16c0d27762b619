"""The batch-size study: how each per-device batch is executed, and its CSV and figure end to end."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from omegaconf import OmegaConf
from app import ROOT, compose_config, read_metrics, run

from syncbn.experiments import batch_size, study_plan
from syncbn.experiments.study_plan import LAYOUT_FILE, Layout
from syncbn.training.config import Config
from syncbn.training.members import build_network


def study_config(*overrides: str) -> Config:
    return compose_config("+experiment=batch_size_study_per_run", *overrides)


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
        (run_dir / LAYOUT_FILE).write_text(json.dumps(layout))
        records = [dict(epoch=e, train_acc=a, test_acc=a - 0.05, train_loss=1.0 / e, diverged=name == "diverged", seconds=1.234)
                   for e, a in enumerate(accuracies, start=1)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / LAYOUT_FILE).write_text(json.dumps(layout))
    rows = batch_size.read_study(tmp_path)  # in directory order: diverged, done
    assert [(r["epochs"], r["diverged"], r["epochs_to_90pct_train_acc"], r["seconds"]) for r in rows] == [
        (1, True, None, 1.23), (3, False, 2, 3.7)]
    assert [(r["final_train_acc"], r["final_test_acc"], r["final_train_loss"]) for r in rows] == [
        (0.1, 0.1 - 0.05, 1.0), (0.95, 0.95 - 0.05, 1.0 / 3)]
    assert all(r.items() >= {k: v for k, v in layout.items() if k != "epochs"}.items() for r in rows)  # epochs: trained
    assert "skipped 2 unfinished runs: running, started" in capsys.readouterr().err


FLOAT64 = ["train.dtype=float64", "data.train_size=640"]
ROW_KEY = ("model", "norm", "per_device_batch", "group_size", "seed")


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == batch_size.COLUMNS
        return list(reader)


def fused_members(fused: Path, study: list[str]) -> dict[tuple, dict]:
    """Each row's final parameters in a fused study run with ``study`` (its overrides): those of the
    member that gave it, as that member's standalone network."""
    config = compose_config(*study)
    jobs = study_plan.fused_jobs(config, {m: compose_config(*study, f"model={m}") for m in study_plan.study_lists(config)[0]})
    parameters = {}
    for job in jobs:
        network = build_network(job.config)
        network.load_state_dict(torch.load(fused / job.name / "checkpoint.pt", weights_only=True)["model"])
        names = [{k: v for k, v in member.record().items() if k != "weight_scale"} for member in network.members]
        for row in job.rows:
            key = tuple("" if row[k] is None else str(row[k]) for k in ROW_KEY)  # as the CSV writes it
            parameters[key] = network.member_network(names.index(row["member"])).state_dict()
    return parameters


def assert_fused_equals_per_run(fused: Path, study: list[str], per_run: Path) -> None:
    """Every row of the per-run study is in the fused study's CSV with the same world size and epochs,
    the same accuracies and diverged flag, its loss to 1e-9, and the fused member that gave it ends
    with the per-run network's parameters to 1e-9 (float64: the two differ in summation order only)."""
    mine = {tuple(r[k] for k in ROW_KEY): r for r in read_rows(fused / "batch_study.csv")}
    parameters = fused_members(fused, study)
    reference = read_rows(per_run / "batch_study.csv")
    assert reference and set(parameters) == set(mine)
    same = ("world_size", "bn_span", "epochs", "final_train_acc", "final_test_acc", "final_precise_test_acc",
            "final_batch_test_acc", "diverged", "epochs_to_90pct_train_acc")
    for theirs in reference:
        key = tuple(theirs[k] for k in ROW_KEY)
        assert [mine[key][k] for k in same] == [theirs[k] for k in same], key
        assert float(mine[key]["final_train_loss"]) == pytest.approx(float(theirs["final_train_loss"]), rel=1e-9, abs=0)
    for layout in per_run.glob(f"*/{LAYOUT_FILE}"):
        run_layout = json.loads(layout.read_text())
        key = tuple("" if run_layout[k] is None else str(run_layout[k]) for k in ROW_KEY)
        final = torch.load(layout.parent / "checkpoint.pt", weights_only=True)["model"]
        assert final.keys() == parameters[key].keys(), key
        for name, value in final.items():
            torch.testing.assert_close(parameters[key][name], value, rtol=1e-9, atol=1e-9,
                                       msg=lambda message, key=key, name=name: f"{key} {name}: {message}")


STUDIES = {
    # 2 per-device batches (32: 2 real ranks; 8: 8 emulated), 1 seed, 1 epoch, both models. The
    # per-run reference (the CNN's rows) runs LayerNorm at b = 32 on 2 real ranks, where the fused
    # study computes it in one process, and per-rank BN on real ranks and by slices as the fused
    # jobs do; the MLP's members are held to their runs in the large case and tests/training.
    "small": (["study.per_device_batches=[32,8]", "study.seeds=[0]", "study.norms=[syncbn,bn,layernorm]",
               "train.epochs=1"], ["model=cnn", "study.per_device_batch=8,32", "seed=0", "norm=bn,layernorm",
                                "train.epochs=1"]),
    # The agreement case, a documented command (docs/batch-size-study.md), 40 per-run runs:
    # pytest -m large tests/experiments/test_batch_size.py
    # Not b = 4 or 2 in the MLP: per-rank BN over so few samples is chaotic, and 20 steps amplify the
    # two sides' rounding (1e-16) to 1.4e-8 in its running variance (every other member: < 2e-13).
    "large": (["study.per_device_batches=[64,32,16,8]", "study.seeds=[0]", "train.epochs=2"],
              ["study.per_device_batch=64,32,16,8", "seed=0", "train.epochs=2"]),
}


@pytest.mark.processes
@pytest.mark.parametrize("size", ["small", pytest.param("large", marks=pytest.mark.large)])
def test_the_fused_study_gives_the_per_run_studys_rows_and_writes_the_csv_and_the_figure(tmp_path, size):
    """In float64 the fused study and the per-run reference give the same rows and final parameters."""
    fused, per_run = tmp_path / "fused", tmp_path / "per-run"
    study = ["+experiment=batch_size_study", *STUDIES[size][0], *FLOAT64]
    command = [sys.executable, "-m", "syncbn.train", *study, f"hydra.run.dir={fused}"]
    run(command, timeout=900)
    jobs = sorted(path.parent.name for path in fused.glob("*/study.json"))
    assert run(command, timeout=240).stderr.endswith(f"{fused} holds the {len(jobs)} finished jobs of the study: "
                                                     "nothing to train\n")
    run([sys.executable, "-m", "syncbn.train", "-m", "+experiment=batch_size_study_per_run", *STUDIES[size][1],
         *FLOAT64, f"hydra.sweep.dir={per_run}"], timeout=3600)
    assert_fused_equals_per_run(fused, study, per_run)
    rows = read_rows(fused / "batch_study.csv")
    by_key, parameters = {tuple(r[k] for k in ROW_KEY): r for r in rows}, fused_members(fused, study)
    for model in ("mlp", "cnn"):  # synchronized BN on 2 real ranks, as the one-process member computes it
        real, one_process = (model, "syncbn", "32", "2", "0"), (model, "syncbn", "8", "8", "0")
        assert by_key[real]["final_test_acc"] == by_key[one_process]["final_test_acc"]
        for name, value in parameters[real].items():
            torch.testing.assert_close(value, parameters[one_process][name], rtol=1e-9, atol=1e-9)

    image = matplotlib.image.imread(fused / "batch_study.png")
    assert 0.8 < image.shape[1] / image.shape[0] < 0.9, "two panels wide, three rows: batch, BN span, evaluations"
    before = (fused / "batch_study.csv").read_text()
    (fused / "batch_study.csv").unlink()
    batch_size.main([str(fused)])
    assert (fused / "batch_study.csv").read_text() == before

    # Stopped before one of its jobs, the same command trains that job alone: the same rows, bit for
    # bit (the same world sizes and threads), but the job's time.
    shutil.rmtree(fused / "mlp-w2")
    finished = {path: path.stat().st_mtime_ns for path in fused.glob("*/metrics.jsonl")}
    run(command, timeout=240)
    assert {path: path.stat().st_mtime_ns for path in finished} == finished, "the finished jobs are not trained again"
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(fused / "batch_study.csv")] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_the_small_study_is_four_jobs_whose_rows_are_computed_each_way():
    """What the small case above compares: real ranks, slices and one process, on both sides."""
    config = compose_config("+experiment=batch_size_study", *STUDIES["small"][0])
    jobs = study_plan.fused_jobs(config, {m: compose_config("+experiment=batch_size_study", *STUDIES["small"][0],
                                                            f"model={m}") for m in ("mlp", "cnn")})
    assert [job.name for job in jobs] == ["mlp-w1", "mlp-w2", "cnn-w1", "cnn-w2"]
    grouped = [r for job in jobs for r in job.rows if r["norm"] == "syncbn" and r["group_size"] != r["world_size"]]
    assert [(r["model"], r["per_device_batch"], r["group_size"], r["execution"]) for r in grouped] == [
        ("mlp", 8, 2, "ghost"), ("mlp", 8, 4, "ghost")], "BN groups of the MLP: slices of 8 in groups, one process"
    assert {(r["model"], r["norm"], r["per_device_batch"]): (r["world_size"], r["execution"])
            for job in jobs for r in job.rows if r not in grouped} == {
        (model, norm, batch): layout
        for model in ("mlp", "cnn")
        for norm, batch, layout in [("syncbn", 32, (2, "real")), ("syncbn", 8, (8, "one-process")),
                                    ("bn", 32, (2, "real")), ("bn", 8, (8, "ghost")),
                                    ("layernorm", 32, (2, "one-process")), ("layernorm", 8, (8, "one-process"))]}


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
    assert Layout(batch, world_size, execution).save(config, run_dir) == run_dir / LAYOUT_FILE
    record = dict(epoch=1, train_acc=accuracy, test_acc=accuracy, train_loss=0.5, diverged=False, seconds=2.0)
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")


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


def test_a_fused_jobs_rows_are_its_members_final_epochs_each_with_its_share_of_the_jobs_time(tmp_path):
    """Two per-rank BN members told apart by their slices and a syncbn member giving two rows; the
    job took 2 + 4 s, so each of its 3 members' rows is 2 s; a member still training holds it back."""
    rows = [dict(model="cnn", epochs=2, norm="bn", per_device_batch=b, world_size=64 // b, seed=0, execution="ghost",
                 member=dict(norm="bn", seed=0, bn_slice=b)) for b in (8, 4)]
    rows += [dict(model="cnn", epochs=2, norm="syncbn", per_device_batch=b, world_size=64 // b, seed=0,
                  execution="one-process", member=dict(norm="syncbn", seed=0)) for b in (8, 4)]
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(dict(epochs=2, rows=rows)))
    accuracy = {8: 0.5, 4: 0.25, None: 0.75}
    records = [dict(norm=norm, seed=0, **({"bn_slice": b} if b else {}), epoch=epoch, train_acc=accuracy[b] + epoch / 10,
                    test_acc=accuracy[b], train_loss=1.0, diverged=False, seconds=2.0 * epoch)
               for epoch in (1, 2) for norm, b in (("bn", 8), ("bn", 4), ("syncbn", None))]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))
    assert batch_size.run_rows(tmp_path) is None, "the syncbn member has not finished epoch 2"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    found = batch_size.run_rows(tmp_path)
    assert [(r["norm"], r["per_device_batch"], r["final_test_acc"], r["final_train_acc"], r["epochs"], r["seconds"])
            for r in found] == [("bn", 8, 0.5, 0.7, 2, 2.0), ("bn", 4, 0.25, 0.45, 2, 2.0),
                                ("syncbn", 8, 0.75, 0.95, 2, 2.0), ("syncbn", 4, 0.75, 0.95, 2, 2.0)]
    assert all("member" not in r for r in found)


@pytest.mark.processes
def test_a_study_killed_mid_job_resumes_each_job_from_its_checkpoint_bit_exactly(tmp_path):
    """The W = 1 job SIGKILLs the whole command after step 5 (a checkpoint every 2 steps); the same
    command resumes that job from step 4, then its W = 2 job loses rank 0 after step 5 and the
    launcher restarts both ranks from step 4. The CSV and every job's metrics equal an uninterrupted
    study's, bit for bit (float32: the same world sizes, threads and steps)."""
    study = [sys.executable, "-m", "syncbn.train", "+experiment=batch_size_study", "study.models=[mlp]",
             "study.norms=[syncbn,bn]", "study.per_device_batches=[32,4]", "study.seeds=[0]", "train.epochs=2",
             "data.train_size=320", "train.checkpoint_every_steps=2"]
    run([*study, f"hydra.run.dir={tmp_path / 'whole'}"], timeout=240)
    killed = [*study, "fault.kill_rank=0", "fault.kill_at_step=5", "dist.max_restarts=1", f"hydra.run.dir={tmp_path / 'killed'}"]
    first = subprocess.run(killed, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert not (tmp_path / "killed" / "mlp-w2").exists() and (tmp_path / "killed" / "mlp-w1" / "checkpoint.pt").exists()
    rerun = run(killed, timeout=240)
    resumed = [line.split(" - ", 1)[1] for line in rerun.stdout.splitlines() if "resumed from" in line]
    assert [line.split(": epoch")[0] for line in resumed] == [
        f"resumed from {tmp_path / 'killed' / job / 'checkpoint.pt'}" for job in ("mlp-w1", "mlp-w2")], rerun.stdout
    assert all("epoch 1, step 4" in line for line in resumed), resumed

    def without_seconds(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    for job in ("mlp-w1", "mlp-w2"):
        whole, resumed = read_metrics(tmp_path / "whole" / job), read_metrics(tmp_path / "killed" / job)
        assert sorted({r["epoch"] for r in whole}) == [1, 2], "each epoch of every member once, as uninterrupted"
        assert without_seconds(resumed) == without_seconds(whole), job
    assert without_seconds(read_rows(tmp_path / "killed" / "batch_study.csv")) == without_seconds(
        read_rows(tmp_path / "whole" / "batch_study.csv"))
