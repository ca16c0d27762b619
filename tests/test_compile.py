"""SyncBatchNorm under ``torch.compile(fullgraph=True)`` with inductor on CPU, on real Gloo groups:
no graph break, and nn.BatchNorm's numbers on the concatenated global batch (float64, 1e-10), as
the eager layer gives. Each case compiles a few small graphs once (a few seconds a rank)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_batchnorm import EXACT, SHAPES, SPLITS, Case, assert_matches_reference, reference, run_layer_on_rank

from syncbn import SyncBatchNorm
from syncbn.train import cannot_compile

# No C++ compiler, or ATEN_CPU_CAPABILITY=default (seen in CI: "'at::vec' has not been declared").
CANNOT_COMPILE = cannot_compile()
pytestmark = pytest.mark.skipif(CANNOT_COMPILE is not None, reason=CANNOT_COMPILE or "")

CASES = {  # shape, per-rank batch sizes, momentum, affine
    "NC-equal": ("NC", "equal", 0.1, True),
    "NCL-unequal-momentum-None": ("NCL", "unequal", None, True),
    "NCHW-channels_last-empty-rank-affine-off": ("NCHW-channels_last", "zero-on-rank-0", 0.1, False),
    "NCDHW-unequal": ("NCDHW", "unequal", 0.1, True),
}


def case_for(name: str, world_size: int) -> Case:
    shape, split, momentum, affine = CASES[name]
    sample_shape, memory_format = SHAPES[shape]
    return Case(sample_shape, memory_format, SPLITS[split][:world_size], momentum, affine)


# 4 ranks compile too (checked by hand), but four processes compiling on two cores cost the suite
# 16 s; 2 ranks exercise every collective path, 1 rank the path without one.
@pytest.mark.parametrize("world_size,name", [(2, name) for name in CASES] + [(1, "NC-equal")])
def test_compiled_layer_has_no_graph_break_and_gives_batchnorm_on_the_global_batch(gloo_group, world_size, name):
    """Three training steps (outputs, input gradients, summed weight and bias gradients, running
    statistics) and an eval step, compiled with fullgraph=True on every rank."""
    case = case_for(name, world_size)
    assert_matches_reference(case, gloo_group(world_size).run(run_layer_on_rank, case, True), reference(case))


def explain_layer() -> tuple[int, int]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(SyncBatchNorm(3).double())(torch.randn(4, 3, dtype=torch.float64))
    return explanation.graph_count, explanation.graph_break_count


def test_dynamo_sees_one_graph_and_no_break(gloo_group):
    assert gloo_group(2).run(explain_layer) == [(1, 0), (1, 0)]


def test_without_a_process_group_the_compiled_layer_is_batchnorm():
    case = case_for("NC-equal", 1)
    layer, plain = case.make(SyncBatchNorm), case.make(torch.nn.BatchNorm1d)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    x = case.global_batches()[0][0]
    torch.testing.assert_close(compiled(x), plain(x), **EXACT)
    torch.testing.assert_close(layer.running_var, plain.running_var, **EXACT)


def single_value_compiled(sizes: tuple) -> str:
    torch._dynamo.reset()
    compiled = torch.compile(SyncBatchNorm(3), fullgraph=True, dynamic=False)
    try:
        compiled(torch.randn(sizes[dist.get_rank()], 3))
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_one_value_in_the_whole_group_is_an_error_inside_the_compiled_graph_on_every_rank(gloo_group):
    for message in gloo_group(2).run(single_value_compiled, (1, 0)):
        assert "Expected more than 1 value per channel when training, got 1 value per channel in the whole group" in message
    assert gloo_group(2).run(explain_layer) == [(1, 0), (1, 0)], "the group still works"
