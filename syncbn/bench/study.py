"""The benchmark's study case: the batch-size study's fused command against its per-run command.

Both on the same reduced study (by default every model, norm and per-device batch, one seed, 2
epochs), whole commands with start-up: ``+experiment=batch_size_study`` (a few fused jobs) and
``-m +experiment=batch_size_study_per_run`` (one job per row), then the fused command again; the
fused figure is the mean of its two runs, which bracket the per-run one.
"""

from __future__ import annotations

import sys
import tempfile

from syncbn.bench.settings import Settings
from syncbn.bench.sweep import timed


def _listed(values: list) -> str:
    return f"[{','.join(map(str, values))}]"


def study_commands(settings: Settings, out_dir: str) -> tuple[list[str], list[str]]:
    """The fused and the per-run command of ``settings``' reduced study, writing under ``out_dir``."""
    common = ["seed=0", f"train.epochs={settings.study_epochs}"]
    fused = [sys.executable, "-m", "syncbn.train", "+experiment=batch_size_study",
             f"study.models={_listed(settings.study_models)}", f"study.norms={_listed(settings.study_norms)}",
             f"study.per_device_batches={_listed(settings.study_batches)}", "study.seeds=[0]", *common,
             f"hydra.run.dir={out_dir}/fused"]
    per_run = [sys.executable, "-m", "syncbn.train", "-m", "+experiment=batch_size_study_per_run",
               f"model={','.join(settings.study_models)}", f"norm={','.join(settings.study_norms)}",
               f"study.per_device_batch={','.join(map(str, settings.study_batches))}", *common,
               f"hydra.sweep.dir={out_dir}/per-run"]
    return fused, per_run


def bench_study(settings: Settings) -> dict:
    """Wall time of the fused command (twice: before and after) and the per-run command (once)."""
    with tempfile.TemporaryDirectory() as out_dir:
        fused, per_run = study_commands(settings, out_dir)
        before, per_run_seconds = timed(fused), timed(per_run)
    with tempfile.TemporaryDirectory() as out_dir:
        after = timed(study_commands(settings, out_dir)[0])
    rows = len(settings.study_models) * len(settings.study_norms) * len(settings.study_batches)
    return dict(case="study", seconds=(before + after) / 2, each_seconds=[before, after],
                per_run_seconds=per_run_seconds, rows=rows, epochs=settings.study_epochs)


def study_cases(settings: Settings) -> list[dict]:
    """The study case, unless ``--study-models`` named none."""
    return [bench_study(settings)] if settings.study_models else []
