"""``train.precision``: bf16 and fp16 autocast over float32 weights, the layer's statistics still
float32 and synchronized; bf16 training follows float32 within bf16's margin; an fp16 run resumes
its loss scale exactly; the weight-scale sweep's verdict is the same in bf16."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
from app import read_metrics, run, strip

from syncbn import SyncBatchNorm

SMALL = ["train.epochs=3", "data.train_size=1000"]


def bf16_layer_on_rank(batches: list[torch.Tensor]) -> dict:
    """A Linear then the layer, trained under bf16 autocast on this rank's batch."""
    torch.manual_seed(0)
    linear, norm = torch.nn.Linear(6, 4), SyncBatchNorm(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = linear(batches[dist.get_rank()])
        out = norm(hidden)
    out.float().sum().backward()
    return dict(hidden=hidden.detach(), out_dtype=out.dtype, running_mean=norm.running_mean,
                running_var=norm.running_var, weight_grad=norm.weight.grad)


def test_under_bf16_autocast_the_layer_synchronizes_float32_statistics_of_the_bf16_activations(gloo_group):
    batches = [torch.randn(5, 6), torch.randn(3, 6)]
    ranks = gloo_group(2).run(bf16_layer_on_rank, batches)
    hidden = torch.cat([r["hidden"] for r in ranks])
    assert hidden.dtype == torch.bfloat16 and ranks[0]["out_dtype"] == torch.bfloat16
    values = hidden.double()
    # The margin: each rank's moments are float32 (then merged in float64), so float32's rounding.
    expected_mean = 0.1 * values.mean(0)
    expected_var = 0.9 + 0.1 * values.var(0, unbiased=True)
    for r in ranks:
        assert r["running_mean"].dtype == r["running_var"].dtype == torch.float32
        torch.testing.assert_close(r["running_mean"].double(), expected_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r["running_var"].double(), expected_var, rtol=1e-6, atol=1e-7)
        assert r["weight_grad"].dtype == torch.float32, "the float32 weight's gradient is float32"


def trained(tmp_path, name: str, *overrides: str) -> list[dict]:
    run([sys.executable, "-m", "syncbn.train", *SMALL, *overrides, f"hydra.run.dir={tmp_path / name}"])
    return read_metrics(tmp_path / name)


def test_bf16_training_follows_float32_within_bf16s_margin(tmp_path):
    """Margins: the loss within 0.1 % and accuracies within 0.005 (5 of 1000 samples) over 3 epochs
    (measured here: 6e-5 and 0.002); the networks are the same, only the arithmetic is rounded to bf16's
    8 significant bits."""
    full, mixed = trained(tmp_path, "fp32"), trained(tmp_path, "bf16", "train.precision=bf16")
    assert [r["epoch"] for r in mixed] == [1, 2, 3]
    for a, b in zip(full, mixed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert abs(a["train_acc"] - b["train_acc"]) <= 0.005 and abs(a["test_acc"] - b["test_acc"]) <= 0.005
    assert any(a["train_loss"] != b["train_loss"] for a, b in zip(full, mixed)), "bf16 changed nothing: not applied?"


def test_an_fp16_run_restarted_after_a_kill_resumes_its_loss_scale_and_ends_exactly(tmp_path):
    """Rank 1 SIGKILLed at step 15 of 30; restarted from the step-10 checkpoint, the run ends with the
    uninterrupted run's metrics and its gradient scaler's state (the scale and the count of steps
    since it last changed)."""
    common = [*SMALL, "dist.nproc=2", "train.precision=fp16"]
    reference = trained(tmp_path, "uninterrupted", *common)
    resumed = trained(tmp_path, "restarted", *common, "dist.max_restarts=1", "fault.kill_rank=1",
                      "fault.kill_at_step=15")
    assert "resumed from" in (tmp_path / "restarted" / "train.log").read_text()
    assert strip(resumed) == strip(reference)
    scalers = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["scaler"]
               for name in ("uninterrupted", "restarted")]
    assert scalers[0] == scalers[1] and scalers[0]["_growth_tracker"] == 30


@pytest.mark.large
def test_the_weight_scale_sweeps_verdict_is_the_same_in_bf16(tmp_path):
    """``pytest -m large tests/training/test_precision.py``: the book's sweep (16 scales x {BN, none},
    20 epochs) in float32 and in bf16. For every network: whether it learned (final training
    accuracy over 0.2: the untrained ones sit at 0.116, one class) and whether it overflowed."""
    sweep = ["+experiment=weight_scale_sweep", "train.epochs=20"]
    verdicts = []
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16")):
        run([sys.executable, "-m", "syncbn.train", *sweep, f"train.precision={precision}",
             f"hydra.run.dir={tmp_path / name}"], timeout=600)
        last = {}
        for record in read_metrics(tmp_path / name):
            last[(record["norm"], record["weight_scale"])] = record
        verdicts.append({key: (r["diverged"], r["train_acc"] > 0.2) for key, r in last.items()})
    assert verdicts[0] == verdicts[1]
    assert all(learned for (norm, _), (_, learned) in verdicts[1].items() if norm == "syncbn")
