"""NCCL 2.30.7's tuner model (syncbn/nccl_tuner.py): each formula of src/graph/tuning.cc, worked by
hand here for a case that reaches it, so that a changed constant or term fails by name."""

import math

import pytest

from syncbn.nccl_tuner import NcclAlgorithm, algorithms, log2i


def us(algorithm: NcclAlgorithm, world_size: int, payload: float) -> float:
    return algorithm.seconds(world_size, payload) * 1e6


@pytest.mark.parametrize("n,expected", [(0, 0), (1, 0), (2, 1), (3, 1), (128, 7), (129, 7)])
def test_log2i_is_the_floor_of_log2(n, expected):
    assert log2i(n) == expected


def test_a_ring_all_gather_across_nodes_pays_an_nvlink_or_overhead_step_per_gpu_and_a_network_step_per_node():
    """1024 GPUs in 128 nodes, LL: base 6.6 + (1023 - 127) x max(0.6, 1.0 net overhead) + 127 x 2.7;
    LL's bus bandwidth min(20.4 llMaxBw, 50 / 2), as the algorithm's 20.4 x 1024 / 1023 over 1024 p."""
    ring = NcclAlgorithm("all_gather", "ring", "LL", gpus_per_node=8)
    latency = 6.6 + 896 * 1.0 + 127 * 2.7
    assert us(ring, 1024, 1000) == pytest.approx(latency + 1024 * 1000 / (1000 * 20.4 * 1024 / 1023))


def test_a_ring_within_one_node_is_nvlink_only_at_nvlinks_bandwidth():
    """8 GPUs in one node: 6.6 + 7 x 0.6, LL at min(141 Hopper llMaxBw, 370.8 / 2); Simple at 370.8."""
    assert us(NcclAlgorithm("all_gather", "ring", "LL"), 8, 700) == pytest.approx(
        6.6 + 7 * 0.6 + 8 * 700 / (1000 * 141 * 8 / 7))
    assert us(NcclAlgorithm("all_gather", "ring", "Simple"), 8, 700) == pytest.approx(
        8.4 + 7 * 3.4 + 8 * 700 / (1000 * 18 * 20.6 * 8 / 7))


def test_two_nodes_use_the_intra_node_bandwidth_and_simple_steps_pay_three_times_the_overhead():
    """Line 311: nNodes <= 2 takes bwIntra. Simple's intra step max(3.4, 3 x 1.0); 1 network step of 14."""
    ring = NcclAlgorithm("all_gather", "ring", "Simple", gpus_per_node=8)
    assert us(ring, 16, 800) == pytest.approx(8.4 + 14 * 3.4 + 1 * 14.0 + 16 * 800 / (1000 * 370.8 * 16 / 15))


def test_a_tree_all_reduce_climbs_the_node_then_log2_nodes_network_levels_and_back():
    """6.8 + 2 ((8 - 1) 0.6 + 7 x 5.0); bus min(50 x .92, 16 x 36.0) / 3.8 (LL), 0.8 for 2056
    bytes (log2(2056 >> 6) = 5), then halved."""
    tree = NcclAlgorithm("all_reduce", "tree", "LL", gpus_per_node=8)
    bandwidth = min(50 * .92, 16 * 36.0) / 3.8 * .8 * .5
    assert us(tree, 1024, 2056) == pytest.approx(6.8 + 2 * (7 * 0.6 + 7 * 5.0) + 2056 / (1000 * bandwidth))


def test_one_gpu_a_node_pays_the_trees_network_latency_on_every_ring_step():
    """ppn = 1 (line 387): the ring's network hop costs the tree's 5.0 (LL), not the ring's 2.7."""
    ring = NcclAlgorithm("all_reduce", "ring", "LL", gpus_per_node=1)
    latency = 6.6 + 2 * 63 * 5.0
    assert us(ring, 64, 8) == pytest.approx(latency + 8 / (1000 * min(20.4, 25.0) * 64 / 126))


def test_pat_runs_only_with_one_gpu_a_node_and_pays_a_log_and_a_linear_term():
    pat = NcclAlgorithm("all_gather", "pat", "Simple", gpus_per_node=1)
    assert us(pat, 64, 100) == pytest.approx(8.0 + 6 * 14.0 / 3.5 + 64 * 2.8 + 64 * 100 / (1000 * 50 * .75))
    assert NcclAlgorithm("all_gather", "pat", "Simple", gpus_per_node=8).seconds(64, 100) == math.inf


def test_the_simple_ring_all_reduce_across_nodes_pays_its_plateau_once_the_chunks_are_large():
    """x 1.4 where bytes / (channels x ranks) >= 64: at 16 ranks and 16 channels from 16 KiB."""
    ring = NcclAlgorithm("all_reduce", "ring", "Simple", gpus_per_node=8)
    latency = 8.4 + (30 - 2) * 3.4 + 2 * 14.0
    bandwidth = 370.8 * 16 / 30
    assert us(ring, 16, 16383) == pytest.approx(latency + 16383 / (1000 * bandwidth))
    assert us(ring, 16, 16384) == pytest.approx(1.4 * latency + 16384 / (1000 * bandwidth))


def test_ll128_caps_the_ring_by_its_channels_and_the_tree_by_its_protocol():
    ring = NcclAlgorithm("all_reduce", "ring", "LL128", gpus_per_node=8, channels=1)
    assert ring.bandwidth(64, 8, 1e6) == pytest.approx(min(50 * .92, 36.7) * 64 / 126)
    tree = NcclAlgorithm("all_reduce", "tree", "LL128", gpus_per_node=8)
    assert tree.bandwidth(8, 1, 1 << 30) == pytest.approx(min(370.8 * .92, 16 * 38.7) * 7 / 9 * .5)


def test_one_rank_costs_nothing_and_each_collective_weighs_its_algorithms():
    assert NcclAlgorithm("all_reduce", "tree", "LL").seconds(1, 1e6) == 0.0
    found = algorithms(8)
    assert [a.name for a in found["all_gather"]] == ["ring_LL", "ring_LL128", "ring_Simple", "pat_Simple"]
    assert [a.name for a in found["all_reduce"]] == ["ring_LL", "ring_LL128", "ring_Simple", "tree_LL", "tree_LL128",
                                                      "tree_Simple"]
    assert all(a.gpus_per_node == 1 for a in algorithms(1)["all_reduce"])
