"""The per-device batch-size study: synchronized BN, per-rank BN, LayerNorm, GroupNorm and no norm
as a fixed global batch is split over more and more devices; its CSV, figure and table.

    python -m syncbn.train +experiment=batch_size_study              # 180 rows from 4 fused jobs
    python -m syncbn.train -m +experiment=batch_size_study_per_run   # the reference: 180 runs
    python -m syncbn.experiments.batch_size DIR                      # redraw batch_study.csv/png, print the table
    python -m syncbn.study DIR                                       # the same (its first name)

How each per-device batch is executed (real ranks, slices of per-rank BN, one process) is
``study_plan.py``'s; every job or run directory says so in its ``study.json``. The study's
directory gets ``batch_study.csv`` and ``batch_study.png`` when it ends.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from syncbn.experiments import bn_span
from syncbn.experiments.study_plan import LAYOUT_FILE
from syncbn.experiments.summary import LABELS, LINE_STYLES, Summary, SummaryCallback, plt, save_figure

TARGET_TRAIN_ACC = 0.9
COLUMNS = [
    "norm", "model", "per_device_batch", "world_size", "group_size", "bn_span", "seed", "execution", "final_train_acc",
    "final_test_acc", "final_precise_test_acc", "final_batch_test_acc", "final_train_loss", "diverged", "epochs",
    "epochs_to_90pct_train_acc", "seconds",
]
NORM_ORDER = ["syncbn", "bn", "layernorm", "groupnorm", "none"]
STUDY_LABELS = {**LABELS, "none": "no normalization"}
MIN_ACCURACY_SPAN = 0.1


def epochs_to_reach(records: list[dict], accuracy: float = TARGET_TRAIN_ACC) -> int | None:
    """The first epoch whose training accuracy is at least ``accuracy``; None if none is."""
    return next((r["epoch"] for r in records if r["train_acc"] >= accuracy), None)


def _is_member(record: dict, member: dict | None) -> bool:
    """``record`` is the member's (a per-run study run's records are all its one member's): its
    names, and no slice or group the member does not have."""
    return member is None or all(record.get(key) == member.get(key) for key in {*member, "bn_slice", "bn_group"})


def run_rows(run_dir: Path) -> list[dict] | None:
    """The CSV rows of a study run or fused job: each its layout and its member's final epoch;
    None while any of them is unfinished. ``seconds`` is the member's share of the run's time."""
    layout = json.loads((run_dir / LAYOUT_FILE).read_text())
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    specs = layout.get("rows", [layout])
    members = {json.dumps(spec.get("member")) for spec in specs}
    seconds = sum({r["epoch"]: r["seconds"] for r in records}.values()) / len(members)
    rows = []
    for spec in specs:
        own = [r for r in records if _is_member(r, spec.get("member"))]
        if not own or not (own[-1]["epoch"] == layout["epochs"] or own[-1]["diverged"]):
            return None
        last = own[-1]
        row = {key: value for key, value in spec.items() if key != "member"}
        rows.append(dict(
            row, epochs=last["epoch"], final_train_acc=last["train_acc"], final_test_acc=last["test_acc"],
            final_precise_test_acc=last.get("precise_test_acc"), final_batch_test_acc=last.get("batch_test_acc"),
            final_train_loss=last["train_loss"], diverged=last["diverged"],
            epochs_to_90pct_train_acc=epochs_to_reach(own), seconds=round(seconds, 2),
        ))
    return rows


def _norm_key(norm: str) -> int:
    return NORM_ORDER.index(norm) if norm in NORM_ORDER else len(NORM_ORDER)


def _model_key(model: str) -> tuple:
    return model != "mlp", model


def _order(row: dict) -> tuple:
    return (_model_key(row["model"]), _norm_key(row["norm"]), -row["per_device_batch"], row.get("group_size") or 0,
            row["seed"])


def read_study(sweep_dir: Path) -> list[dict]:
    """The rows of every finished run or job under ``sweep_dir``; unfinished ones are reported and skipped."""
    rows, unfinished = [], []
    for layout_path in sorted(sweep_dir.rglob(LAYOUT_FILE)):
        found = run_rows(layout_path.parent)
        if found is None:
            unfinished.append(layout_path.parent.name)
        else:
            rows += found
    if unfinished:
        print(f"syncbn.experiments.batch_size: skipped {len(unfinished)} unfinished runs: {', '.join(unfinished)}", file=sys.stderr)
    if not rows:
        raise FileNotFoundError(f"no finished study run (a {LAYOUT_FILE} and its metrics.jsonl) under {sweep_dir}")
    return sorted(rows, key=_order)


def in_groups(row: dict) -> bool:
    """A row of synchronized BN in BN groups smaller than the world."""
    return row["norm"] == "syncbn" and row.get("group_size") not in (None, "", row.get("world_size"))


def accuracies_by_batch(rows: list[dict]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """model -> norm -> per-device batch -> the final test accuracies of its seeds (BN groups apart)."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        if not in_groups(row):
            table[row["model"]][row["norm"]][row["per_device_batch"]].append(row["final_test_acc"])
    return table


def _emulated_batches(rows: list[dict], model: str) -> list[int]:
    return sorted({r["per_device_batch"] for r in rows if r["model"] == model and r["execution"] != "real"})


# pragma: no mutate start (drawing: the figure's file is checked end to end, not its pixels)
def _dodge(batch: int, index: int, count: int) -> float:
    """``batch`` shifted a little along the log2 axis, so that the norms' error bars stand apart."""
    return batch * 2 ** (0.06 * (index - (count - 1) / 2))


def plot_batch_study(rows: list[dict], path: Path) -> Path:
    """Final test accuracy (mean over seeds, bar from the lowest to the highest seed) against the
    per-device batch on a log2 axis: one line per norm, one panel per model. Where the study has
    them, a row against the BN span (``bn_span.draw_spans``) and a row of per-rank BN evaluated
    three ways (``bn_span.draw_evaluations``)."""
    table = accuracies_by_batch(rows)
    models = sorted(table, key=_model_key)
    extra = [draw for draw, present in (
        (bn_span.draw_spans, any(bn_span.has_groups(rows, m) for m in models)),
        (bn_span.draw_evaluations, any(len(bn_span.evaluations(rows, m, "bn")) > 2 for m in models))) if present]
    fig, axes = plt.subplots(1 + len(extra), len(models), figsize=(5.6 * len(models), 4.4 * (1 + len(extra))),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        _draw_batches(ax, rows, table, model)
    for row_axes, draw in zip(axes[1:], extra):
        for ax, model in zip(row_axes, models):
            draw(ax, rows, model)
    seeds = len({r["seed"] for r in rows})
    spread = f"mean and range over {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(f"MNIST (mnist5k): final test accuracy against per-device batch, {spread}")
    return save_figure(fig, path)


def _draw_batches(ax, rows: list[dict], table: dict, model: str) -> None:
    global_batch = max(r["per_device_batch"] * r["world_size"] for r in rows)
    norms = sorted(table[model], key=_norm_key)
    for index, norm in enumerate(norms):
        batches = sorted(table[model][norm])
        accuracies = [table[model][norm][b] for b in batches]
        means = [statistics.mean(a) for a in accuracies]
        ax.errorbar([_dodge(b, index, len(norms)) for b in batches], means,
                    yerr=[[m - min(a) for m, a in zip(means, accuracies)], [max(a) - m for m, a in zip(means, accuracies)]],
                    fmt=LINE_STYLES.get(norm, "-"), marker="o", markersize=4, capsize=2, label=STUDY_LABELS.get(norm, norm))
    batches = sorted({b for per_norm in table[model].values() for b in per_norm})
    emulated = _emulated_batches(rows, model)
    if emulated:
        ax.axvspan(batches[0] / 1.3, max(emulated) * 1.41, color="0.5", alpha=0.08, lw=0)
        ax.text(batches[0] / 1.25, 0.02, "one process emulates the W ranks", transform=ax.get_xaxis_transform(),
                fontsize=7, color="0.35")
    low, high = ax.get_ylim()
    if high - low < MIN_ACCURACY_SPAN:  # a few samples' difference should not fill the panel
        ax.set_ylim(min(high - MIN_ACCURACY_SPAN, low), max(high, min(1.0, low + MIN_ACCURACY_SPAN)))
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [f"{b}\nW={global_batch // b}" for b in batches])
    ax.minorticks_off()
    ax.set_xlim(batches[0] / 1.3, batches[-1] * 1.3)
    ax.set_title(model.upper(), fontsize=10)
    ax.set_xlabel(f"per-device batch (world size W at global batch {global_batch})")
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
# pragma: no mutate end


def accuracy_table(rows: list[dict]) -> str:
    """Markdown: mean final test accuracy (lowest-highest seed) per model and norm, one column per per-device batch."""
    table = accuracies_by_batch(rows)
    batches = sorted({r["per_device_batch"] for r in rows}, reverse=True)
    lines = ["| model | norm | " + " | ".join(f"b={b}" for b in batches) + " |", "|---" * (len(batches) + 2) + "|"]
    for model in sorted(table, key=_model_key):
        for norm in sorted(table[model], key=_norm_key):
            cells = []
            for b in batches:
                accuracies = table[model][norm].get(b)
                cells.append(f"{statistics.mean(accuracies):.3f} ({min(accuracies):.3f}-{max(accuracies):.3f})" if accuracies else "")
            lines.append(f"| {model} | {STUDY_LABELS.get(norm, norm)} | " + " | ".join(cells) + " |")
    return "\n\n".join(part for part in ("\n".join(lines), bn_span.span_table(rows), bn_span.evaluation_table(rows)) if part)


SUMMARY = Summary(read_study, "batch_study.csv", COLUMNS, "batch_study.png", plot_batch_study, accuracy_table)


def summarize(sweep_dir: Path) -> list[dict]:
    """Write ``batch_study.csv`` and ``batch_study.png`` into ``sweep_dir``; returns the rows."""
    return SUMMARY.write(sweep_dir)


class BatchStudySummary(SummaryCallback):
    """Hydra callback of the study: its summary when the last run ends."""

    summary = SUMMARY


def main(argv: list[str] | None = None, prog: str = "syncbn.experiments.batch_size") -> None:
    SUMMARY.command(prog, "Redraw a batch-size study's batch_study.csv and batch_study.png.",
                    "the study's sweep directory (multirun/batch_size_study/...)", argv)


if __name__ == "__main__":
    main()
