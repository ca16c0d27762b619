"""syncbn.join: DDP ranks holding different numbers of batches (and of samples per batch) train to the
end with no hang, each step normalized by the ranks still training, and end with the parameters and
running statistics of one process that trains on what those ranks hold together (float64, 1e-10)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.join import Join
from gloo import GlooGroup, RankError
from torch.nn.parallel import DistributedDataParallel

import syncbn
from syncbn import SyncBatchNorm, convert_sync_batchnorm

EXACT = dict(rtol=1e-10, atol=1e-10)


class TwoHeads(nn.Module):
    """A BatchNorm on the raw input (no input gradient, so no backward collective), one inside, and
    a second output through a BatchNorm of no parameters, which the loss may leave out (then no
    backward there either: DDP, without find_unused_parameters, does not make one)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.aux = nn.BatchNorm1d(8, affine=False)
        self.double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        return self.head(hidden), self.aux(hidden)


def batch(rank: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(size, 5, generator=gen, dtype=torch.float64) * 2 + 1, torch.randint(0, 3, (size,), generator=gen)


PLANS = {  # per rank, the sizes of its batches: different counts, different sizes, a rank with none
    2: ((4, 3, 5), (2,)),
    3: ((3, 3, 3, 3), (2, 5), ()),
    4: ((2, 2), (3,), (1, 4, 2), (5,)),
}


def loss_of(outputs: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, world_size: int) -> torch.Tensor:
    """The second head counts in the loss only at 3 ranks, whose rank 2 runs no batch: a rank that saw
    no loss backpropagates through every output (at 2 and 4 ranks the loss leaves it out)."""
    logits, aux = outputs
    return F.cross_entropy(logits, y) + (aux.square().mean() if world_size == 3 else 0)


def train_joined_on_rank(plan: tuple, collective: str, group_size: int | None = None) -> dict:
    rank = dist.get_rank()
    model = DistributedDataParallel(convert_sync_batchnorm(TwoHeads(), collective=collective, group_size=group_size),
                                    broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = [batch(rank, step, size) for step, size in enumerate(plan[rank])]
    example = None if batches or group_size == 1 else batch(rank, 0, 1)[0]  # alone, a rank shadows no step
    with syncbn.join(model, example=example):
        for x, y in batches:
            optimizer.zero_grad()
            loss_of(model(x), y, len(plan)).backward()
            optimizer.step()
    layers = [layer for layer in model.module.modules() if isinstance(layer, SyncBatchNorm)]
    return dict(state=model.module.state_dict(), groups={type(layer.process_group).__name__ for layer in layers},
                group_sizes={layer.group_size for layer in layers})


def reference(plan: tuple, group_size: int | None = None) -> list[dict]:
    """One process, plain BatchNorm, a copy of the model per BN group of ``group_size`` ranks (one
    for the whole world by default), the copies sharing their parameters: at step t each copy
    normalizes the batches of its ranks that hold a t-th one, concatenated; the loss each active
    rank computes, summed over all and divided by the initial world size, as DDP's Join averages.
    The state each group's ranks end with."""
    group_size = group_size or len(plan)
    models = [TwoHeads() for _ in range(len(plan) // group_size)]
    for step in range(max(map(len, plan))):
        losses = []
        for group, model in enumerate(models):
            ranks = range(group * group_size, (group + 1) * group_size)
            active = [batch(rank, step, plan[rank][step]) for rank in ranks if step < len(plan[rank])]
            if active:
                outputs = zip(*(out.split([len(y) for _, y in active]) for out in model(torch.cat([x for x, _ in active]))))
                losses += [loss_of(parts, y, len(plan)) for parts, (_, y) in zip(outputs, active)]
        (sum(losses) / len(plan)).backward()
        with torch.no_grad():
            for shared in zip(*(model.parameters() for model in models)):
                summed = sum(p.grad for p in shared if p.grad is not None)
                for parameter in shared:
                    parameter -= 0.5 * summed
                    parameter.grad = None
    return [model.state_dict() for model in models]


@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_uneven_batches_under_join_finish_and_train_as_one_process_on_what_the_active_ranks_hold(gloo_group, world_size,
                                                                                                  collective):
    plan = PLANS[world_size]
    assert_each_rank_ends_as_its_group(gloo_group(world_size).run(train_joined_on_rank, plan, collective),
                                       reference(plan), len(plan))


def assert_each_rank_ends_as_its_group(ranks: list[dict], expected: list[dict], group_size: int) -> None:
    for rank, result in enumerate(ranks):
        assert result["groups"] == {"NoneType"}, "the layers are back on their own group (WORLD, a BN group: None)"
        state, ref = result["state"], expected[rank // group_size]
        assert state.keys() == ref.keys()
        for name, value in ref.items():
            torch.testing.assert_close(state[name], value, **EXACT, msg=f"rank {rank} {name}")


GROUPED_PLANS = {  # every batch of 2 or more: a rank alone (k = 1) normalizes it; alone, a rank may hold none
    1: ((2, 2), (3,), (2, 4, 2), ()), 2: ((2, 2), (3,), (2, 4, 2), (5,)),
}


@pytest.mark.parametrize("group_size", [1, 2])
def test_bn_groups_under_join_train_as_one_process_normalizing_each_groups_active_ranks(gloo_group, group_size):
    """Pairs: a joined rank shadows its own pair's steps while its peer trains, and leaves its layers
    alone once the pair has ended while the other pair trains; alone (k = 1): no BN collective, DDP's
    own joined ranks only, and a rank that holds no batch needs no example. The running statistics
    differ between groups, by design, and the end-of-join check compares each group's only."""
    plan = GROUPED_PLANS[group_size]
    ranks = gloo_group(4).run(train_joined_on_rank, plan, "all_reduce", group_size)
    assert all(result["group_sizes"] == {group_size} for result in ranks), "the layers keep their group_size"
    assert_each_rank_ends_as_its_group(ranks, reference(plan, group_size), group_size)


def resting_layer_on_rank(plan: tuple) -> dict:
    """The body synchronized over the world; the aux head's BatchNorm alone on each rank."""
    rank, network = dist.get_rank(), convert_sync_batchnorm(TwoHeads())
    network.aux.group_size = 1
    model = DistributedDataParallel(network, broadcast_buffers=False)
    with syncbn.join(model):
        for step, size in enumerate(plan[rank]):
            x, y = batch(rank, step, size)
            loss_of(model(x), y, 3).backward()  # through both heads
        own = {name: buffer.clone() for name, buffer in network.aux.named_buffers()}
    return dict(own=own, end=dict(network.aux.named_buffers()), body=network.body[0].num_batches_tracked.item())


def test_a_joined_ranks_layer_with_no_peer_training_is_left_as_its_own_steps_left_it(gloo_group):
    for rank, result in enumerate(gloo_group(2).run(resting_layer_on_rank, ((4, 3, 5), (2,)))):
        assert result["body"] == 3, "the synchronized layers took every step"
        for name, value in result["own"].items():
            assert torch.equal(result["end"][name], value), f"rank {rank} aux {name}"
        assert result["end"]["num_batches_tracked"].item() == (3, 1)[rank]


@pytest.mark.parametrize("group_size", [1, None])
def test_an_exception_inside_the_context_leaves_the_model_as_it_was(world_of_one, group_size):
    """Also where no layer has a group to shadow (alone: nothing to twin)."""
    model = convert_sync_batchnorm(TwoHeads(), group_size=group_size)
    with pytest.raises(KeyError):
        with syncbn.join(model):
            raise KeyError("inside")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert {(layer.process_group, layer.group_size) for layer in model.modules() if isinstance(layer, SyncBatchNorm)} \
        == {(None, group_size)}


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_ddp_that_broadcasts_its_buffers_is_refused_before_anything_starts(world_of_one):
    model = DistributedDataParallel(convert_sync_batchnorm(TwoHeads()))
    with pytest.raises(ValueError, match=r"^syncbn.join: the DDP module broadcasts its buffers before every forward, "
                                         r"a collective its joined ranks cannot shadow before the layer's; build it "
                                         r"with broadcast_buffers=False"):
        with syncbn.join(model):
            pass
    assert all(layer.process_group is None for layer in model.module.modules() if isinstance(layer, SyncBatchNorm))


def test_the_layers_joinable_listed_after_another_is_refused_at_the_first_step(world_of_one):
    model = DistributedDataParallel(convert_sync_batchnorm(TwoHeads()), broadcast_buffers=False)
    joinable = syncbn.joinable(model)
    with pytest.raises(RuntimeError, match=r"^syncbn.joinable\(model\) must come first in Join's list of joinables"):
        with Join([model, joinable]):
            model(batch(0, 0, 4)[0])
    joinable.close()


def test_a_rank_that_ran_no_batch_and_has_no_example_says_so(world_of_one):
    model = convert_sync_batchnorm(TwoHeads())
    joinable = syncbn.joinable(model)
    with pytest.raises(RuntimeError, match=r"^syncbn.join: rank 0 ran no batch inside the join context and was given "
                                           r"no example, so it cannot take part in its peers' steps; pass "
                                           r"syncbn.join\(model, example=one_batch\)$"):
        joinable.shadow_step()
    joinable.close()
    assert all(layer.process_group is None for layer in model.modules() if isinstance(layer, SyncBatchNorm))


class Scaled(nn.Module):
    """Arguments beside the batch: a per-feature tensor (not a batch, though a tensor) and a flag,
    the same at every step; or, with ``branchy``, a branch chosen per step by a non-tensor argument."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.first, self.second = nn.Linear(5, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        self.double()

    def forward(self, x: torch.Tensor, scale: torch.Tensor, branch: int = 0) -> torch.Tensor:
        return (self.first if branch == 0 else self.second)(self.linear(x * scale))


SCALE = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)


def scaled_on_rank(plan: tuple, branchy: bool) -> dict:
    rank = dist.get_rank()
    model = DistributedDataParallel(convert_sync_batchnorm(Scaled()), broadcast_buffers=False,
                                    find_unused_parameters=True)  # one of the two norms is left out
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    try:
        with syncbn.join(model):
            for step, size in enumerate(plan[rank]):
                x, y = batch(rank, step, size)
                optimizer.zero_grad()
                F.cross_entropy(model(x, SCALE, step % 2 if branchy else 0), y).backward()
                optimizer.step()
    except RuntimeError as error:
        return dict(error=str(error))
    return dict(state=model.module.state_dict())


def test_arguments_beside_the_batch_are_passed_as_they_were_and_the_run_is_one_processs(gloo_group):
    """The per-feature tensor is not emptied (its length is not the batch's), the flag is kept."""
    plan = ((4, 3, 5), (2,))
    model, optimizer = Scaled(), None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        active = [batch(rank, step, sizes[step]) for rank, sizes in enumerate(plan) if step < len(sizes)]
        logits = model(torch.cat([x for x, _ in active]), SCALE)
        optimizer.zero_grad()
        parts = logits.split([len(y) for _, y in active])
        (sum(F.cross_entropy(part, y) for part, (_, y) in zip(parts, active)) / 2).backward()
        optimizer.step()
    for result in gloo_group(2).run(scaled_on_rank, plan, False):
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result["state"][name], value, **EXACT, msg=name)


def test_a_joined_rank_whose_steps_differ_from_its_peers_is_an_error_on_every_rank_not_silent(gloo_group):
    """A branch chosen per step by a non-tensor argument: the joined rank repeats its own last one,
    so its statistics go elsewhere than its peers'. Every rank ends with the error, naming why."""
    for result in gloo_group(2).run(scaled_on_rank, ((4, 3, 5, 2), (2,)), True):
        assert result["error"].startswith("syncbn.join: the ranks ended with different running statistics: a joined "
                                          "rank's steps were not its peers'")


def no_example_on_rank() -> tuple[str, float]:
    rank = dist.get_rank()
    model = DistributedDataParallel(convert_sync_batchnorm(TwoHeads()), broadcast_buffers=False)
    start = time.monotonic()
    try:
        with syncbn.join(model):
            for step in range(3 if rank == 0 else 0):
                model(batch(rank, step, 4)[0])[0].sum().backward()
    except RuntimeError as error:
        return str(error), time.monotonic() - start
    return "no error", time.monotonic() - start


@pytest.mark.processes
def test_a_joined_rank_that_cannot_take_part_says_why_and_its_peers_fail_at_once_not_at_the_timeout(capfd):
    """Rank 1 runs no batch and has no example: it says why and ends its process, and rank 0, waiting
    in the layer's collective, fails at once ("Connection closed by peer") where it would wait the
    process group's timeout (60 s here)."""
    group = GlooGroup(2, call_timeout_s=90, collective_timeout_s=60)
    group.start()
    try:
        start = time.monotonic()
        with pytest.raises(RankError, match="rank 1 died during no_example_on_rank"):
            group.run(no_example_on_rank)
        elapsed = time.monotonic() - start
    finally:
        group.close()
    assert "syncbn.join: rank 1 could not take part in its peers' step, and ends: RuntimeError: syncbn.join: rank 1 " \
           "ran no batch inside the join context and was given no example" in capfd.readouterr().err
    assert elapsed < 30, f"rank 0 waited {elapsed:.0f} s: its collective was not failed by rank 1's end"
