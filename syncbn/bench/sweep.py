"""The benchmark's sweep case: whole commands, start-up included, against the plain loop.

The fused sweep (``+experiment=weight_scale_sweep``, one job) and the per-run sweep
(``-m +experiment=weight_scale_sweep_per_run``), each followed by the plain single-process loop over
the same networks and epochs (``python -m syncbn.bench --plain-sweep``).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from syncbn.training.config import ModelConfig, NormConfig
from syncbn.training.data import load_mnist5k
from syncbn.training.models import make_mlp
from syncbn.bench.settings import Settings


def _sweep_scales(count: int) -> list[float]:
    return [float(v) for v in np.logspace(0, -4, 16)[:: max(1, 16 // count)][:count]]


def plain_sweep(scales: int, epochs: int) -> None:
    """The baseline: one process, plain nn.BatchNorm1d / no norm, the same models and data, no DDP,
    one network after another, evaluated on the training and test digits every epoch."""
    train, test = load_mnist5k(1000, split_seed=0)
    images, labels = train.tensors
    for norm in ("bn", "none"):
        for scale in _sweep_scales(scales):
            torch.manual_seed(0)
            model = make_mlp(ModelConfig(weight_scale=scale), NormConfig(name=norm, eps=1e-6))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            for epoch in range(epochs):
                order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
                model.train()
                for batch in order.split(100):
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(model(images[batch]), labels[batch]).backward()
                    optimizer.step()
                model.eval()
                with torch.no_grad():
                    for dataset in (train, test):
                        (model(dataset.tensors[0]).argmax(1) == dataset.tensors[1]).double().mean().item()


def timed(command: list[str]) -> float:
    """Seconds ``command`` took; a failed one ends the benchmark with its last line of errors."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        sys.exit(f"python -m syncbn.bench: {' '.join(command[1:])} failed: {reason}")
    return time.perf_counter() - start


def sweep_commands(settings: Settings, mode: str, world_size: int, out_dir: str) -> list[str]:
    """The trainer's sweep command over ``settings``' networks and epochs: fused or per run."""
    scales = _sweep_scales(settings.sweep_scales)
    common = [f"train.epochs={settings.sweep_epochs}", f"dist.nproc={world_size}"]
    if mode == "fused":
        return [sys.executable, "-m", "syncbn.train", "+experiment=weight_scale_sweep",
                f"sweep.weight_scales=[{','.join(map(repr, scales))}]", *common, f"hydra.run.dir={out_dir}"]
    return [sys.executable, "-m", "syncbn.train", "-m", "+experiment=weight_scale_sweep_per_run",
            f"model.weight_scale={','.join(map(repr, scales))}", *common, f"hydra.sweep.dir={out_dir}"]


def bench_sweep(settings: Settings, mode: str, world_size: int, repeats: int) -> dict:
    """Wall time of a sweep command and of the plain loop's command (start-up included in both),
    interleaved ``repeats`` times; ``seconds`` and ``plain_seconds`` are the medians."""
    plain = [sys.executable, "-m", "syncbn.bench", "--plain-sweep", "--sweep-scales", str(settings.sweep_scales),
             "--sweep-epochs", str(settings.sweep_epochs)]
    seconds, plain_seconds = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out_dir:
            seconds.append(timed(sweep_commands(settings, mode, world_size, out_dir)))
        plain_seconds.append(timed(plain))
    return dict(case="sweep", mode=mode, world_size=world_size, seconds=statistics.median(seconds),
                plain_seconds=statistics.median(plain_seconds), each_seconds=seconds, each_plain_seconds=plain_seconds,
                networks=2 * settings.sweep_scales, epochs=settings.sweep_epochs)
