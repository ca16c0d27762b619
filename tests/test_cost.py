"""The cost model behind ``collective="auto"``: its formulas, its choice, and the Gloo constants it
ships, which must be the bench's fit of the measurements in docs/ and choose well there."""

import statistics

import pytest
from app import ROOT

from syncbn.bench.costfit import collective_points, fit, fit_file
from syncbn.cost import (GLOO, NCCL, Algorithm, CostModel, layer_payloads, model_for, nccl_model, resolve_model,
                         steps_and_bytes)

MEASURED = collective_points(ROOT / "docs" / "bench-collectives.json")


@pytest.mark.parametrize("algorithm,world_size,expected", [
    ("ring_gather", 8, (7, 700)),
    ("ring_gather", 1, (0, 0)),
    ("ring_reduce", 8, (14, 175)),
    ("ring_reduce", 2, (2, 100)),
    ("tree_reduce", 8, (6, 200)),
    ("tree_reduce", 5, (6, 200)),  # ceil(log2 5) levels
    ("tree_reduce", 1, (0, 0)),
])
def test_each_algorithm_takes_its_rounds_and_moves_its_bytes(algorithm, world_size, expected):
    assert steps_and_bytes(algorithm, world_size, 100) == expected


def test_an_algorithm_the_model_does_not_know_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown collective algorithm 'bcube'; one of ring_gather, ring_reduce, tree_reduce"):
        steps_and_bytes("bcube", 4, 100)


def test_a_layer_step_sends_moments_and_gradient_sums_in_float64_whatever_the_inputs_dtype():
    assert layer_payloads(16) == (33 * 8, 32 * 8)


def test_a_collective_runs_by_its_cheapest_algorithm():
    model = CostModel(all_gather=(), all_reduce=(
        Algorithm("ring_reduce", alpha=1.0, beta=0.0), Algorithm("tree_reduce", alpha=1.0, beta=0.0)))
    assert model.collective_seconds("all_reduce", 1024, 100) == 20.0, "the tree's 2 log2 W rounds, not the ring's 2 (W - 1)"
    model = CostModel(all_gather=(), all_reduce=(
        Algorithm("ring_reduce", alpha=0.0, beta=1.0), Algorithm("tree_reduce", alpha=0.0, beta=1.0)))
    assert model.collective_seconds("all_reduce", 4, 100) == 150.0, "the ring's 2 (W - 1) / W bytes, not the tree's 2"


def test_an_algorithm_pays_its_latency_per_call_its_rounds_and_its_bytes():
    ring = Algorithm("ring_gather", alpha=2.0, alpha_per_rank=0.125, beta=0.5, latency=3.0)
    assert ring.seconds(3, 72) == 3.0 + 2 * (2.0 + 3 * 0.125) + 0.5 * 2 * 72
    assert Algorithm("tree_reduce", alpha=1.0, beta=0.0).seconds(1, 72) == 0.0


def test_a_layer_step_is_its_two_collectives_and_a_compiled_all_reduce_step_its_three():
    ring = Algorithm("ring_gather", alpha=2.0, beta=0.5, latency=3.0)
    model = CostModel(all_gather=(ring,), all_reduce=(ring,))
    # C = 4: payloads of 72 and 64 bytes, 2 rounds each at W = 3.
    assert model.layer_seconds("all_gather", 3, 4) == 2 * 3.0 + 2.0 * 4 + 0.5 * (2 * 72 + 2 * 64)
    assert model.layer_seconds("all_reduce", 3, 4) == model.layer_seconds("all_gather", 3, 4)
    assert model.layer_seconds("all_gather", 3, 4, reduce_rounds=2) == model.layer_seconds("all_gather", 3, 4)
    assert model.layer_seconds("all_reduce", 3, 4, reduce_rounds=2) == 3 * 3.0 + 3 * 2.0 * 2 + 0.5 * 2 * (72 + 2 * 64)


# Same latency and bandwidth: the ring all-reduce pays twice the gather's rounds, but its bytes do
# not grow with W. It wins once its bytes saved, (W - 1) (1 - 2 / W) (32 C + 8), outweigh its 2 (W - 1)
# extra rounds: at W = 4 for C > 1249, at W = 64 for C > 644.
FIXED = CostModel(all_gather=(Algorithm("ring_gather", alpha=1e-5, beta=1e-9),),
                  all_reduce=(Algorithm("ring_reduce", alpha=1e-5, beta=1e-9),))


@pytest.mark.parametrize("world_size,channels,expected", [
    (2, 16, "all_gather"),
    (2, 1_000_000, "all_gather"),  # two ranks: the same bytes, and the gather's fewer rounds
    (4, 16, "all_gather"),
    (4, 1200, "all_gather"),
    (4, 1300, "all_reduce"),
    (64, 600, "all_gather"),
    (64, 700, "all_reduce"),
])
def test_auto_chooses_by_world_size_and_channels_under_a_fixed_model(world_size, channels, expected):
    assert FIXED.choose(world_size, channels) == expected


def test_a_tie_gathers():
    same = (Algorithm("ring_gather", alpha=1.0, beta=0.0),)
    assert CostModel(all_gather=same, all_reduce=same).choose(8, 16) == "all_gather"


def test_an_nccl_group_gets_nccls_model_and_every_other_backend_gloos():
    assert model_for("nccl") is NCCL
    assert model_for("gloo") is GLOO and model_for("ucc") is GLOO


def test_a_cost_model_is_none_a_model_or_the_name_of_a_shipped_one_and_nothing_else():
    assert resolve_model(None) is None and resolve_model(FIXED) is FIXED
    assert resolve_model("nccl") is NCCL and resolve_model("gloo") is GLOO
    for bad in ("NCCL", "mpi", 3, NCCL.all_gather):
        with pytest.raises(ValueError, match=r"^SyncBatchNorm cost_model must be None, a syncbn.cost.CostModel or "
                                             r"one of 'gloo', 'nccl', got "):
            resolve_model(bad)


def test_nccls_model_gathers_within_a_node_and_reduces_across_many():
    assert NCCL.choose(8, 256) == "all_gather"
    assert NCCL.choose(1024, 256) == "all_reduce"
    assert nccl_model(8) == NCCL and nccl_model(1) != NCCL


def test_the_gloo_constants_are_the_benchs_fit_of_the_measurements_in_docs():
    fitted = fit_file(ROOT / "docs" / "bench-collectives.json")
    assert fitted == fit(MEASURED) and len(MEASURED) == 15
    for name in ("all_gather", "all_reduce"):
        [ours], [theirs] = getattr(GLOO, name), getattr(fitted, name)
        assert ours.name == theirs.name
        for term in ("latency", "alpha", "alpha_per_rank", "beta"):
            assert getattr(ours, term) == pytest.approx(getattr(theirs, term), rel=1e-3, abs=1e-12), (name, term)


def test_the_measurements_cover_both_collectives_at_2_4_and_8_ranks_from_16_to_4096_channels():
    assert sorted({(p["world_size"], p["channels"]) for p in MEASURED}) == \
        [(w, c) for w in (2, 4, 8) for c in (16, 64, 256, 1024, 4096)]


@pytest.mark.parametrize("point", MEASURED, ids=lambda p: f"W{p['world_size']}-C{p['channels']}")
def test_auto_is_within_5_percent_of_the_better_collective_at_every_measured_point(point):
    seconds = {name: statistics.median(times) for name, times in point["seconds"].items()}
    chosen = GLOO.choose(point["world_size"], point["channels"])
    assert point["chosen"] == chosen, "the layer's auto chose in the bench what the shipped model chooses"
    assert seconds[chosen] <= 1.05 * min(seconds.values())
