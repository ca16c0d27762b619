"""The cost model's constants from the collective case's measurements: a least-squares fit.

Per collective, the median layer-step seconds at each measured (W, C) are fitted by its two calls'
``latency + (alpha + alpha_per_rank * W) * steps + beta * bytes``, ``steps`` and ``bytes`` from the
Gloo algorithm's formulas (``syncbn/cost.py``), in relative terms (each point's residual over its
own time, so 16 channels count as much as 4096), with every constant at least 0. The layer's own
work is in the times too: the fit puts it in the latency and the per-byte cost.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import numpy as np

from syncbn.cost import GLOO, Algorithm, CostModel, layer_payloads, steps_and_bytes

TERMS = ("latency", "alpha", "alpha_per_rank", "beta")


def _terms(algorithm: str, world_size: int, channels: int) -> list[float]:
    calls = steps = received = 0.0
    for payload in layer_payloads(channels):
        s, b = steps_and_bytes(algorithm, world_size, payload)
        calls, steps, received = calls + 1, steps + s, received + b
    return [calls, steps, steps * world_size, received]


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The least-squares solution with every term at least 0: the best over the subsets of terms
    whose unconstrained solution has none below 0 (4 terms: 15 subsets)."""
    best, best_residual = np.zeros(a.shape[1]), float(np.sum(b * b))
    for size in range(1, a.shape[1] + 1):
        for subset in itertools.combinations(range(a.shape[1]), size):
            solution, *_ = np.linalg.lstsq(a[:, subset], b, rcond=None)
            if (solution < 0).any():
                continue
            residual = float(np.sum((a[:, subset] @ solution - b) ** 2))
            if residual < best_residual:
                best, best_residual = np.zeros(a.shape[1]), residual
                best[list(subset)] = solution
    return best


def fit_collective(points: list[dict], collective: str, algorithm: str) -> Algorithm:
    """``algorithm``'s constants fitted to ``points``' medians of ``collective``."""
    rows = np.array([_terms(algorithm, p["world_size"], p["channels"]) for p in points])
    seconds = np.array([statistics.median(p["seconds"][collective]) for p in points])
    constants = _nonnegative_lstsq(rows / seconds[:, None], np.ones(len(points)))
    return Algorithm(algorithm, **dict(zip(TERMS, constants.tolist())))


def fit(points: list[dict]) -> CostModel:
    """A Gloo model fitted to the collective case's results: Gloo's algorithm for each collective."""
    return CostModel(all_gather=(fit_collective(points, "all_gather", GLOO.all_gather[0].name),),
                     all_reduce=(fit_collective(points, "all_reduce", GLOO.all_reduce[0].name),))


def collective_points(path: Path) -> list[dict]:
    """The collective case's results in a ``python -m syncbn.bench`` JSON file."""
    return [r for r in json.loads(Path(path).read_text())["results"] if r["case"] == "collective"]


def fit_file(path: Path) -> CostModel:
    """The model fitted to a bench run's JSON, for ``SyncBatchNorm(..., cost_model=fit_file(path))``."""
    return fit(collective_points(path))


def worst_error(model: CostModel, points: list[dict], collective: str) -> float:
    """The largest relative error of ``model``'s layer-step time for ``collective`` at ``points``."""
    return max(abs(model.layer_seconds(collective, p["world_size"], p["channels"])
                   / statistics.median(p["seconds"][collective]) - 1) for p in points)
