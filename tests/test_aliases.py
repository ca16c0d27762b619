"""``syncbn.plot`` and ``syncbn.study``, the experiments' first names, kept for the scripts and
Hydra configs that use them: the same commands and callbacks under the old names."""

import subprocess
import sys

import pytest
from hydra.utils import get_class

from app import ROOT
from syncbn.experiments import batch_size, weight_scale

OLD_NAMES = [("plot", weight_scale, "SweepSummary", "no metrics.jsonl under"),
             ("study", batch_size, "BatchStudySummary", "no finished study run (a study.json and its metrics.jsonl) under")]


@pytest.mark.parametrize("old,new,callback,refusal", OLD_NAMES, ids=["plot", "study"])
def test_the_old_command_runs_the_experiments_command_under_its_old_name(old, new, callback, refusal, tmp_path):
    result = subprocess.run([sys.executable, "-m", f"syncbn.{old}", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"syncbn.{old}: error: {refusal} {tmp_path}")


@pytest.mark.parametrize("old,new,callback,refusal", OLD_NAMES, ids=["plot", "study"])
def test_an_old_hydra_target_is_the_experiments_callback(old, new, callback, refusal):
    assert get_class(f"syncbn.{old}.{callback}") is getattr(new, callback)
