"""Sweep summaries: ``summary.csv`` and the book's 4x4 weight-scale figure from the runs' metrics.

    python -m syncbn.plot SWEEP_DIR      # redraw from every SWEEP_DIR/**/metrics.jsonl

A sweep started with ``+experiment=weight_scale_sweep`` calls the same code when its last run ends
(the ``SweepSummary`` Hydra callback).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402

SUMMARY_COLUMNS = ["norm", "weight_scale", "world_size", "epoch", "train_acc", "test_acc", "train_loss", "diverged", "seconds"]
LINE_STYLES = {"syncbn": "-", "bn": "-", "none": "--", "layernorm": "-.", "groupnorm": ":"}
LABELS = {
    "syncbn": "BatchNorm (synchronized)",
    "bn": "BatchNorm (per rank)",
    "none": "without BatchNorm",
    "layernorm": "LayerNorm",
    "groupnorm": "GroupNorm",
}


def read_metrics(sweep_dir: Path) -> list[dict]:
    """Every epoch record of every run under ``sweep_dir``, sorted by norm, scale (descending), epoch."""
    rows = [json.loads(line) for path in sorted(sweep_dir.rglob("metrics.jsonl")) for line in path.read_text().splitlines() if line]
    if not rows:
        raise FileNotFoundError(f"no metrics.jsonl under {sweep_dir}: is it a sweep directory?")
    return sorted(rows, key=lambda r: (r["norm"], -r["weight_scale"], r["world_size"], r["epoch"]))


def write_summary(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_weight_scale_sweep(rows: list[dict], path: Path) -> Path:
    """One panel per weight scale (largest first), training accuracy against epoch, one line per norm."""
    curves: dict[float, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        curves[row["weight_scale"]][row["norm"]].append((row["epoch"], row["train_acc"]))
    scales = sorted(curves, reverse=True)
    columns = min(4, len(scales))
    grid_rows = math.ceil(len(scales) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(3 * columns, 2.6 * grid_rows), squeeze=False, sharey=True)
    diverged = {(row["weight_scale"], row["norm"]): row["epoch"] for row in rows if row.get("diverged")}
    for ax, scale in zip(axes.flat, scales):
        for norm, points in sorted(curves[scale].items()):
            epochs, accuracy = zip(*sorted(points))
            (line,) = ax.plot(epochs, accuracy, LINE_STYLES.get(norm, "-"), label=LABELS.get(norm, norm))
            if (scale, norm) in diverged:
                ax.plot(epochs[-1], accuracy[-1], "x", color=line.get_color(), markersize=8)
                ax.annotate(f"{norm}: loss not finite at epoch {epochs[-1]}, stopped", (0.97, 0.9), xycoords="axes fraction",
                            ha="right", fontsize=7, color=line.get_color())
        ax.set_title(f"weight scale {scale:.3g}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(scales):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("train accuracy")
    world_sizes = sorted({row["world_size"] for row in rows})
    fig.suptitle(f"MNIST, 5x100 MLP: training accuracy per weight-init scale (world size {', '.join(map(str, world_sizes))})")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def final_accuracy_table(rows: list[dict]) -> str:
    """Markdown: final training accuracy per scale, one column per norm."""
    last: dict[tuple[float, str], dict] = {}
    for row in rows:
        key = (row["weight_scale"], row["norm"])
        if key not in last or row["epoch"] > last[key]["epoch"]:
            last[key] = row
    norms = sorted({norm for _, norm in last})
    lines = ["| weight scale | " + " | ".join(LABELS.get(n, n) for n in norms) + " |", "|---" * (len(norms) + 1) + "|"]
    def cell(row: dict | None) -> str:
        if row is None:
            return ""
        return f"diverged (epoch {row['epoch']})" if row.get("diverged") else f"{row['train_acc']:.3f}"

    for scale in sorted({scale for scale, _ in last}, reverse=True):
        cells = [cell(last.get((scale, n))) for n in norms]
        lines.append(f"| {scale:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(sweep_dir: Path) -> list[dict]:
    """Write ``summary.csv`` and ``weight_scale_sweep.png`` into ``sweep_dir``; returns the rows."""
    rows = read_metrics(sweep_dir)
    for path in (write_summary(rows, sweep_dir / "summary.csv"), plot_weight_scale_sweep(rows, sweep_dir / "weight_scale_sweep.png")):
        print(f"wrote {path}")
    return rows


class SweepSummary(Callback):
    """Hydra callback: summarize the sweep directory when the multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        summarize(Path(config.hydra.sweep.dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="syncbn.plot", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (multirun/...) holding runs' metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        print(final_accuracy_table(summarize(args.sweep_dir)))
    except FileNotFoundError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
