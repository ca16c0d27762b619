"""The batch-size study read two more ways: accuracy against the BN span (the samples each BatchNorm
statistic is taken over: b for per-rank BN, b x k for BN groups of k devices of b samples, the global
batch for synchronized BN), and each BatchNorm evaluated three ways (the running statistics,
PreciseBN's population statistics, each test batch's own statistics) beside its training accuracy.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from syncbn.experiments.summary import plt

EVALUATIONS = {  # column -> its label
    "final_train_acc": "training set, running statistics",
    "final_test_acc": "test, running statistics",
    "final_precise_test_acc": "test, PreciseBN statistics",
    "final_batch_test_acc": "test, batch statistics",
}
BATCH_NORMS = ("syncbn", "bn")


def _band(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def span_curves(rows: list[dict], model: str) -> dict[int, dict[int, list[float]]]:
    """Per-device batch b -> BN span -> the final test accuracies of its seeds: per-rank BN (span b),
    each BN group, synchronized BN (the global batch); one value per seed (at W = 1 per-rank and
    synchronized BN are one member)."""
    by_seed: dict = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["model"] == model and row["norm"] in BATCH_NORMS and row.get("bn_span") not in (None, ""):
            by_seed[row["per_device_batch"]][int(row["bn_span"])][row["seed"]] = row["final_test_acc"]
    return {b: {s: list(seeds.values()) for s, seeds in spans.items()} for b, spans in by_seed.items()}


def evaluations(rows: list[dict], model: str, norm: str) -> dict[str, dict[int, list[float]]]:
    """Column of ``EVALUATIONS`` -> per-device batch -> its seeds' values, for ``norm`` (BN groups apart)."""
    found: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["model"] != model or row["norm"] != norm or row.get("group_size") not in (None, "", 1, row.get("world_size")):
            continue
        for column in EVALUATIONS:
            if row.get(column) not in (None, ""):
                found[column][row["per_device_batch"]].append(float(row[column]))
    return found


def has_groups(rows: list[dict], model: str) -> bool:
    return any(len(spans) > 2 for spans in span_curves(rows, model).values())


# pragma: no mutate start (drawing: the figure's file is checked end to end, not its pixels)
def _curve(ax, values: dict[int, list[float]], **style) -> None:
    """Mean over seeds against the key, a bar from the lowest seed to the highest."""
    xs = sorted(values)
    means = [statistics.mean(values[x]) for x in xs]
    ax.errorbar(xs, means, yerr=[[m - min(values[x]) for m, x in zip(means, xs)],
                                 [max(values[x]) - m for m, x in zip(means, xs)]],
                marker="o", markersize=4, capsize=2, **style)


def _axes(ax, ticks: list[int], heading: str, xlabel: str, ylabel: str, **legend) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_title(heading, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", **legend)


def draw_spans(ax, rows: list[dict], model: str) -> None:
    """Test accuracy against the BN span, one line per per-device batch: if the span alone decides,
    the lines fall on one curve."""
    curves = span_curves(rows, model)
    for b in sorted(curves):
        _curve(ax, curves[b], label=f"b={b}")
    heading = (f"{model.upper()}: BN groups of k devices of b samples" if has_groups(rows, model) else
               f"{model.upper()}: per-rank BN and synchronized BN (no groups run)")
    _axes(ax, sorted({s for spans in curves.values() for s in spans}), heading,
          "BN span b x k (per-rank BN: k = 1; synchronized BN: the global batch)",
          "final test accuracy", title="per-device batch", title_fontsize=7)


def draw_evaluations(ax, rows: list[dict], model: str, norm: str = "bn") -> None:
    """Per-rank BN's training accuracy and its test accuracy evaluated three ways, against b."""
    found = evaluations(rows, model, norm)
    for column, label in EVALUATIONS.items():
        if column in found:
            _curve(ax, found[column], label=label, ls="--" if column == "final_train_acc" else "-")
    _axes(ax, sorted({b for values in found.values() for b in values}),
          f"{model.upper()}: per-rank BN evaluated three ways", "per-device batch b", "final accuracy")
# pragma: no mutate end


def span_table(rows: list[dict]) -> str:
    """Markdown: mean final test accuracy (lowest-highest seed) per model, per-device batch and BN span."""
    lines = ["| model | b | BN span: test accuracy, mean (seeds' range) |", "|---|---|---|"]
    for model in sorted({r["model"] for r in rows}):
        curves = span_curves(rows, model)
        if not has_groups(rows, model):
            continue
        for b in sorted(curves):
            cells = ", ".join(f"{s}: {_band(curves[b][s])}" for s in sorted(curves[b]))
            lines.append(f"| {model} | {b} | {cells} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def evaluation_table(rows: list[dict]) -> str:
    """Markdown: per model and BatchNorm, each evaluation's mean (range) per per-device batch."""
    lines = ["| model | norm | b | " + " | ".join(EVALUATIONS.values()) + " |", "|---" * (3 + len(EVALUATIONS)) + "|"]
    for model in sorted({r["model"] for r in rows}):
        for norm in BATCH_NORMS:
            found = evaluations(rows, model, norm)
            if len(found) <= 2:  # no PreciseBN or batch-statistics evaluation asked for
                continue
            for b in sorted({b for values in found.values() for b in values}, reverse=True):
                cells = [_band(found[c][b]) if found.get(c, {}).get(b) else "" for c in EVALUATIONS]
                lines.append(f"| {model} | {norm} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""
