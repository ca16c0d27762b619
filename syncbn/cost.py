"""What ``SyncBatchNorm(collective="auto")`` chooses by: a cost model of one layer step.

A collective runs by one of its algorithms, the cheapest by the model (as NCCL's tuner picks).
Two kinds of model:

- alpha-beta (``Algorithm``), for Gloo: an algorithm over W ranks pays a ``latency`` per call,
  takes ``steps`` rounds of messages, each paying ``alpha + alpha_per_rank * W``, and each rank
  receives ``bytes`` at ``beta`` seconds a byte (NCCL's formulas, docs/performance.md):
  ring all-gather: W - 1 steps and (W - 1) p bytes for a payload of p bytes per rank; ring
  all-reduce (reduce-scatter, then all-gather): 2 (W - 1) steps, 2 (W - 1) / W p bytes; tree
  all-reduce (double binary tree): 2 ceil(log2 W) steps, 2 p bytes. ``alpha_per_rank`` is the
  wake-up of ranks that share cores: on the 2-core machine the constants were measured on, a
  round's latency grows with the ranks (W = 4 and 8 are oversubscribed). The constants are the
  bench's fit on this project's machine (fit your own: ``python -m syncbn.bench --cases
  collective``, and pass ``cost_model=``).
- NCCL's own tuner (``syncbn/nccl_tuner.py``: NCCL 2.30.7's constants and formulas, GPUs per node,
  NVLink inside a node and the network between), not measured here (docs/performance.md).

A layer step sends ``[count, moments]``, 2C + 1 float64 values, forward (the all-reduce, in the
rare steps whose sums cancel, 2C more), then the two gradient sums, 2C float64 values, backward.
The model reads nothing but W, C and the group's backend, which every rank of a group shares, so
every rank chooses alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from syncbn import nccl_tuner

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


def layer_payloads(channels: int) -> tuple[int, int]:
    """Bytes per rank of a layer step's two payloads, both float64 whatever the input's dtype (so
    that ranks agree on the collective's size by construction): forward ``[count, 2C moments]``,
    backward the two gradient sums of C values each. (The all-reduce's rare second forward round
    sends the 2C moments again.)"""
    return (2 * channels + 1) * 8, 2 * channels * 8


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


class Timed(Protocol):
    """What a cost model asks of an algorithm: its name, and one call's seconds."""

    @property
    def name(self) -> str: ...

    def seconds(self, world_size: int, payload_bytes: float) -> float: ...


@dataclass(frozen=True)
class CostModel:
    all_gather: tuple[Timed, ...]
    all_reduce: tuple[Timed, ...]

    def collective_seconds(self, collective: str, world_size: int, payload_bytes: float) -> float:
        """One call: its cheapest algorithm."""
        return min(a.seconds(world_size, payload_bytes) for a in getattr(self, collective))

    def layer_seconds(self, collective: str, world_size: int, channels: int, reduce_rounds: int = 1) -> float:
        """The collectives of one layer step, forward and backward; ``reduce_rounds``: the
        all-reduce's forward rounds (2 where they always both run: compiled)."""
        forward, backward = layer_payloads(channels)
        seconds = self.collective_seconds(collective, world_size, forward)
        if collective == "all_reduce" and reduce_rounds == 2:
            seconds += self.collective_seconds(collective, world_size, backward)
        return seconds + self.collective_seconds(collective, world_size, backward)

    def choose(self, world_size: int, channels: int, reduce_rounds: int = 1) -> str:
        """The cheaper collective for a layer of ``channels`` over ``world_size`` ranks; a tie gathers."""
        gather = self.layer_seconds("all_gather", world_size, channels)
        reduce = self.layer_seconds("all_reduce", world_size, channels, reduce_rounds)
        return "all_reduce" if reduce < gather else "all_gather"


# Fitted by ``python -m syncbn.bench --cases collective`` (docs/bench-collectives.json, commit 8bfbdc6)
# on 2 cores (AMD EPYC), Gloo over loopback, ranks at W = 2, 4, 8 (4 and 8 oversubscribed).
GLOO = CostModel(
    all_gather=(Algorithm("ring_gather", alpha=314.09e-6, alpha_per_rank=265.88e-6, beta=5.112e-9),),
    all_reduce=(Algorithm("ring_reduce", alpha=220.31e-6, alpha_per_rank=211.89e-6, beta=3.716e-9),),
)


def nccl_model(gpus_per_node: int = 8, **hardware) -> CostModel:
    """NCCL's tuner's model (``syncbn/nccl_tuner.py``, NCCL 2.30.7) for a cluster of that many GPUs a
    node (NVLink inside, 400 Gb/s a GPU between nodes, unless ``hardware`` says otherwise)."""
    return CostModel(**nccl_tuner.algorithms(gpus_per_node, **hardware))


# Not measured here: NCCL's own model, for 8 GPUs a node, the usual cluster node. ``auto`` on an
# NCCL group uses it whatever the job's layout: a rank's local world size may differ between
# nodes, and every rank must choose alike. Pass ``cost_model=nccl_model(...)`` for another layout.
NCCL = nccl_model(8)


def model_for(backend: str) -> CostModel:
    """The shipped model for a process group's backend: NCCL's tuner's for ``"nccl"``, Gloo's
    measured one for the rest. The backend is the group's, the same on every rank."""
    return NCCL if backend == "nccl" else GLOO


MODELS = {"gloo": GLOO, "nccl": NCCL}


def resolve_model(model: CostModel | str | None) -> CostModel | None:
    """A layer's ``cost_model`` argument as a model: None (by the group's backend), a model, or the
    name of a shipped one. Anything else is refused here, not at the first training step."""
    if model is None or isinstance(model, CostModel):
        return model
    if isinstance(model, str) and model in MODELS:
        return MODELS[model]
    raise ValueError(f"SyncBatchNorm cost_model must be None, a syncbn.cost.CostModel or one of "
                     f"{', '.join(map(repr, MODELS))}, got {model!r}")
