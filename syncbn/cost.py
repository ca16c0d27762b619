"""What ``SyncBatchNorm(collective="auto")`` chooses by: an alpha-beta model of one layer step.

A collective runs by one of its algorithms, the cheapest by the model (as NCCL's tuner picks). An
algorithm over W ranks pays a ``latency`` per call, takes ``steps`` rounds of messages, each paying
``alpha + alpha_per_rank * W``, and each rank receives ``bytes`` at ``beta`` seconds a byte (NCCL's
formulas, docs/performance.md):

- ring all-gather: W - 1 steps; (W - 1) p bytes for a payload of p bytes per rank;
- ring all-reduce (reduce-scatter, then all-gather): 2 (W - 1) steps; 2 (W - 1) / W p bytes;
- tree all-reduce (NCCL's double binary tree): 2 ceil(log2 W) steps; 2 p bytes.

A layer step (forward and backward) sends ``[count, moments]``, 2C + 1 float64 values, then the
two gradient sums, 2C values in the statistics' dtype. The model reads nothing but W, C and that
dtype, which every rank of a group shares, so every rank chooses alike.

``alpha_per_rank`` is the wake-up of ranks that share cores: on the 2-core machine the Gloo
constants were measured on, a round's latency grows with the ranks (W = 4 and 8 are oversubscribed);
where every rank has its own core it is 0, as in the NCCL model. Gloo's constants are the bench's
fit on this project's machine (fit your own: ``python -m syncbn.bench --cases collective``, and pass
``cost_model=``); NCCL's are its tuner's published ones, not measured here (docs/performance.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("ring_gather", "ring_reduce", "tree_reduce")


def steps_and_bytes(algorithm: str, world_size: int, payload_bytes: float) -> tuple[float, float]:
    """(rounds of messages, bytes each rank receives) of one collective of ``payload_bytes`` per rank."""
    hops = world_size - 1
    if algorithm == "ring_gather":
        return hops, hops * payload_bytes
    if algorithm == "ring_reduce":
        return 2 * hops, 2 * hops / world_size * payload_bytes
    if algorithm == "tree_reduce":
        return 2 * math.ceil(math.log2(world_size)), (2 * payload_bytes if hops else 0.0)
    raise ValueError(f"unknown collective algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")


def layer_payloads(channels: int, grad_itemsize: int = 4) -> tuple[int, int]:
    """Bytes per rank of a layer step's two payloads: forward ``[count, 2C moments]`` in float64,
    backward the two gradient sums of C values each."""
    return (2 * channels + 1) * 8, 2 * channels * grad_itemsize


@dataclass(frozen=True)
class Algorithm:
    name: str  # one of ALGORITHMS
    alpha: float  # seconds per round of messages
    beta: float  # seconds per byte a rank receives
    latency: float = 0.0  # seconds per call
    alpha_per_rank: float = 0.0  # seconds per round and rank

    def seconds(self, world_size: int, payload_bytes: float) -> float:
        steps, received = steps_and_bytes(self.name, world_size, payload_bytes)
        return self.latency + (self.alpha + self.alpha_per_rank * world_size) * steps + self.beta * received


@dataclass(frozen=True)
class CostModel:
    all_gather: tuple[Algorithm, ...]
    all_reduce: tuple[Algorithm, ...]

    def collective_seconds(self, collective: str, world_size: int, payload_bytes: float) -> float:
        """One call: its cheapest algorithm."""
        return min(a.seconds(world_size, payload_bytes) for a in getattr(self, collective))

    def layer_seconds(self, collective: str, world_size: int, channels: int, grad_itemsize: int = 4) -> float:
        """The collectives of one layer step, forward and backward."""
        return sum(self.collective_seconds(collective, world_size, p) for p in layer_payloads(channels, grad_itemsize))

    def choose(self, world_size: int, channels: int, grad_itemsize: int = 4) -> str:
        """The cheaper collective for a layer of ``channels`` over ``world_size`` ranks; a tie gathers."""
        gather = self.layer_seconds("all_gather", world_size, channels, grad_itemsize)
        reduce = self.layer_seconds("all_reduce", world_size, channels, grad_itemsize)
        return "all_reduce" if reduce < gather else "all_gather"


# Fitted by ``python -m syncbn.bench --cases collective`` (docs/bench-collectives.json) on 2 cores
# (AMD EPYC), Gloo over loopback, ranks at W = 2, 4, 8 (4 and 8 oversubscribed).
GLOO = CostModel(
    all_gather=(Algorithm("ring_gather", alpha=613.6e-6, alpha_per_rank=228.2e-6, beta=10.80e-9),),
    all_reduce=(Algorithm("ring_reduce", alpha=314.1e-6, alpha_per_rank=203.8e-6, beta=18.31e-9),),
)


def _nccl(name: str, latency_us: float, hop_us: float, bus_gb_per_s: float) -> Algorithm:
    """An algorithm and protocol as NCCL's tuner times it: a base latency, a network hop per step,
    and the buffer over its algorithm bandwidth, which is the bytes a rank receives (``steps_and_bytes``)
    over the bus bandwidth."""
    return Algorithm(name, alpha=hop_us * 1e-6, beta=1 / (bus_gb_per_s * 1e9), latency=latency_us * 1e-6)


# Not measured here: NCCL's tuner's constants (src/graph/tuning.cc: base latency, NET hop latency,
# LL at a quarter of the ring's bus bandwidth and 1 / 3.8 of the tree's, the tree's bus at 0.9 of
# it) for 400 Gb/s (50 GB/s) a GPU, every step a network hop; LL and Simple protocols each.
NCCL = CostModel(
    all_gather=(_nccl("ring_gather", 6.6, 2.7, 50 / 4), _nccl("ring_gather", 8.4, 9.6, 50)),
    all_reduce=(_nccl("ring_reduce", 6.6, 2.7, 50 / 4), _nccl("ring_reduce", 8.4, 9.6, 50),
                _nccl("tree_reduce", 6.8, 5.0, 45 / 3.8), _nccl("tree_reduce", 0.0, 50.0, 45)),
)


def model_for(device_type: str) -> CostModel:
    """The model for tensors on ``device_type``: NCCL's for CUDA (the backend torch picks for it),
    Gloo's measured one for the rest."""
    return NCCL if device_type == "cuda" else GLOO
