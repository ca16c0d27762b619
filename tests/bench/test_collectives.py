"""The bench's collective case on real Gloo groups: the bytes it counts are the ones on the wire."""

import torch
import torch.distributed as dist

from test_batchnorm import REDUCES

from syncbn.bench.collectives import collective_point
from syncbn.bench.settings import Settings
from syncbn.cost import CostModel, layer_payloads, steps_and_bytes
from syncbn.distributed import DistContext

HEADER = 400  # at most, Gloo's bytes per message beside its payload (about 300 measured)


def point_on_rank(channels: int, cost_model: CostModel | None = None) -> dict:
    ctx = DistContext(dist.get_rank(), dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    return collective_point(channels, Settings(warmup=2, calls=1), ctx, cost_model)


def test_each_rank_receives_what_the_ring_moves_and_only_the_all_gathers_bytes_grow_with_the_ranks(gloo_group):
    """Counted from the kernel's bytes written, not computed: within Gloo's message headers of the
    ring algorithms' bytes. At 4096 channels the all-gather's bytes triple from 2 ranks to 4, the
    all-reduce's stay under twice one rank's payload."""
    received = {}
    for world_size in (2, 4):
        [point, *_] = gloo_group(world_size).run(point_on_rank, 4096)
        received[world_size] = point["received_bytes"]
        for name, algorithm in (("all_gather", "ring_gather"), ("all_reduce", "ring_reduce")):
            rounds, moved = map(sum, zip(*(steps_and_bytes(algorithm, world_size, p) for p in layer_payloads(4096))))
            assert moved <= point["received_bytes"][name] <= moved + HEADER * rounds, (world_size, name)
    assert 2.9 < received[4]["all_gather"] / received[2]["all_gather"] < 3.1
    assert received[4]["all_reduce"] < 2 * sum(layer_payloads(4096)) < received[4]["all_gather"]


def test_the_point_reports_what_the_layers_auto_chose(gloo_group):
    """With the default model the layer gathers here (tests/test_cost.py); with one that reduces,
    the point says so: the bench reads the layer, not the model."""
    for point in gloo_group(2).run(point_on_rank, 16, REDUCES):
        assert point["chosen"] == "all_reduce"
        assert point["seconds"].keys() == {"all_gather", "all_reduce"} and point["channels"] == 16
