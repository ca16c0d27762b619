"""NCCL's own cost model of its collectives, as its tuner computes it: the constants and formulas of
``src/graph/tuning.cc`` in NCCL 2.30.7 (the release torch 2.14.1's CUDA wheels ship), for the two
collectives and the small payloads a BatchNorm layer sends. Not measured here: no GPU cluster.

NCCL times each (algorithm, protocol) as ``latency + bytes / (1000 x bandwidth)`` microseconds and
runs the fastest (``ncclTopoGetAlgoTime``, lines 630-655). The latency counts the algorithm's steps,
each an NVLink hop inside a node or a network hop between nodes (``ncclTopoTuneModel``, lines
384-435); the bandwidth is the bus bandwidth of the hop the algorithm is limited by, refined per
protocol (lines 324-337) and turned into the algorithm's bandwidth (lines 373-382).

The hardware is an assumption, stated once here: Hopper GPUs (the constants' Hopper rows), NVLink 4
inside a node (18 links of ``SM90_NVLINK_BW`` = 20.6 GB/s, ``src/graph/topo.h``), a 400 Gb/s NIC
(50 GB/s) per GPU between nodes, 16 channels, x86 Intel hosts (``getNetOverhead``: 1 us, 2 on AMD),
LL128 enabled (Hopper over NVLink and PXN). Left out: NVLS and CollNet, which need NVSwitch SHARP
or in-network reduction; their latencies (25 us of NVLink SHARP alone, lines 161 and 425) exceed
what these payloads take by the tree or the ring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RELEASE = "2.30.7"
PROTOCOLS = ("LL", "LL128", "Simple")

# baseLatencies, lines 149-155 (us): Tree, Ring and PAT; protocols LL, LL128, Simple.
BASE_LATENCY = {"tree": (6.8, 14.0, 8.4), "ring": (6.6, 14.0, 8.4), "pat": (8.0, 8.0, 8.0)}
# hwLatencies, lines 156-176 (us): per hop over NVLink (158-163) and over the network (170-175).
NVLINK_LATENCY = {"tree": (0.6, 1.25, 4.0), "ring": (0.6, 1.9, 3.4), "pat": (0.0, 0.0, 4.0)}
NET_LATENCY = {"tree": (5.0, 8.5, 14.0), "ring": (2.7, 4.0, 14.0), "pat": (0.0, 0.0, 14.0)}
# llMaxBws, lines 177-183 (GB/s): Hopper within one node (181), an Intel host between 2 nodes and more (179).
LL_MAX_BW = (141.0, 39.0, 20.4)
PER_CHANNEL_RING_LL128_BW = 36.7  # perChMaxRingLL128Bws, Hopper, line 188
PER_CHANNEL_TREE_LL128_BW = (36.7, 36.7, 29.0)  # perChMaxTreeLL128Bws, Hopper, line 195
PER_CHANNEL_TREE_BW = (38.7, 41.4, 36.0)  # perChMaxTreeBws, Hopper, line 202
NET_OVERHEAD_US = 1.0  # getNetOverhead, lines 225-233 (x86 Intel)
# treeCorrectionFactor, lines 623-627: the tree's bandwidth by log2(bytes / 64), per protocol.
TREE_CORRECTION = (
    (1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0, 1.0, 1.0, 1.0, 1.0),
    (1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9, 1.0, 1.0, 1.0),
    (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9, .9),
)
NVLINK_GB_S = 18 * 20.6  # SM90_NVLINK_BW x 18 links
NET_GB_S = 50.0  # 400 Gb/s a GPU
CHANNELS = 16


def log2i(n: int) -> int:
    """NCCL's ``log2i``: the floor of log2, 0 for n < 1 (its ``log2Down``)."""
    return max(int(n).bit_length() - 1, 0)


@dataclass(frozen=True)
class NcclAlgorithm:
    """One (collective, algorithm, protocol) of NCCL for a cluster of ``gpus_per_node`` GPUs a node."""

    collective: str  # "all_gather" or "all_reduce"
    algorithm: str  # "ring", "tree" (all-reduce) or "pat" (all-gather, one GPU a node)
    protocol: str  # one of PROTOCOLS
    gpus_per_node: int = 8
    nvlink_gb_s: float = NVLINK_GB_S
    net_gb_s: float = NET_GB_S
    channels: int = CHANNELS

    @property
    def name(self) -> str:
        return f"{self.algorithm}_{self.protocol}"

    def seconds(self, world_size: int, payload_bytes: float) -> float:
        """One call with ``payload_bytes`` per rank; infinite where NCCL would not run it."""
        if world_size <= 1:
            return 0.0
        nodes = max(world_size // self.gpus_per_node, 1)
        if self.algorithm == "pat" and nodes != world_size:  # ncclPatEnable, line 220
            return math.inf
        total = payload_bytes * world_size if self.collective == "all_gather" else payload_bytes
        bandwidth = self.bandwidth(world_size, nodes, total)
        return (self.latency(world_size, nodes, total) + total / (1000 * bandwidth)) * 1e-6

    def _steps(self, world_size: int) -> int:
        return 2 * (world_size - 1) if self.collective == "all_reduce" else world_size - 1

    def latency(self, world_size: int, nodes: int, total_bytes: float) -> float:
        """Microseconds per call, lines 384-435 (and the ring's plateau, lines 648-651)."""
        p = PROTOCOLS.index(self.protocol)
        per_node = world_size / nodes
        intra = NVLINK_LATENCY[self.algorithm][p]
        inter = NET_LATENCY["tree" if per_node == 1 else self.algorithm][p]  # lines 387-388
        latency = BASE_LATENCY[self.algorithm][p]
        if self.algorithm == "tree":
            return latency + 2 * ((per_node - 1) * intra + log2i(nodes) * inter)
        if self.algorithm == "pat":
            return latency + log2i(nodes) * (inter / 3.5) + world_size * 2.8
        steps = self._steps(world_size)
        if nodes > 1:
            intra = max(intra, NET_OVERHEAD_US * (3 if self.protocol == "Simple" else 1))
        inter_steps = 0 if nodes == 1 else (2 if self.collective == "all_reduce" else 1) * (nodes - 1)
        latency += (steps - inter_steps) * intra + inter_steps * inter
        if (self.protocol == "Simple" and nodes > 1 and self.collective == "all_reduce"
                and total_bytes / (self.channels * world_size) >= 64):
            latency *= 1.4  # "plateau effect of ring", Hopper
        return latency

    def bandwidth(self, world_size: int, nodes: int, total_bytes: float) -> float:
        """The algorithm's bandwidth in GB/s, lines 311-382 and the tree's correction, 638-641."""
        index = min(nodes, 3) - 1  # N1, N2, N4+ (line 268)
        intra = self.nvlink_gb_s if self.gpus_per_node > 1 else self.net_gb_s
        bus = intra if nodes <= 2 else self.net_gb_s  # line 311
        if self.algorithm == "ring":
            if self.protocol == "LL":
                bus = min(LL_MAX_BW[index], bus * .5)
            elif self.protocol == "LL128":
                bus = min(bus * .92, self.channels * PER_CHANNEL_RING_LL128_BW)
            return bus * world_size / self._steps(world_size)
        if self.algorithm == "pat":
            return bus * .75
        bus = min(bus * .92, self.channels * PER_CHANNEL_TREE_BW[index])
        if self.protocol == "LL":
            bus = min(bus / 3.8, LL_MAX_BW[index])
        elif self.protocol == "LL128":
            bus = min(bus * (7 / 9 if nodes == 1 else 120 / 128), self.channels * PER_CHANNEL_TREE_LL128_BW[index])
        size_class = log2i(int(total_bytes) >> 6)
        if 0 <= size_class < 23:
            bus *= TREE_CORRECTION[PROTOCOLS.index(self.protocol)][size_class]
        return bus * .5


def algorithms(gpus_per_node: int = 8, **hardware) -> dict[str, tuple[NcclAlgorithm, ...]]:
    """Every (algorithm, protocol) NCCL would weigh for each collective on such a cluster."""
    gather = [NcclAlgorithm("all_gather", "ring", p, gpus_per_node, **hardware) for p in PROTOCOLS]
    gather.append(NcclAlgorithm("all_gather", "pat", "Simple", gpus_per_node, **hardware))
    reduce = [NcclAlgorithm("all_reduce", a, p, gpus_per_node, **hardware) for a in ("ring", "tree") for p in PROTOCOLS]
    return {"all_gather": tuple(gather), "all_reduce": tuple(reduce)}
