"""What each epoch leaves behind: its records in ``metrics.jsonl`` and a line in the log, from rank 0."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from syncbn.distributed import DistContext

log = logging.getLogger(__name__)


class MetricsLog:
    """``metrics.jsonl`` in the run directory: one JSON object per epoch, written by rank 0 only."""

    def __init__(self, run_dir: Path | None, ctx: DistContext, history: list[dict]):
        self.path = run_dir / "metrics.jsonl" if run_dir is not None and ctx.is_main else None
        if self.path is not None:
            self.path.write_text("".join(json.dumps(record) + "\n" for record in history))

    def append(self, records: list[dict]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))


EVALUATIONS = ("batch_test_acc", "precise_train_acc", "precise_test_acc")  # where train.* asks for them


def _name(record: dict) -> str:
    """A member as its records name it: norm (slice size, group), weight scale, seed."""
    slice_ = f" slice {record['bn_slice']}" if "bn_slice" in record else ""
    group = f" group {record['bn_group']}" if "bn_group" in record else ""
    return f"{record['norm']}{slice_}{group} scale {record['weight_scale']:.3g} seed {record['seed']}"


def epoch_summary(records: list[dict], epochs: int) -> str:
    """One line for an epoch of many members: accuracy ranges, and who diverged."""
    training = [r for r in records if not r["diverged"]]
    line = f"epoch {records[0]['epoch']}/{epochs}  {len(records)} networks"
    for key in ("train_acc", "test_acc"):
        values = sorted(r[key] for r in training)
        if values:
            line += f"  {key} {values[0]:.3f}-{values[-1]:.3f} (median {values[len(values) // 2]:.3f})"
    diverged = [_name(r) for r in records if r["diverged"]]
    if diverged:
        line += f"  diverged, frozen: {', '.join(diverged)}"
    return line + f"  ({records[0]['seconds']:.2f}s)"


def log_epoch(records: list[dict], epochs: int, members: int) -> None:
    """The epoch's line: a summary of a job of many members, or the single run's metrics."""
    if members > 1:
        log.info(epoch_summary(records, epochs))
    elif records[0]["diverged"]:
        log.warning("epoch %d: the training loss is not finite; the run diverged and stops here", records[0]["epoch"])
    else:
        record = records[0]
        others = "".join(f"  {name} {record[name]:.4f}" for name in EVALUATIONS if name in record)
        log.info("epoch %d/%d  train_acc %.4f  test_acc %.4f%s  train_loss %.4f  (%.2fs)", record["epoch"], epochs,
                 record["train_acc"], record["test_acc"], others, record["train_loss"], record["seconds"])
