"""Experiment tracking beside ``metrics.jsonl``: ``logger=tensorboard`` writes TensorBoard event files
into the run directory's ``tensorboard/``, from rank 0 (``tensorboard --logdir outputs/``).

Each member's curves are tagged by its name (norm, slice, weight scale, seed), one point per epoch,
and whether it diverged (1 at the epoch it did, where its loss, no longer finite, is left out); the
epoch's wall time once per epoch; the config as text. A resumed run hides what its killed
attempt wrote past the checkpoint it resumes from (TensorBoard's purge), so every epoch shows once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

from syncbn.distributed import DistContext
from syncbn.errors import ConfigError
from syncbn.training.config import Config, LoggerConfig
from syncbn.training.records import EVALUATIONS

CURVES = ("train_loss", "train_acc", "test_acc")


def check(config: LoggerConfig) -> None:
    """Refuse ``logger=tensorboard`` where its package is missing, before the run starts."""
    if config.name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'")


def member_tag(record: dict) -> str:
    """A member's name as a TensorBoard tag prefix: ``bn_slice_4_scale_0.1_seed_0``,
    ``syncbn_slice_4_group_2_scale_0.1_seed_0``."""
    slice_ = f"_slice_{record['bn_slice']}" if record.get("bn_slice") is not None else ""
    group = f"_group_{record['bn_group']}" if record.get("bn_group") is not None else ""
    return f"{record['norm']}{slice_}{group}_scale_{record['weight_scale']:.3g}_seed_{record['seed']}"


class TensorBoardLog:
    """The event files of one run directory; ``first_epoch`` > 1 when resuming."""

    def __init__(self, directory: Path, config: Config, first_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory), purge_step=first_epoch if first_epoch > 1 else None)
        if first_epoch == 1:
            yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
            self.writer.add_text("config", f"```yaml\n{yaml}```")
            self.writer.flush()

    def append(self, records: list[dict]) -> None:
        for record in records:
            for curve in (*CURVES, *(name for name in EVALUATIONS if name in record)):
                if record[curve] is not None:  # a diverged member's loss: none to plot, its accuracies still
                    self.writer.add_scalar(f"{member_tag(record)}/{curve}", record[curve], record["epoch"])
            self.writer.add_scalar(f"{member_tag(record)}/diverged", float(record["diverged"]), record["epoch"])
        if records:
            self.writer.add_scalar("time/epoch_seconds", records[0]["seconds"], records[0]["epoch"])
        self.writer.flush()  # ranks leave by os._exit: nothing is left to a writer thread at exit


def open_logs(run_dir: Path | None, ctx: DistContext, config: Config, first_epoch: int) -> list[TensorBoardLog]:
    """The trackers ``config.logger`` asks for, on rank 0 of a run with a directory."""
    if run_dir is None or not ctx.is_main or config.logger.name == "none":
        return []
    return [TensorBoardLog(run_dir / "tensorboard", config, first_epoch)]
