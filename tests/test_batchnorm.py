"""SyncBatchNorm against nn.BatchNorm on the concatenated global batch, on real Gloo groups (also
for inputs that are strided views); the module's collectives, DDP and GhostBatchNorm
(convert/revert: test_batchnorm_convert.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from syncbn import GhostBatchNorm, SyncBatchNorm, convert_sync_batchnorm
from syncbn.cost import GLOO, NCCL, Algorithm, CostModel
from syncbn.counting import count_collectives

STEPS = 3
EXACT = dict(rtol=1e-10, atol=1e-10)
PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}
FLAGS = [  # (momentum, affine, track_running_stats)
    (0.1, True, True), (None, True, True), (0.1, False, True), (None, False, True), (0.1, True, False), (0.1, False, False),
]
SHAPES = {  # per-sample shape (C, *spatial) and memory format
    "NC": ((3,), torch.contiguous_format),
    "NCL": ((3, 5), torch.contiguous_format),
    "NCHW": ((3, 4, 4), torch.contiguous_format),
    "NCHW-channels_last": ((3, 4, 4), torch.channels_last),
    "NCDHW": ((2, 3, 3, 3), torch.contiguous_format),
    "NCDHW-channels_last_3d": ((2, 3, 3, 3), torch.channels_last_3d),
}
LAYOUTS = {  # each rank's input as a view of the same values that is not contiguous
    "transposed": lambda t: t.transpose(0, -1).contiguous().transpose(0, -1),
    "stepped": lambda t: torch.stack([t, t], -1)[..., 0],  # every other element of a wider tensor
    "expanded": lambda t: t[..., :1].expand_as(t),  # stride 0: the case's values repeat along the last dim
}
SPLITS = {  # per-rank batch sizes, cut to the world size
    "equal": (4, 4, 4, 4), "unequal": (3, 5, 1, 6), "zero-on-rank-0": (0, 5, 3, 4), "all-empty": (0, 0, 0, 0),
}


@dataclass(frozen=True)
class Case:
    sample_shape: tuple
    memory_format: torch.memory_format
    sizes: tuple
    momentum: float | None = 0.1
    affine: bool = True
    track: bool = True
    dtype: torch.dtype = torch.float64
    eps: float = 1e-5
    layout: str | None = None  # a key of LAYOUTS, or contiguous in ``memory_format``
    bias: bool = True  # False: with ``affine``, a weight and no bias (torch 2.14's ``bias=False``)
    collective: str = "all_gather"
    cost_model: CostModel | None = None  # auto's
    group_size: int | None = None  # BN groups of that many consecutive ranks

    def global_batches(self, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        shape = (sum(self.sizes), *self.sample_shape)
        return [
            (self._values(torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1),
             self._values(torch.randn(shape, generator=gen, dtype=torch.float64)))
            for _ in range(STEPS)
        ]

    def eval_batch(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(99)
        return self._values(torch.randn((3 * len(self.sizes), *self.sample_shape), generator=gen, dtype=torch.float64))

    def _values(self, t: torch.Tensor) -> torch.Tensor:
        """The expanded layout's tensors (inputs and output gradients) repeat along the last dim."""
        return t[..., :1].expand_as(t).contiguous() if self.layout == "expanded" else t

    def make(self, cls, **kwargs) -> nn.Module:
        layer = cls(self.sample_shape[0], eps=self.eps, momentum=self.momentum, affine=self.affine,
                    track_running_stats=self.track, dtype=torch.float64, **({} if self.bias else {"bias": False}),
                    **kwargs)
        if self.affine:
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                layer.weight.copy_(1 + 0.5 * torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
                bias = torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64)
                if layer.bias is not None:
                    layer.bias.copy_(bias)
        return layer

    def local(self, t: torch.Tensor, rank: int, sizes: tuple | None = None) -> torch.Tensor:
        sizes = sizes or self.sizes
        start = sum(sizes[:rank])
        t = t[start : start + sizes[rank]].to(self.dtype).contiguous(memory_format=self.memory_format)
        return LAYOUTS[self.layout](t) if self.layout else t


def _state(layer: nn.Module) -> dict:
    grad = lambda p: None if p is None or p.grad is None else p.grad.clone()  # noqa: E731
    return {
        "weight_grad": grad(layer.weight),
        "bias_grad": grad(layer.bias),
        "running_mean": None if layer.running_mean is None else layer.running_mean.clone(),
        "running_var": None if layer.running_var is None else layer.running_var.clone(),
        "num_batches_tracked": None if layer.num_batches_tracked is None else layer.num_batches_tracked.clone(),
    }


def run_layer_on_rank(case: Case, compiled: bool = False) -> dict:
    """On each rank: train STEPS steps on this rank's slice of each global batch, then one eval step;
    ``compiled``: through ``torch.compile(fullgraph=True)`` (which raises on any graph break)."""
    rank = dist.get_rank()
    layer = case.make(SyncBatchNorm, collective=case.collective, cost_model=case.cost_model, group_size=case.group_size)
    if compiled:
        torch._dynamo.reset()  # a new case, a new cache: dynamo allows 8 compiles of one forward
    model = torch.compile(layer, fullgraph=True, dynamic=False) if compiled else layer
    outputs, input_grads, formats_kept = [], [], []
    for x_global, dy_global in case.global_batches():
        x = case.local(x_global, rank).requires_grad_()
        y = model(x)
        y.backward(case.local(dy_global, rank))
        outputs.append(y.detach())
        input_grads.append(x.grad)
        formats_kept.append(y.is_contiguous(memory_format=case.memory_format))
    layer.eval()
    with torch.no_grad():
        eval_out = model(case.local(case.eval_batch(), rank, sizes=(3,) * len(case.sizes)))
    return dict(outputs=outputs, input_grads=input_grads, formats_kept=formats_kept, eval_out=eval_out,
                **_state(layer))


def reference(case: Case) -> dict:
    """nn.BatchNorm in this process on the concatenated global batches."""
    layer = case.make(PLAIN[len(case.sample_shape)])
    outputs, input_grads = [], []
    for x_global, dy_global in case.global_batches():
        x = x_global.clone().requires_grad_()
        y = layer(x)
        y.backward(dy_global)
        outputs.append(y.detach())
        input_grads.append(x.grad)
    layer.eval()
    eval_outs = [layer(x).detach() for x in case.eval_batch().split(3)]
    return dict(outputs=outputs, input_grads=input_grads, eval_outs=eval_outs, **_state(layer))


def _zero_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def assert_matches_reference(case: Case, ranks: list[dict], ref: dict) -> None:
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["outputs"][step] for r in ranks]), ref["outputs"][step], **EXACT)
        torch.testing.assert_close(torch.cat([r["input_grads"][step] for r in ranks]), ref["input_grads"][step], **EXACT)
    for name in ("weight_grad", "bias_grad"):
        if ref[name] is None and all(r[name] is None for r in ranks):
            continue
        like = next(g for g in [ref[name], *(r[name] for r in ranks)] if g is not None)
        summed = sum(_zero_if_none(r[name], like) for r in ranks)
        torch.testing.assert_close(summed, _zero_if_none(ref[name], like), **EXACT, msg=f"{name} summed over ranks")
    for rank, r in enumerate(ranks):
        assert all(r["formats_kept"]), f"rank {rank} lost the {case.memory_format}"
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if ref[name] is None:
                assert r[name] is None
            else:
                torch.testing.assert_close(r[name], ref[name], **EXACT, msg=f"rank {rank} {name}")
        torch.testing.assert_close(r["eval_out"], ref["eval_outs"][rank], **EXACT, msg=f"rank {rank} eval")


PARITY = [
    pytest.param(w, shape, split, id=f"w{w}-{shape}-{split}")
    for w, shape, split in itertools.product((1, 2, 3, 4), SHAPES, SPLITS)
    if not (w == 1 and split == "zero-on-rank-0")
]


@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
@pytest.mark.parametrize("world_size,shape,split", PARITY)
def test_parity_with_batchnorm_on_global_batch(gloo_group, world_size, shape, split, collective):
    """Outputs, all gradients, running statistics and eval outputs equal nn.BatchNorm's on the
    concatenated batch (float64, 1e-10), for every flag combination."""
    sample_shape, memory_format = SHAPES[shape]
    for momentum, affine, track in FLAGS:
        case = Case(sample_shape, memory_format, SPLITS[split][:world_size], momentum, affine, track,
                    collective=collective)
        ranks = gloo_group(world_size).run(run_layer_on_rank, case)
        assert_matches_reference(case, ranks, reference(case))


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_weight_without_a_bias_synchronizes_like_batchnorm_on_the_global_batch(gloo_group, world_size):
    for shape, split in (("NC", "unequal"), ("NCHW-channels_last", "zero-on-rank-0")):
        sample_shape, memory_format = SHAPES[shape]
        case = Case(sample_shape, memory_format, SPLITS[split][:world_size], bias=False)
        ranks = gloo_group(world_size).run(run_layer_on_rank, case)
        assert all(r["bias_grad"] is None for r in ranks)
        assert_matches_reference(case, ranks, reference(case))


@pytest.mark.parametrize("shape,layout", [("NC", "transposed"), ("NC", "stepped"), ("NCHW", "transposed"),
                                          ("NCHW", "stepped"), ("NCHW", "expanded")])
def test_inputs_that_are_views_with_any_strides_give_batchnorm_on_the_global_batch(gloo_group, shape, layout):
    case = Case(*SHAPES[shape], SPLITS["unequal"][:2], layout=layout)
    assert not case.local(case.global_batches()[0][0], 0).is_contiguous()
    assert_matches_reference(case, gloo_group(2).run(run_layer_on_rank, case), reference(case))


@pytest.mark.parametrize("world_size", [1, 2])
def test_eps_other_than_the_default_is_the_one_used(gloo_group, world_size):
    """eps=0.5 (every other case uses torch's 1e-5), in training and eval, alone and synchronized."""
    case = Case(SHAPES["NCHW"][0], torch.contiguous_format, SPLITS["unequal"][:world_size], eps=0.5)
    assert_matches_reference(case, gloo_group(world_size).run(run_layer_on_rank, case), reference(case))


@pytest.mark.parametrize("sample_shape", [(1,), (1, 1)], ids=["NC", "NCL"])
def test_a_rank_holding_one_value_per_channel_sends_its_share_of_the_gradient(gloo_group, sample_shape):
    """One channel and one sample on rank 0: the rank has a single value, which is allowed while
    the group has more, and its dy and dy * x_hat belong in the group's sums like any other."""
    case = Case(sample_shape, torch.contiguous_format, (1, 3))
    assert case.local(case.global_batches()[0][0], 0).numel() == 1
    assert_matches_reference(case, gloo_group(2).run(run_layer_on_rank, case), reference(case))


def count_layer_collectives(sizes: tuple) -> dict:
    """Collectives issued by two stacked layers in one forward, one backward and one eval forward."""
    model = nn.Sequential(SyncBatchNorm(3), nn.ReLU(), SyncBatchNorm(3))
    x = torch.randn(sizes[dist.get_rank()], 3, requires_grad=True)
    with count_collectives() as forward:
        y = model(x)
    with count_collectives() as backward:
        y.sum().backward()
    model.eval()
    with count_collectives() as evaluation, torch.no_grad():
        model(x)
    return dict(forward=dict(forward), backward=dict(backward), eval=dict(evaluation))


@pytest.mark.parametrize("world_size,sizes", [(1, (6,)), (2, (4, 4)), (3, (2, 0, 5)), (4, (4, 4, 4, 4))])
def test_one_collective_each_way_per_layer(gloo_group, world_size, sizes):
    per_layer = {"c10d::_allgather_base_": 2} if world_size > 1 else {}
    for counts in gloo_group(world_size).run(count_layer_collectives, sizes):
        assert counts == dict(forward=per_layer, backward=per_layer, eval={})


def test_without_process_group_it_is_plain_batchnorm_and_silent():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ours, plain = SyncBatchNorm(4), nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    with count_collectives() as counts:
        out = ours(x)
    assert not counts
    assert torch.equal(out, plain(x))
    assert torch.equal(ours.running_var, plain.running_var)


def normalize_in_pairs(x_global: torch.Tensor, collective: str) -> torch.Tensor:
    """Ranks {0, 1} and {2, 3} each synchronize within their own pair only: the second step's
    output (the all-reduce's first step gathers)."""
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    layer = SyncBatchNorm(x_global.size(1), process_group=pairs[rank // 2], dtype=torch.float64, collective=collective)
    layer(x_global.chunk(4)[rank] * 3 + 2)
    return layer(x_global.chunk(4)[rank]).detach()


@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
def test_subgroups_synchronize_within_their_own_group(gloo_group, collective):
    x = torch.randn(4 * 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outputs = gloo_group(4).run(normalize_in_pairs, x, collective)
    for pair in (0, 1):
        pair_batch = x[pair * 6 : pair * 6 + 6]
        expected = F.batch_norm(pair_batch, None, None, training=True)
        torch.testing.assert_close(torch.cat(outputs[2 * pair : 2 * pair + 2]), expected, **EXACT)


@pytest.mark.parametrize("seen", [None, (3, 4), (3, 4, 2)], ids=["fresh", "after-2d", "after-3d"])
@pytest.mark.parametrize(
    "shape,match",
    [((4,), r"at least 2 dimensions, got a 1D input of shape \(4,\)"), ((2, 5), r"expects 4 channels.*\(2, 5\) with 5"),
     ((2, 3, 2), r"expects 4 channels.*\(2, 3, 2\) with 3")],
)
def test_bad_input_shape_is_a_clear_error(shape, match, seen):
    """Also after good inputs (the layer checks in full only when the input's rank or channels change)."""
    layer = SyncBatchNorm(4)
    if seen:
        layer(torch.randn(seen))
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(shape))


def _tiny_net(norm: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), norm(8), nn.ReLU(), nn.Linear(8, 3)).double()


def _ddp_batches(world_size: int, sample_shape: tuple[int, ...] = (5,)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(4 * world_size, *sample_shape, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (4 * world_size,), generator=gen)) for _ in range(3)]


def _train(model: nn.Module, batches, share=lambda t: t) -> list[torch.Tensor]:
    """SGD steps (lr 0.5, cross-entropy) on ``share`` of each batch; the outputs of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    outputs = []
    for x, target in batches:
        opt.zero_grad()
        out = model(share(x))
        F.cross_entropy(out, share(target)).backward()
        opt.step()
        outputs.append(out.detach())
    return outputs


def train_ddp_on_rank() -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(convert_sync_batchnorm(_tiny_net(nn.BatchNorm1d)), broadcast_buffers=False)
    _train(model, _ddp_batches(world_size), lambda t: t.chunk(world_size)[rank])
    return model.module.state_dict()


def test_ddp_on_cpu_trains_like_one_process_on_the_global_batch(gloo_group):
    reference = _tiny_net(nn.BatchNorm1d)
    _train(reference, _ddp_batches(2))
    for state in gloo_group(2).run(train_ddp_on_rank):
        assert state.keys() == reference.state_dict().keys()
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(state[name], value, **EXACT, msg=name)


def _tiny_conv_net(norm: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()


GHOST_CASES = {  # what the batch-size study emulates: BatchNorm1d in the MLP, BatchNorm2d in the CNN
    "mlp": (_tiny_net, nn.BatchNorm1d, (5,)),
    "cnn": (_tiny_conv_net, nn.BatchNorm2d, (2, 3, 3)),
}


def train_local_bn_on_rank(case: str) -> dict:
    """Real DDP ranks with plain per-rank BatchNorm and DDP's default buffer broadcast; rank r
    holds samples r, r + W, ... of each global batch, as DistributedSampler deals them."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    make_net, plain, sample_shape = GHOST_CASES[case]
    model = DistributedDataParallel(make_net(plain))
    outputs = _train(model, _ddp_batches(world_size, sample_shape), lambda t: t[rank::world_size])
    return dict(outputs=outputs, state=model.module.state_dict())


@pytest.mark.parametrize("case", list(GHOST_CASES))
@pytest.mark.parametrize("world_size", [2, 4])
def test_ghost_batchnorm_in_one_process_trains_like_per_rank_batchnorm_on_real_ranks(gloo_group, world_size, case):
    """Same outputs every step, same parameters and running statistics (rank 0's) after 3 steps."""
    make_net, _, sample_shape = GHOST_CASES[case]
    ghost = make_net(lambda width: GhostBatchNorm(width, slices=world_size))
    outputs = _train(ghost, _ddp_batches(world_size, sample_shape))
    ranks = gloo_group(world_size).run(train_local_bn_on_rank, case)
    for step, out in enumerate(outputs):
        for rank, r in enumerate(ranks):
            torch.testing.assert_close(r["outputs"][step], out[rank::world_size], **EXACT, msg=f"step {step}, rank {rank}")
    for name, value in ghost.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, **EXACT, msg=name)


def test_ghost_batchnorm_with_one_slice_is_batchnorm_and_checks_the_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    ghost, plain = GhostBatchNorm(4, slices=1), nn.BatchNorm1d(4)
    assert torch.equal(ghost(x), plain(x)) and torch.equal(ghost.running_var, plain.running_var)
    with pytest.raises(ValueError, match="GhostBatchNorm with 4 slices needs a batch divisible by 4, got 6"):
        GhostBatchNorm(4, slices=4)(x)
    with pytest.raises(ValueError, match="^GhostBatchNorm needs at least 1 slice, got 0$"):
        GhostBatchNorm(4, slices=0)


def collectives_and_statistics_on_rank(collective: str, cost_model: CostModel | None = None, track: bool = True) -> dict:
    """Three training steps of a 2-rank layer: the collectives of each, and each rank's running
    statistics after them; the layer's repr before and after."""
    torch.manual_seed(dist.get_rank())
    layer, counts = SyncBatchNorm(4, collective=collective, cost_model=cost_model, track_running_stats=track).double(), []
    before = repr(layer)
    for _ in range(3):
        x = (torch.randn(5, 4, dtype=torch.float64) * 3 + 7).requires_grad_()
        with count_collectives() as counted:
            layer(x).sum().backward()
        counts.append(dict(counted))
    return dict(counts=counts, running_mean=layer.running_mean, running_var=layer.running_var, before=before,
                after=repr(layer), choice=layer.auto_choice)


@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
def test_each_collective_is_one_call_each_way_and_gives_every_rank_the_same_bits(gloo_group, collective):
    """From the first step (channels of mean 7 and std 3: the all-reduce's sums about 0 do not
    cancel). The statistics every rank computes are bit for bit the same."""
    ranks = gloo_group(2).run(collectives_and_statistics_on_rank, collective)
    each_way = {"all_gather": GATHER_EACH_WAY, "all_reduce": REDUCE_EACH_WAY}[collective]
    assert all(r["counts"] == [each_way] * 3 for r in ranks)
    assert torch.equal(ranks[0]["running_mean"], ranks[1]["running_mean"])
    assert torch.equal(ranks[0]["running_var"], ranks[1]["running_var"])


GATHER_EACH_WAY, REDUCE_EACH_WAY = {"c10d::_allgather_base_": 2}, {"c10d::allreduce_": 2}
# Fixed models for ``auto``: one where only the all-gather's rounds cost, one where only the all-reduce's.
REDUCES = CostModel(all_gather=(Algorithm("ring_gather", alpha=1.0, beta=0.0),),
                    all_reduce=(Algorithm("ring_reduce", alpha=0.0, beta=0.0),))
GATHERS = CostModel(all_gather=REDUCES.all_reduce, all_reduce=REDUCES.all_gather)


@pytest.mark.parametrize("model,chosen", [(REDUCES, "all_reduce"), (GATHERS, "all_gather"), (None, GLOO.choose(2, 4))])
@pytest.mark.parametrize("track", [True, False])
def test_auto_runs_the_collective_its_cost_model_chooses_for_the_group_and_shows_it(gloo_group, model, chosen, track):
    """None: the model measured for Gloo, the group's backend. With or without running statistics:
    neither collective needs them."""
    ranks = gloo_group(2).run(collectives_and_statistics_on_rank, "auto", model, track)
    each_way = {"all_reduce": REDUCE_EACH_WAY, "all_gather": GATHER_EACH_WAY}[chosen]
    assert all(r["counts"] == [each_way] * 3 and r["choice"] == chosen for r in ranks)
    assert ranks[0]["before"].endswith(", collective=auto)")
    assert ranks[0]["after"].endswith(f", collective=auto (chose {chosen}))")


# Gathers at 2 ranks (1 round against the tree's 2 x 0.6), reduces at 4 (3 rounds against 2 x 2 x 0.6).
BY_SIZE = CostModel(all_gather=(Algorithm("ring_gather", alpha=1.0, beta=0.0),),
                    all_reduce=(Algorithm("tree_reduce", alpha=0.6, beta=0.0),))


def choices_as_the_group_and_the_model_change() -> list[str]:
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    layer, choices = SyncBatchNorm(4, cost_model=BY_SIZE).double(), []
    for group, model in ((pairs[dist.get_rank() // 2], BY_SIZE), (None, BY_SIZE), (None, GATHERS)):
        layer.process_group, layer.cost_model = group, model
        layer(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
        choices.append(layer.auto_choice)
    return choices


def test_auto_chooses_again_when_the_groups_size_or_its_model_changes(gloo_group):
    for choices in gloo_group(4).run(choices_as_the_group_and_the_model_change):
        assert choices == ["all_gather", "all_reduce", "all_gather"]


def test_auto_alone_chooses_nothing_and_is_batchnorm():
    x = torch.randn(6, 4, dtype=torch.float64)
    layer, plain = SyncBatchNorm(4, collective="auto", cost_model=REDUCES).double(), nn.BatchNorm1d(4).double()
    assert torch.equal(layer(x), plain(x)) and layer.auto_choice is None
    assert repr(layer).endswith(", collective=auto)")


def test_a_collective_or_a_cost_model_the_layer_does_not_have_is_refused_when_it_is_built():
    with pytest.raises(ValueError, match="SyncBatchNorm collective must be one of auto, all_gather, all_reduce, got 'ring'"):
        SyncBatchNorm(3, collective="ring")
    for bad in ("bogus", 7):
        with pytest.raises(ValueError, match="^SyncBatchNorm cost_model must be None, a syncbn.cost.CostModel or "):
            SyncBatchNorm(3, cost_model=bad)
    assert SyncBatchNorm(3, cost_model="nccl").cost_model is NCCL
    assert SyncBatchNorm(3, collective="all_reduce", track_running_stats=False).collective == "all_reduce"


@pytest.mark.parametrize("collective", ["all_gather", "all_reduce", "auto"])
def test_the_repr_names_the_collective_whichever_it_is(collective):
    torchs = nn.BatchNorm1d(3).extra_repr()
    assert repr(SyncBatchNorm(3, collective=collective)) == f"SyncBatchNorm({torchs}, collective={collective})"
    assert repr(SyncBatchNorm(3)).endswith(", collective=auto)"), "auto is the default"
