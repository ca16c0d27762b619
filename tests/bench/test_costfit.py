"""The bench's fit of the cost model: it recovers known constants, keeps them at least 0, and says
how far its model is from the measurements."""

import numpy as np
import pytest

from syncbn.bench.costfit import _nonnegative_lstsq, fit, worst_error
from syncbn.cost import Algorithm, CostModel

KNOWN = CostModel(
    all_gather=(Algorithm("ring_gather", alpha=300e-6, alpha_per_rank=100e-6, beta=2e-9, latency=400e-6),),
    all_reduce=(Algorithm("ring_reduce", alpha=200e-6, alpha_per_rank=150e-6, beta=5e-9, latency=500e-6),),
)


def points_of(model: CostModel, skew: dict | None = None) -> list[dict]:
    """The collective case's results as ``model`` would time them (``skew``: a factor at some points)."""
    skew = skew or {}
    return [dict(world_size=w, channels=c, seconds={
        name: [model.layer_seconds(name, w, c) * skew.get((w, c), 1.0)] * 3 for name in ("all_gather", "all_reduce")})
        for w in (2, 4, 8) for c in (16, 256, 4096)]


def test_the_fit_recovers_the_constants_that_made_the_times():
    fitted = fit(points_of(KNOWN))
    for name in ("all_gather", "all_reduce"):
        [ours], [known] = getattr(fitted, name), getattr(KNOWN, name)
        assert ours.name == known.name
        for term in ("latency", "alpha", "alpha_per_rank", "beta"):
            assert getattr(ours, term) == pytest.approx(getattr(known, term), rel=1e-6), (name, term)


def test_no_constant_comes_out_below_zero():
    """Times that fall with the channels would ask for a negative cost per byte: it is held at 0
    and the rest refitted."""
    falling = [dict(p, seconds={name: [1e-3 / (1 + p["channels"] / 4096)] for name in p["seconds"]})
               for p in points_of(KNOWN)]
    for name in ("all_gather", "all_reduce"):
        [cost] = getattr(fit(falling), name)
        assert min(cost.latency, cost.alpha, cost.alpha_per_rank, cost.beta) >= 0
        assert cost.beta == 0 and cost.latency > 0


def test_the_nonnegative_solution_is_the_best_among_those_with_no_term_below_zero():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert _nonnegative_lstsq(a, np.array([1.0, -1.0, 0.0])).tolist() == pytest.approx([0.5, 0.0])
    assert _nonnegative_lstsq(a, np.array([-1.0, -1.0, -2.0])).tolist() == [0.0, 0.0]
    assert _nonnegative_lstsq(a, np.array([1.0, 2.0, 3.0])).tolist() == pytest.approx([1.0, 2.0])


def test_the_worst_error_is_the_largest_relative_miss_of_the_model():
    points = points_of(KNOWN, skew={(4, 256): 1.25, (8, 16): 0.9})
    assert worst_error(KNOWN, points, "all_gather") == pytest.approx(0.2)  # 1 / 1.25 - 1
    assert worst_error(KNOWN, points_of(KNOWN), "all_reduce") == pytest.approx(0.0, abs=1e-12)
