"""Sweep summaries: ``summary.csv`` and the book's 4x4 weight-scale figure from the runs' metrics.

    python -m syncbn.experiments.weight_scale SWEEP_DIR   # redraw from every SWEEP_DIR/**/metrics.jsonl
    python -m syncbn.plot SWEEP_DIR                       # the same (its first name)

The fused sweep (``+experiment=weight_scale_sweep``, one job) calls the same code when it ends; the
per-run sweep (``-m +experiment=weight_scale_sweep_per_run``) when its last run ends (the
``SweepSummary`` Hydra callback). With several seeds each line is the mean over seeds and the band
their range.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from syncbn.experiments.summary import LABELS, LINE_STYLES, Summary, SummaryCallback, plt, save_figure

SUMMARY_COLUMNS = ["norm", "weight_scale", "seed", "world_size", "epoch", "train_acc", "test_acc", "train_loss", "diverged", "seconds"]


def read_metrics(sweep_dir: Path) -> list[dict]:
    """Every epoch record of every run under ``sweep_dir``, sorted by norm, scale (descending), seed, epoch."""
    rows = [json.loads(line) for path in sorted(sweep_dir.rglob("metrics.jsonl")) for line in path.read_text().splitlines() if line]
    if not rows:
        raise FileNotFoundError(f"no metrics.jsonl under {sweep_dir}: is it a sweep directory?")
    return sorted(rows, key=lambda r: (r["norm"], -r["weight_scale"], r["seed"], r["world_size"], r["epoch"]))


def _by_member(rows: list[dict]) -> dict[tuple[float, str], dict[int, list[dict]]]:
    """(scale, norm) -> seed -> that network's records, by epoch."""
    members: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        members[row["weight_scale"], row["norm"]][row["seed"]].append(row)
    return members


def _curve(seeds: dict[int, list[dict]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs, and the mean, lowest and highest training accuracy over the seeds that reached each."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for records in seeds.values():
        for record in records:
            by_epoch[record["epoch"]].append(record["train_acc"])
    epochs = sorted(by_epoch)
    return (epochs, [statistics.mean(by_epoch[e]) for e in epochs], [min(by_epoch[e]) for e in epochs],
            [max(by_epoch[e]) for e in epochs])


def _epochs(epochs: list[int]) -> str:
    distinct = sorted(set(epochs))
    return f"epoch{'s' if len(distinct) > 1 else ''} {', '.join(map(str, distinct))}"


def _divergence_note(norm: str, seeds: dict[int, list[dict]]) -> str | None:
    epochs = [records[-1]["epoch"] for records in seeds.values() if records[-1]["diverged"]]
    if not epochs:
        return None
    if len(seeds) == 1:
        return f"{norm}: loss not finite at epoch {epochs[0]}, stopped"
    return f"{norm}: {len(epochs)} of {len(seeds)} seeds diverged ({_epochs(epochs)})"


# pragma: no mutate start (drawing: the figure's file is checked end to end, not its pixels)
def plot_weight_scale_sweep(rows: list[dict], path: Path) -> Path:
    """One panel per weight scale (largest first), training accuracy against epoch, one line per
    norm: the mean over seeds, their range as a band, an x where a seed's loss stopped being finite."""
    members = _by_member(rows)
    scales = sorted({scale for scale, _ in members}, reverse=True)
    columns = min(4, len(scales))
    grid_rows = math.ceil(len(scales) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(3 * columns, 2.6 * grid_rows), squeeze=False, sharey=True)
    for ax, scale in zip(axes.flat, scales):
        notes = 0
        for norm in sorted(norm for s, norm in members if s == scale):
            seeds = members[scale, norm]
            epochs, mean, low, high = _curve(seeds)
            (line,) = ax.plot(epochs, mean, LINE_STYLES.get(norm, "-"), label=LABELS.get(norm, norm))
            if len(seeds) > 1:
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, lw=0)
            for records in seeds.values():
                if records[-1]["diverged"]:
                    ax.plot(records[-1]["epoch"], records[-1]["train_acc"], "x", color=line.get_color(), markersize=8)
            note = _divergence_note(norm, seeds)
            if note:
                ax.annotate(note, (0.97, 0.9 - 0.1 * notes), xycoords="axes fraction", ha="right", fontsize=7,
                            color=line.get_color())
                notes += 1
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
    seeds = sorted({row["seed"] for row in rows})
    spread = f", mean and range over {len(seeds)} seeds" if len(seeds) > 1 else ""
    fig.suptitle(f"MNIST, 5x100 MLP: training accuracy per weight-init scale{spread} "
                 f"(world size {', '.join(map(str, world_sizes))})")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)
# pragma: no mutate end


def _final_cell(seeds: dict[int, list[dict]] | None) -> str:
    if not seeds:
        return ""
    finals = [records[-1] for records in seeds.values()]
    trained = [r["train_acc"] for r in finals if not r["diverged"]]
    diverged = [r["epoch"] for r in finals if r["diverged"]]
    if not trained:
        return f"diverged ({_epochs(diverged)})"
    cell = f"{statistics.mean(trained):.3f}"
    if len(trained) > 1:
        cell += f" ({min(trained):.3f}-{max(trained):.3f})"
    if diverged:
        cell += f", {len(diverged)} of {len(finals)} diverged"
    return cell


def final_accuracy_table(rows: list[dict]) -> str:
    """Markdown: final training accuracy per scale, one column per norm; with several seeds the mean
    over seeds (lowest-highest)."""
    members = _by_member(rows)
    norms = sorted({norm for _, norm in members})
    lines = ["| weight scale | " + " | ".join(LABELS.get(n, n) for n in norms) + " |", "|---" * (len(norms) + 1) + "|"]
    for scale in sorted({scale for scale, _ in members}, reverse=True):
        cells = [_final_cell(members.get((scale, n))) for n in norms]
        lines.append(f"| {scale:.4g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SUMMARY = Summary(read_metrics, "summary.csv", SUMMARY_COLUMNS, "weight_scale_sweep.png", plot_weight_scale_sweep,
                  final_accuracy_table)


def summarize(sweep_dir: Path) -> list[dict]:
    """Write ``summary.csv`` and ``weight_scale_sweep.png`` into ``sweep_dir``; returns the rows."""
    return SUMMARY.write(sweep_dir)


class SweepSummary(SummaryCallback):
    """Hydra callback of the per-run sweep: its summary when the last run ends."""

    summary = SUMMARY


def main(argv: list[str] | None = None, prog: str = "syncbn.experiments.weight_scale") -> None:
    SUMMARY.command(prog, __doc__.splitlines()[0], "a sweep directory (multirun/...) holding runs' metrics.jsonl", argv)


if __name__ == "__main__":
    main()
