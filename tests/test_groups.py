"""BN groups (``group_size=k``): ranks 0..k-1, k..2k-1, ... each normalize over their own group's
concatenated batch, on real Gloo groups of 2, 4 and 8 (oversubscribed) ranks, at every k dividing
the world size: outputs, gradients, running statistics and eval equal nn.BatchNorm's on that
group's batch (float64, 1e-10), with either collective, eager and compiled; ``auto`` chooses by k."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from app import why_not_compiled
from test_batchnorm import EXACT, PLAIN, SHAPES, STEPS, Case, _state, _zero_if_none, run_layer_on_rank

from syncbn import SyncBatchNorm, bn_groups, convert_sync_batchnorm
from syncbn.cost import Algorithm, CostModel
from syncbn.counting import count_collectives

SPLITS = {  # per-rank batch sizes: every group (k >= 2) holds more than one value per channel
    "equal": (4, 4, 4, 4, 4, 4, 4, 4), "unequal": (3, 5, 2, 6, 2, 7, 3, 2), "empty-ranks": (0, 5, 3, 0, 0, 2, 6, 0),
}


def group_reference(case: Case, group_size: int, group: int) -> dict:
    """nn.BatchNorm in this process on the rows of each global batch that the group's ranks hold."""
    start = sum(case.sizes[: group * group_size])
    rows = slice(start, start + sum(case.sizes[group * group_size : (group + 1) * group_size]))
    layer = case.make(PLAIN[len(case.sample_shape)])
    outputs, input_grads = [], []
    for x_global, dy_global in case.global_batches():
        x = x_global[rows].clone().requires_grad_()
        y = layer(x)
        y.backward(dy_global[rows])
        outputs.append(y.detach())
        input_grads.append(x.grad)
    layer.eval()
    eval_outs = [layer(x).detach() for x in case.eval_batch().split(3)]
    return dict(outputs=outputs, input_grads=input_grads, eval_outs=eval_outs, **_state(layer))


def assert_each_group_is_batchnorm_on_its_batch(case: Case, ranks: list[dict]) -> None:
    k = case.group_size
    for group in range(len(ranks) // k):
        ref, members = group_reference(case, k, group), range(group * k, (group + 1) * k)
        for step in range(STEPS):
            for name in ("outputs", "input_grads"):
                torch.testing.assert_close(torch.cat([ranks[r][name][step] for r in members]), ref[name][step],
                                           **EXACT, msg=f"group {group} step {step} {name}")
        for name in ("weight_grad", "bias_grad"):
            summed = sum(_zero_if_none(ranks[r][name], ref[name]) for r in members)
            torch.testing.assert_close(summed, ref[name], **EXACT, msg=f"group {group} {name} summed")
        for r in members:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(ranks[r][name], ref[name], **EXACT, msg=f"rank {r} {name}")
            torch.testing.assert_close(ranks[r]["eval_out"], ref["eval_outs"][r], **EXACT, msg=f"rank {r} eval")


GROUPED = [
    pytest.param(w, k, split, id=f"w{w}-k{k}-{split}")
    for w, split in itertools.product((2, 4), SPLITS)
    for k in (1, 2, 4) if w % k == 0 and not (k == 1 and split != "equal")  # alone, a rank needs 2 values
]


@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
@pytest.mark.parametrize("shape", ["NC", "NCHW-channels_last"])
@pytest.mark.parametrize("world_size,group_size,split", GROUPED)
def test_each_group_is_batchnorm_on_its_groups_concatenated_batch(gloo_group, world_size, group_size, split, shape,
                                                                  collective):
    case = Case(*SHAPES[shape], SPLITS[split][:world_size], collective=collective, group_size=group_size)
    assert_each_group_is_batchnorm_on_its_batch(case, gloo_group(world_size).run(run_layer_on_rank, case))


def every_group_size_on_rank(sizes: tuple, collective: str) -> list[dict]:
    return [run_layer_on_rank(Case(*SHAPES["NC"], sizes, collective=collective, group_size=k)) for k in (1, 2, 4, 8)]


@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
def test_at_eight_ranks_every_group_size_is_batchnorm_on_its_group(gloo_group, collective):
    """Eight ranks on this machine's cores (oversubscribed), k = 1, 2, 4, 8 in one call each."""
    sizes = SPLITS["unequal"]
    ranks = gloo_group(8).run(every_group_size_on_rank, sizes, collective)
    for index, k in enumerate((1, 2, 4, 8)):
        case = Case(*SHAPES["NC"], sizes, collective=collective, group_size=k)
        assert_each_group_is_batchnorm_on_its_batch(case, [r[index] for r in ranks])


@pytest.mark.skipif(why_not_compiled() is not None, reason=str(why_not_compiled()))
@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
def test_a_compiled_grouped_layer_has_no_graph_break_and_is_batchnorm_on_its_group(gloo_group, collective):
    """``run_layer_on_rank(case, True)`` compiles with fullgraph=True, which raises on any break."""
    case = Case(*SHAPES["NCHW-channels_last"], SPLITS["empty-ranks"][:4], collective=collective, group_size=2)
    assert_each_group_is_batchnorm_on_its_batch(case, gloo_group(4).run(run_layer_on_rank, case, True))


def groups_on_rank() -> dict:
    made = {k: bn_groups(k) for k in (1, 2, 4)}
    return dict(ranks={k: None if g is None else dist.get_process_group_ranks(g) for k, g in made.items()},
                world=made[4] is dist.group.WORLD, again=bn_groups(2) is made[2] and bn_groups(1) is made[1],
                layer_made_none=SyncBatchNorm(3, group_size=2)._group() is made[2],
                alone=SyncBatchNorm(3, group_size=1)._group() is None)


def test_bn_groups_are_consecutive_ranks_made_once_per_world(gloo_group):
    for rank, result in enumerate(gloo_group(4).run(groups_on_rank)):
        pair = [rank // 2 * 2, rank // 2 * 2 + 1]
        assert result["ranks"] == {1: [rank], 2: pair, 4: [0, 1, 2, 3]}, "k=1: the rank alone; k=W: the world itself"
        assert result["world"] and result["again"] and result["layer_made_none"]
        assert result["alone"], "a layer of groups of one needs no group: no collective"


# Gathers at 2 ranks (1 round against the tree's 2 x 0.6), reduces at 4 (3 rounds against 2 x 2 x 0.6).
BY_SIZE = CostModel(all_gather=(Algorithm("ring_gather", alpha=1.0, beta=0.0),),
                    all_reduce=(Algorithm("tree_reduce", alpha=0.6, beta=0.0),))


def auto_by_group_size() -> dict:
    choices, counts = {}, {}
    for k in (1, 2, 4):
        layer = SyncBatchNorm(4, cost_model=BY_SIZE, group_size=k).double()
        with count_collectives() as counted:
            layer((torch.randn(5, 4, dtype=torch.float64) + 3).requires_grad_()).sum().backward()
        choices[k], counts[k] = layer.auto_choice, dict(counted)
    return dict(choices=choices, counts=counts)


def test_auto_chooses_by_the_groups_size_and_a_group_of_one_runs_no_collective(gloo_group):
    for result in gloo_group(4).run(auto_by_group_size):
        assert result["choices"] == {1: None, 2: "all_gather", 4: "all_reduce"}
        assert result["counts"][1] == {}, "per-rank BN: no collective at all"
        assert result["counts"][2] == {"c10d::_allgather_base_": 2}, "one each way"


def refused_group_sizes() -> list[str]:
    messages = []
    for build in (lambda: SyncBatchNorm(3, group_size=3), lambda: convert_sync_batchnorm(nn.BatchNorm1d(3), group_size=3),
                  lambda: bn_groups(8)):
        try:
            build()
            messages.append("built")
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_a_group_size_that_does_not_divide_the_world_is_refused_naming_both(gloo_group):
    for messages in gloo_group(4).run(refused_group_sizes):
        assert messages[:2] == ["SyncBatchNorm group_size=3 does not divide the world size 4: the groups are ranks "
                                "0..k-1, k..2k-1, ..."] * 2
        assert messages[2].startswith("SyncBatchNorm group_size=8 does not divide the world size 4")


@pytest.mark.parametrize("bad", [0, -2, True, 2.0, "2"])
def test_a_group_size_that_is_not_a_whole_number_from_1_is_refused_when_built(bad):
    for build in (lambda: SyncBatchNorm(3, group_size=bad), lambda: convert_sync_batchnorm(nn.BatchNorm1d(3), group_size=bad)):
        with pytest.raises(ValueError, match=rf"^SyncBatchNorm group_size must be a whole number >= 1, got {bad!r}$"):
            build()


def test_group_size_and_process_group_together_are_refused():
    with pytest.raises(ValueError, match="takes group_size or process_group, not both"):
        SyncBatchNorm(3, process_group=object(), group_size=2)
    with pytest.raises(ValueError, match="takes group_size or process_group, not both"):
        convert_sync_batchnorm(nn.BatchNorm1d(3), process_group=object(), group_size=2)


def test_outside_a_process_group_a_grouped_layer_is_batchnorm_and_its_repr_names_the_group_size():
    x = torch.randn(6, 3, dtype=torch.float64)
    layer, plain = SyncBatchNorm(3, group_size=4).double(), nn.BatchNorm1d(3).double()
    assert torch.equal(layer(x), plain(x)) and torch.equal(layer.running_var, plain.running_var)
    assert repr(layer).endswith(", collective=auto, group_size=4)")
    assert "group_size" not in repr(SyncBatchNorm(3))
    converted = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(2)), group_size=2)
    assert [layer.group_size for layer in converted] == [2, 2]
