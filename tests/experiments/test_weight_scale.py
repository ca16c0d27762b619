"""The weight-scale sweep's summaries from metrics records: the CSV, the final-accuracy table (the
last epoch of each network, the mean and range over seeds, divergence), and the reading of a sweep
directory. The figure is drawn from the same grouping; its file is checked end to end in test_train."""

from __future__ import annotations

import csv
import json

import pytest
from omegaconf import OmegaConf

from syncbn.experiments import weight_scale
from syncbn.experiments.summary import write_csv


def record(norm: str, scale: float, seed: int, epoch: int, acc: float, diverged: bool = False, **extra) -> dict:
    return dict(norm=norm, weight_scale=scale, seed=seed, world_size=2, epoch=epoch, train_acc=acc, test_acc=acc - 0.01,
                train_loss=1.0 / epoch, diverged=diverged, seconds=0.5, **extra)


def network(norm: str, scale: float, seed: int, accuracies: list[float], diverged_at: int | None = None) -> list[dict]:
    return [record(norm, scale, seed, epoch, acc, epoch == diverged_at) for epoch, acc in enumerate(accuracies, start=1)]


def test_the_table_reads_each_networks_last_epoch_with_scales_largest_first_and_a_column_per_norm():
    rows = [*network("syncbn", 0.01, 0, [0.5, 0.75]), *network("syncbn", 1.0, 0, [0.2, 0.25, 0.875]),
            *network("none", 1.0, 0, [0.1, 0.125]), *network("custom", 1.0, 0, [0.5])]
    assert weight_scale.final_accuracy_table(rows).splitlines() == [
        "| weight scale | custom | without BatchNorm | BatchNorm (synchronized) |",
        "|---|---|---|---|",
        "| 1 | 0.500 | 0.125 | 0.875 |",
        "| 0.01 |  |  | 0.750 |",
    ]


def test_with_seeds_a_cell_is_the_mean_and_range_of_the_trained_and_counts_the_diverged():
    rows = [*network("bn", 0.1, 0, [0.2, 0.5]), *network("bn", 0.1, 1, [0.3, 0.75]), *network("bn", 0.1, 2, [0.1], 1),
            *network("none", 0.1, 0, [0.1], 1), *network("none", 0.1, 1, [0.2, 0.1], 2),
            *network("syncbn", 0.1, 0, [0.5, 0.25], 2), *network("syncbn", 0.1, 1, [0.625, 0.5])]
    cells = weight_scale.final_accuracy_table(rows).splitlines()[2].split(" | ")
    assert cells[1:] == ["0.625 (0.500-0.750), 1 of 3 diverged", "diverged (epochs 1, 2)", "0.500, 1 of 2 diverged |"]


def test_a_single_seed_that_diverged_names_its_epoch():
    rows = network("none", 1.0, 0, [0.1, 0.1, 0.1], 3)
    assert weight_scale.final_accuracy_table(rows).splitlines()[2] == "| 1 | diverged (epoch 3) |"


@pytest.mark.parametrize("seeds,expected", [
    ({0: network("none", 1.0, 0, [0.1, 0.2])}, None),
    ({0: network("none", 1.0, 0, [0.1, 0.2], 2)}, "none: loss not finite at epoch 2, stopped"),
    ({0: network("none", 1.0, 0, [0.1], 1), 1: network("none", 1.0, 1, [0.1, 0.2])}, "none: 1 of 2 seeds diverged (epoch 1)"),
    ({0: network("none", 1.0, 0, [0.1], 1), 1: network("none", 1.0, 1, [0.1, 0.2], 2), 2: network("none", 1.0, 2, [0.1], 1)},
     "none: 3 of 3 seeds diverged (epochs 1, 2)"),
])
def test_the_figures_divergence_note_names_the_seeds_and_epochs(seeds, expected):
    assert weight_scale._divergence_note("none", seeds) == expected


def test_each_curve_point_is_the_mean_lowest_and_highest_over_the_seeds_that_reached_that_epoch():
    seeds = {0: network("bn", 0.1, 0, [0.2, 0.5, 0.75]), 1: network("bn", 0.1, 1, [0.4, 0.25], 2)}
    assert weight_scale._curve(seeds) == ([1, 2, 3], [0.30000000000000004, 0.375, 0.75], [0.2, 0.25, 0.75], [0.4, 0.5, 0.75])


def test_the_csv_has_the_summary_columns_and_leaves_other_keys_out(tmp_path):
    rows = network("bn", 0.1, 0, [0.2, 0.5])
    rows[0]["members"] = 4
    with write_csv(rows, tmp_path / "summary.csv", weight_scale.SUMMARY.columns).open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == weight_scale.SUMMARY_COLUMNS
        assert [(r["epoch"], r["train_acc"]) for r in reader] == [("1", "0.2"), ("2", "0.5")]


def test_a_sweep_directorys_records_are_read_from_every_run_in_norm_scale_seed_epoch_order(tmp_path):
    runs = {"a/0": network("syncbn", 0.1, 1, [0.3, 0.4]), "a/1": network("syncbn", 1.0, 0, [0.5]),
            "b": network("bn", 0.1, 0, [0.6]), "c": network("syncbn", 0.1, 0, [0.7, 0.8])}
    for name, records in runs.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(records)) + "\n")
    order = [(r["norm"], r["weight_scale"], r["seed"], r["epoch"]) for r in weight_scale.read_metrics(tmp_path)]
    assert order == [("bn", 0.1, 0, 1), ("syncbn", 1.0, 0, 1), ("syncbn", 0.1, 0, 1), ("syncbn", 0.1, 0, 2),
                     ("syncbn", 0.1, 1, 1), ("syncbn", 0.1, 1, 2)]


def test_a_directory_without_metrics_is_refused_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^no metrics.jsonl under {tmp_path}: is it a sweep directory\\?$"):
        weight_scale.read_metrics(tmp_path)


def write_runs(sweep_dir, runs: dict[str, list[dict]]) -> None:
    for name, records in runs.items():
        (sweep_dir / name).mkdir(parents=True)
        (sweep_dir / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_redrawing_a_sweep_writes_its_csv_and_figure_and_prints_the_table(tmp_path, capsys):
    write_runs(tmp_path, {"0": network("syncbn", 1.0, 0, [0.5, 0.75]), "1": network("none", 1.0, 0, [0.1], 1)})
    weight_scale.main([str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"wrote {tmp_path / 'summary.csv'}", f"wrote {tmp_path / 'weight_scale_sweep.png'}"]
    assert out[2:] == weight_scale.final_accuracy_table(weight_scale.read_metrics(tmp_path)).splitlines()
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 4
    assert (tmp_path / "weight_scale_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_redrawing_a_directory_without_runs_exits_1_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        weight_scale.main([str(tmp_path)])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"syncbn.experiments.weight_scale: error: no metrics.jsonl under {tmp_path}: is it a sweep directory?\n"


def test_the_hydra_callback_summarizes_the_multiruns_sweep_directory(tmp_path):
    write_runs(tmp_path, {"0": network("bn", 0.1, 0, [0.5])})
    weight_scale.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "weight_scale_sweep.png").exists()


def test_help_says_what_the_command_does_and_what_it_takes(capsys):
    with pytest.raises(SystemExit) as exit_:
        weight_scale.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and out == (
        f"usage: syncbn.experiments.weight_scale [-h] sweep_dir {weight_scale.__doc__.splitlines()[0]} positional arguments: sweep_dir a sweep "
        "directory (multirun/...) holding runs' metrics.jsonl options: -h, --help show this help message and exit")
