"""``logger=tensorboard``: event files read back with TensorBoard's own reader hold every member's
curves (the values of ``metrics.jsonl``), the epoch's time and the config; a resumed run shows each
epoch once; ``logger=none`` writes none."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from app import read_metrics, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from syncbn.errors import ConfigError
from syncbn.training import checkpoint, tracking
from syncbn.training.config import LoggerConfig

SWEEP = ["+experiment=weight_scale_sweep", "sweep.weight_scales=[10.0,0.01]", "train.epochs=3",
         "data.train_size=200"]  # without a norm, the 5 x 100 MLP at scale 10 overflows in epoch 1
EVALUATED = ["train.precise_bn=every_epoch", "train.batch_stats_eval=true"]  # their curves too, diverged members


def events(run_dir) -> EventAccumulator:
    reader = EventAccumulator(str(run_dir / "tensorboard"))
    reader.Reload()
    return reader


def curves(reader: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def expected_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the event files must hold: each metric as float32, the one width TensorBoard stores."""
    expected = {}
    for record in records:
        for curve in (*tracking.CURVES, *(name for name in tracking.EVALUATIONS if name in record)):
            if record[curve] is not None:
                expected.setdefault(f"{tracking.member_tag(record)}/{curve}", []).append(
                    (record["epoch"], float(np.float32(record[curve]))))
        expected.setdefault(f"{tracking.member_tag(record)}/diverged", []).append(
            (record["epoch"], float(record["diverged"])))
    for record in records:
        expected.setdefault("time/epoch_seconds", [])
        if (record["epoch"], float(np.float32(record["seconds"]))) not in expected["time/epoch_seconds"]:
            expected["time/epoch_seconds"].append((record["epoch"], float(np.float32(record["seconds"]))))
    return expected


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tensorboard") / "run"
    run([sys.executable, "-m", "syncbn.train", *SWEEP, *EVALUATED, "dist.nproc=2", "logger=tensorboard",
         f"hydra.run.dir={run_dir}"])
    return run_dir


def test_every_members_curves_are_the_metrics_of_each_epoch_a_diverged_ones_without_its_loss(sweep_run):
    records = read_metrics(sweep_run)
    assert {tracking.member_tag(r) for r in records} == {
        "syncbn_scale_10_seed_0", "syncbn_scale_0.01_seed_0", "none_scale_10_seed_0", "none_scale_0.01_seed_0"}
    [diverged] = [r for r in records if r["diverged"]]
    assert (tracking.member_tag(diverged), diverged["epoch"], diverged["train_loss"]) == ("none_scale_10_seed_0", 1, None)
    found = curves(events(sweep_run))
    assert found["none_scale_10_seed_0/diverged"] == [(1, 1.0)] and "none_scale_10_seed_0/train_loss" not in found
    assert found["none_scale_10_seed_0/test_acc"] == [(1, float(np.float32(diverged["test_acc"])))]
    assert {len(found[f"syncbn_scale_0.01_seed_0/{name}"]) for name in tracking.EVALUATIONS} == {3}
    assert found == expected_curves(records)


def test_members_that_differ_only_in_their_bn_group_have_tags_of_their_own():
    names = dict(norm="syncbn", weight_scale=0.1, seed=0)
    tags = [tracking.member_tag(dict(names, **layout)) for layout in
            ({}, {"bn_slice": 4}, {"bn_slice": 4, "bn_group": 2}, {"bn_slice": 4, "bn_group": 8})]
    assert tags == ["syncbn_scale_0.1_seed_0", "syncbn_slice_4_scale_0.1_seed_0", "syncbn_slice_4_group_2_scale_0.1_seed_0",
                    "syncbn_slice_4_group_8_scale_0.1_seed_0"]


def test_the_config_is_written_as_text(sweep_run):
    [text] = events(sweep_run).Tensors("config/text_summary")
    written = text.tensor_proto.string_val[0].decode()
    assert "weight_scales:\n  - 10.0\n  - 0.01" in written and "logger:\n  name: tensorboard" in written


def test_a_run_resumed_from_an_older_checkpoint_shows_each_epoch_once_with_its_new_values(tmp_path):
    """Epoch 3's events are written, then the run resumes from epoch 2's checkpoint (the newest when
    a kill lands between a checkpoint's two renames): its first attempt's epoch 3 is hidden."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "syncbn.train", *SWEEP, "logger=tensorboard", f"hydra.run.dir={run_dir}"]
    run(command)
    (run_dir / checkpoint.LATEST).unlink()
    run([*command, "train.epochs=4"])
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4], "the diverged member stops at 1"
    assert curves(events(run_dir)) == expected_curves(records)
    assert len(events(run_dir).Tensors("config/text_summary")) == 1, "the config once, not again per attempt"


def test_without_a_logger_no_event_file_is_written(tmp_path):
    run([sys.executable, "-m", "syncbn.train", "train.epochs=1", "data.train_size=100", f"hydra.run.dir={tmp_path}"])
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


def test_tensorboard_without_its_package_is_refused_naming_the_extra(monkeypatch):
    tracking.check(LoggerConfig("tensorboard"))
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"logger=tensorboard needs the tensorboard package: pip install -e '\.\[tensorboard\]'"):
        tracking.check(LoggerConfig("tensorboard"))
    tracking.check(LoggerConfig("none"))
