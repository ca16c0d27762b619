"""``syncbn.plot`` and ``syncbn.study``, the experiments' first names, kept for the scripts and
Hydra configs that use them: the same commands and callbacks under the old names."""

import runpy
import sys

import pytest
from hydra.utils import get_class

from syncbn.experiments import batch_size, weight_scale

OLD_NAMES = [("plot", weight_scale, "SweepSummary", "no metrics.jsonl under"),
             ("study", batch_size, "BatchStudySummary", "no finished study run (a study.json and its metrics.jsonl) under")]


@pytest.mark.parametrize("old,new,callback,refusal", OLD_NAMES, ids=["plot", "study"])
def test_the_old_command_runs_the_experiments_command_under_its_old_name(old, new, callback, refusal, tmp_path,
                                                                          monkeypatch, capsys):
    """``python -m syncbn.OLD DIR``, run as ``-m`` runs it (the module as ``__main__``), in this process."""
    monkeypatch.setattr(sys, "argv", [f"syncbn.{old}", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"syncbn.{old}", run_name="__main__", alter_sys=True)
    out, err = capsys.readouterr()
    assert (exit_.value.code, out) == (1, "")
    assert err.startswith(f"syncbn.{old}: error: {refusal} {tmp_path}")


@pytest.mark.parametrize("old,new,callback,refusal", OLD_NAMES, ids=["plot", "study"])
def test_an_old_hydra_target_is_the_experiments_callback(old, new, callback, refusal):
    assert get_class(f"syncbn.{old}.{callback}") is getattr(new, callback)
