"""The per-device batch-size study: synchronized BN, per-rank BN, LayerNorm, GroupNorm and no norm
as a fixed global batch is split over more and more devices.

    python -m syncbn.train -m +experiment=batch_size_study   # 180 runs; README gives the runtime
    python -m syncbn.experiments.batch_size SWEEP_DIR        # redraw batch_study.csv/png, print the table
    python -m syncbn.study SWEEP_DIR                          # the same (its first name)

At global batch B, a per-device batch b means a data-parallel world size W = B / b. ``plan`` decides
how each run of the sweep executes that layout:

- ``real``: W <= ``study.max_real_ranks``: W Gloo ranks of the CPU simulation, DDP as in production.
- ``ghost``: per-rank BatchNorm (``norm=bn``) at larger W: one process whose GhostBatchNorm gives
  each of the W slices of the batch its own statistics, as W ranks would (``tests/test_batchnorm.py``
  proves it equal to real ranks at W = 2 and 4: outputs every step, parameters, buffers).
- ``one-process``: every other norm at larger W, in one process on the global batch. Synchronized BN
  over W ranks is BatchNorm over the global batch (the SyncBatchNorm parity tests prove it to 1e-10),
  and LayerNorm, GroupNorm and no norm work per sample, so DDP's averaged gradient is the gradient
  of the global batch's mean loss.

Each run's directory gets ``study.json`` (its layout); when the sweep ends (the
``BatchStudySummary`` Hydra callback) the sweep directory gets ``batch_study.csv`` and
``batch_study.png``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from syncbn.distributed import launched
from syncbn.errors import ConfigError
from syncbn.experiments.summary import LABELS, LINE_STYLES, Summary, SummaryCallback, plt, save_figure
from syncbn.training.config import Config

LAYOUT_FILE = "study.json"
TARGET_TRAIN_ACC = 0.9
COLUMNS = [
    "norm", "model", "per_device_batch", "world_size", "seed", "execution", "final_train_acc", "final_test_acc",
    "final_train_loss", "diverged", "epochs", "epochs_to_90pct_train_acc", "seconds",
]
NORM_ORDER = ["syncbn", "bn", "layernorm", "groupnorm", "none"]
STUDY_LABELS = {**LABELS, "none": "no normalization"}
MIN_ACCURACY_SPAN = 0.1


@dataclass(frozen=True)
class Layout:
    """How one run of the study executes: W = ``world_size`` devices of ``per_device_batch`` each."""

    per_device_batch: int
    world_size: int
    execution: str  # real | ghost | one-process

    def apply(self, config: Config) -> Config:
        """``config`` with the processes and ghost slices that execute this layout."""
        return replace(
            config,
            dist=replace(config.dist, nproc=self.world_size if self.execution == "real" else 1),
            norm=replace(config.norm, ghost_slices=self.world_size if self.execution == "ghost" else None),
        )

    def save(self, config: Config, run_dir: Path) -> Path:
        path = run_dir / LAYOUT_FILE
        run = dict(norm=config.norm.name, model=config.model.name, seed=config.seed, epochs=config.train.epochs)
        path.write_text(json.dumps(dict(run, **asdict(self))) + "\n")
        return path


def _problems(config: Config) -> Iterator[str]:
    study, batch = config.study, config.train.global_batch_size
    if study.max_real_ranks < 1:  # a value of its own, in an ordinary run too
        yield f"study.max_real_ranks must be >= 1, got {study.max_real_ranks}"
    if study.per_device_batch is None:
        return
    if study.per_device_batch < 1 or batch % study.per_device_batch:
        yield f"study.per_device_batch={study.per_device_batch} must divide train.global_batch_size={batch}"
    if config.dist.nproc != 1 or launched():
        yield "study.per_device_batch sets the world size itself: leave dist.nproc at 1 and start it without torchrun"
    if config.norm.ghost_slices is not None:
        yield "study.per_device_batch sets norm.ghost_slices itself: leave it null"
    if config.data.train_size is None or config.data.train_size % batch:
        # A ragged end would leave the W real ranks uneven batches that GhostBatchNorm's W equal
        # slices cannot emulate.
        yield (f"the batch-size study needs data.train_size divisible by train.global_batch_size={batch}, "
               f"so that every step splits into equal per-device batches; got {config.data.train_size}")
    if config.norm.name == "bn" and config.model.name == "mlp" and study.per_device_batch == 1:
        yield "norm=bn with model=mlp normalizes over the per-device batch and needs 2 samples or more, got 1"


def plan(config: Config) -> Layout | None:
    """The layout of a study run, or None for an ordinary run (``study.per_device_batch`` null)."""
    problem = next(_problems(config), None)
    if problem is not None:
        raise ConfigError(problem)
    if config.study.per_device_batch is None:
        return None
    world_size = config.train.global_batch_size // config.study.per_device_batch
    if world_size <= config.study.max_real_ranks:
        execution = "real"
    elif config.norm.name == "bn":
        execution = "ghost"
    else:
        execution = "one-process"
    return Layout(config.study.per_device_batch, world_size, execution)


def epochs_to_reach(records: list[dict], accuracy: float = TARGET_TRAIN_ACC) -> int | None:
    """The first epoch whose training accuracy is at least ``accuracy``; None if none is."""
    return next((r["epoch"] for r in records if r["train_acc"] >= accuracy), None)


def run_row(run_dir: Path) -> dict | None:
    """One CSV row: a study run's layout and its final epoch; None while the run is unfinished."""
    layout = json.loads((run_dir / LAYOUT_FILE).read_text())
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    if not records or not (records[-1]["epoch"] == layout["epochs"] or records[-1]["diverged"]):
        return None
    last = records[-1]
    return dict(
        layout, final_train_acc=last["train_acc"], final_test_acc=last["test_acc"], final_train_loss=last["train_loss"],
        diverged=last["diverged"], epochs=last["epoch"], epochs_to_90pct_train_acc=epochs_to_reach(records),
        seconds=round(sum(r["seconds"] for r in records), 2),
    )


def _norm_key(norm: str) -> int:
    return NORM_ORDER.index(norm) if norm in NORM_ORDER else len(NORM_ORDER)


def _model_key(model: str) -> tuple:
    return model != "mlp", model


def _order(row: dict) -> tuple:
    return _model_key(row["model"]), _norm_key(row["norm"]), -row["per_device_batch"], row["seed"]


def read_study(sweep_dir: Path) -> list[dict]:
    """A row per finished run under ``sweep_dir``; unfinished runs are reported and skipped."""
    rows, unfinished = [], []
    for layout_path in sorted(sweep_dir.rglob(LAYOUT_FILE)):
        row = run_row(layout_path.parent)
        if row is None:
            unfinished.append(layout_path.parent.name)
        else:
            rows.append(row)
    if unfinished:
        print(f"syncbn.experiments.batch_size: skipped {len(unfinished)} unfinished runs: {', '.join(unfinished)}", file=sys.stderr)
    if not rows:
        raise FileNotFoundError(f"no finished study run (a {LAYOUT_FILE} and its metrics.jsonl) under {sweep_dir}")
    return sorted(rows, key=_order)


def accuracies_by_batch(rows: list[dict]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """model -> norm -> per-device batch -> the final test accuracies of its seeds."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
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
    per-device batch on a log2 axis: one line per norm, one panel per model."""
    table = accuracies_by_batch(rows)
    models = sorted(table, key=_model_key)
    global_batch = max(r["per_device_batch"] * r["world_size"] for r in rows)
    fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
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
    seeds = len({r["seed"] for r in rows})
    spread = f"mean and range over {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(f"MNIST (mnist5k): final test accuracy against per-device batch, {spread}")
    return save_figure(fig, path)
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
    return "\n".join(lines)


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
