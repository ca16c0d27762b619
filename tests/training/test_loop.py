"""The training loop on real Gloo groups: world-size invariance in float64, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from app import compose_config, read_metrics, strip
from test_compile import CANNOT_COMPILE

from syncbn.training import checkpoint, data, loop
from syncbn.training.checkpoint import CheckpointError
from syncbn.training.config import Config, members
from syncbn.distributed import DistContext
from syncbn.training.members import build_network


def this_rank() -> DistContext:
    """This Gloo group member as the trainer sees a rank: CPU, one rank per "node"."""
    rank = dist.get_rank()
    return DistContext(rank, rank, dist.get_world_size(), torch.device("cpu"))


def fit_on_rank(config: Config, run_dir: Path | None = None) -> list[dict]:
    return loop.fit(config, this_rank(), run_dir)


def fit_and_keep_weights(config: Config) -> tuple[list[dict], dict]:
    """The per-epoch metrics and the final state_dict of this rank's model."""
    training = loop.Training(config, this_rank(), None)
    return training.fit(), training.model.module.state_dict()


def loss_gap(a: list[dict], b: list[dict]) -> float:
    """The largest relative difference of two runs' training losses, epoch by epoch."""
    return max(abs(x["train_loss"] / y["train_loss"] - 1) for x, y in zip(a, b, strict=True))


def weight_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name].double() - b[name].double()).abs().max().item() for name in a)


def assert_same_training(a: tuple[list[dict], dict], b: tuple[list[dict], dict]) -> None:
    """Float64 runs that differ only in summation order: the same predictions (accuracies equal to
    the digit), losses within 1e-9 relative, final weights within 1e-9. Rounding differs by ~1e-16
    a step, so a real difference in what was trained (one sample, one statistic) is far outside."""
    (metrics_a, weights_a), (metrics_b, weights_b) = a, b
    accuracies = lambda records: [(r["train_acc"], r["test_acc"]) for r in records]  # noqa: E731
    assert accuracies(metrics_a) == accuracies(metrics_b)
    assert loss_gap(metrics_a, metrics_b) < 1e-9
    assert weight_gap(weights_a, weights_b) < 1e-9


FLOAT64 = ("train.epochs=3", "model.weight_scale=0.05", "train.dtype=float64")


def test_syncbn_trains_the_same_at_every_world_size_and_local_bn_does_not(gloo_group):
    """Float64, same seed, global batch 100: SyncBN at 1, 2 and 4 ranks trains the same model;
    plain BN at 4 ranks (25 samples per rank) does not, and one process with 4 ghost slices
    reproduces it; a rerun at the same world size is bit-identical."""
    syncbn, local_bn = compose_config(*FLOAT64), compose_config(*FLOAT64, "norm=bn")
    one = gloo_group(1).run(fit_and_keep_weights, syncbn)[0]
    two = gloo_group(2).run(fit_and_keep_weights, syncbn)
    four = gloo_group(4).run(fit_and_keep_weights, syncbn)
    assert strip(two[0][0]) == strip(two[1][0]) and strip(four[0][0]) == strip(four[3][0]), "ranks report the same metrics"
    assert weight_gap(four[0][1], four[3][1]) == 0, "ranks hold the same weights"
    for other in (two[0], four[0]):
        assert_same_training(one, other)

    bn_four = gloo_group(4).run(fit_and_keep_weights, local_bn)[0]
    assert loss_gap(one[0], bn_four[0]) > 1e-4 and weight_gap(one[1], bn_four[1]) > 1e-4, "per-rank BN is another model"
    ghost = compose_config(*FLOAT64, "norm=bn", "norm.ghost_slices=4")
    assert_same_training(bn_four, gloo_group(1).run(fit_and_keep_weights, ghost)[0])

    again = gloo_group(2).run(fit_and_keep_weights, syncbn)[0]
    assert strip(again[0]) == strip(two[0][0]) and weight_gap(again[1], two[0][1]) == 0


def plain_training(config: Config) -> tuple[list[float], dict]:
    """The textbook loop, independent of the trainer: a seeded permutation per epoch in batches of
    B, the last one short, each step the mean cross-entropy of its batch; each epoch's mean loss."""
    images, labels = data.load(config.data)[0].tensors
    torch.manual_seed(config.seed)
    network = build_network(config)
    optimizer = loop.make_optimizer(config.optim, network.parameters())
    losses, batch = [], config.train.global_batch_size
    for epoch in range(1, config.train.epochs + 1):
        order, total = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed + epoch)), 0.0
        for index in order.split(batch):
            loss = torch.nn.functional.cross_entropy(network(images[index].double()), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        losses.append(total / len(labels))
    return losses, network.state_dict()


@pytest.mark.parametrize("train_size", [203, 150])
def test_where_the_data_does_not_divide_n_ranks_still_train_like_one_process(gloo_group, train_size):
    """203 samples in batches of 100: a last global batch of 3, dealt 2 + 1 at two ranks and
    1 + 1 + 1 + 0 at four (a rank with nothing to train on still takes the step). 150: a last batch
    of 50, 13 + 13 + 12 + 12. Every sample counted once: the loss is over train_size samples."""
    config = compose_config(*FLOAT64, f"data.train_size={train_size}", "train.epochs=2")
    one = gloo_group(1).run(fit_and_keep_weights, config)[0]
    plain_losses, plain_weights = plain_training(config)
    assert loss_gap(one[0], [dict(train_loss=loss) for loss in plain_losses]) < 1e-9
    assert weight_gap(one[1], plain_weights) < 1e-9, "each step minimizes the mean loss of its own global batch"
    for world_size in (2, 4):
        ranks = gloo_group(world_size).run(fit_and_keep_weights, config)
        assert weight_gap(ranks[0][1], ranks[-1][1]) == 0, "ranks hold the same weights"
        assert_same_training(one, ranks[0])


def test_rerun_in_the_same_directory_resumes_and_resume_false_starts_over(gloo_group, tmp_path):
    fresh = gloo_group(1).run(fit_on_rank, compose_config("train.epochs=3"))[0]
    gloo_group(1).run(fit_on_rank, compose_config("train.epochs=2"), tmp_path)
    resumed = gloo_group(1).run(fit_on_rank, compose_config("train.epochs=3"), tmp_path)[0]
    assert strip(resumed) == strip(fresh)
    assert strip(read_metrics(tmp_path)) == strip(fresh)
    restarted = gloo_group(1).run(fit_on_rank, compose_config("train.epochs=1", "train.resume=false"), tmp_path)[0]
    assert strip(restarted) == strip(fresh[:1])
    assert len(read_metrics(tmp_path)) == 1


class Stop(Exception):
    """Raised from inside training: the run stops there, as a killed process would."""


def train_until(config: Config, run_dir: Path, steps: int | None) -> tuple[list[dict], dict]:
    """Train on this rank, stopping after ``steps`` optimizer steps (None: to the end); the metrics
    and final weights of a run that ends."""
    training = loop.Training(config, this_rank(), run_dir)
    step, taken = training.optimizer.step, []

    def step_then_maybe_stop(*args, **kwargs):
        step(*args, **kwargs)
        taken.append(1)
        if len(taken) == steps:
            raise Stop

    training.optimizer.step = step_then_maybe_stop
    try:
        return training.fit(), training.model.module.state_dict()
    except Stop:
        return [], {}


def same_bits(a: dict, b: dict) -> bool:
    """Bit for bit, NaN included (a frozen diverged member may hold some)."""
    return a.keys() == b.keys() and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


# A fused sweep of 4 networks, one of which (no norm, scale 1) diverges in epoch 1 and is frozen.
SWEEP = ("sweep.norms=[syncbn,none]", "sweep.weight_scales=[1.0,0.05]", "norm.eps=1e-6", "model.hidden=[100,100,100,100,100]")


@pytest.mark.parametrize(("optimizer", "world_size"), [
    (["optim.momentum=0.9"], 1), (["optim=adam", "optim.lr=0.001"], 1), (["optim.momentum=0.9", *SWEEP], 2),
], ids=["sgd-momentum", "adam", "fused-sweep-2-ranks"])
def test_a_run_stopped_mid_epoch_resumes_bit_exactly_with_dropout_and_optimizer_state(gloo_group, tmp_path, optimizer,
                                                                                     world_size):
    """Stopped after step 14 of 20 (epoch 2, step 4; the checkpoint is at step 12), resumed in a new
    Training: the metrics and weights of the run never stopped. Dropout draws from the global RNG,
    SGD momentum and Adam keep state: every one must be restored exactly; so must a fused sweep's
    per-member loss sums and its frozen member."""
    overrides = ("train.epochs=2", "train.checkpoint_every_steps=3", "model.dropout=0.2", "model.hidden=[50,50]", *optimizer)
    config = compose_config(*overrides)
    (tmp_path / "reference").mkdir()
    (tmp_path / "stopped").mkdir()
    group = gloo_group(world_size)
    reference = group.run(train_until, config, tmp_path / "reference", None)[0]
    assert group.run(train_until, config, tmp_path / "stopped", 14)[0] == ([], {})
    resumed = group.run(train_until, config, tmp_path / "stopped", None)[0]
    assert strip(resumed[0]) == strip(reference[0])
    assert same_bits(resumed[1], reference[1])
    if "sweep.norms=[syncbn,none]" in optimizer:
        assert [(r["norm"], r["weight_scale"], r["epoch"]) for r in reference[0] if r["diverged"]] == [("none", 1.0, 1)]


def test_checkpointing_mid_epoch_changes_no_metric(gloo_group, tmp_path):
    """The group's partial loss sums go into each mid-epoch checkpoint and are counted once at the
    epoch's end: 2 ranks saving every 3 steps train and report bit for bit as ranks that never save."""
    overrides = ("train.epochs=2", "model.hidden=[50,50]", "optim.momentum=0.9", *SWEEP)
    never = gloo_group(2).run(train_until, compose_config(*overrides, "train.checkpoint_every_steps=null"), tmp_path, None)[0]
    (tmp_path / "saving").mkdir()
    saving = gloo_group(2).run(train_until, compose_config(*overrides, "train.checkpoint_every_steps=3"),
                               tmp_path / "saving", None)[0]
    assert strip(saving[0]) == strip(never[0]) and same_bits(saving[1], never[1])


def fit_members(config: Config, run_dir: Path | None = None) -> tuple[list[dict], list[dict]]:
    """A fused job's metrics and each member's final state as the standalone network's state_dict."""
    training = loop.Training(config, this_rank(), run_dir)
    history, fused = training.fit(), training.model.module
    return history, [fused.member_network(index).state_dict() for index in range(len(fused.members))]


def member_records(history: list[dict], member) -> list[dict]:
    return [r for r in history if (r["norm"], r["weight_scale"], r["seed"]) == (member.norm, member.weight_scale, member.seed)]


FUSED = ("train.dtype=float64", "train.epochs=2", "norm.eps=1e-6", "sweep.norms=[syncbn,none]")


def test_a_fused_sweep_trains_every_member_as_its_own_run_does(gloo_group):
    """Float64, 2 ranks: 2 scales x {syncbn, none} as one job against the four runs one by one: the
    same accuracies, losses and final weights within 1e-9 (rounding differs by ~1e-16 a step)."""
    config = compose_config(*FUSED, "sweep.weight_scales=[0.2928644564625237,0.05]")
    history, states = gloo_group(2).run(fit_members, config)[0]
    for member, state in zip(members(config), states, strict=True):
        single = compose_config(*FUSED[:3], f"norm={member.norm}", f"model.weight_scale={member.weight_scale}")
        assert_same_training((member_records(history, member), state), gloo_group(2).run(fit_and_keep_weights, single)[0])


def test_a_member_that_diverges_is_frozen_and_changes_nothing_for_the_others(gloo_group, tmp_path):
    """No norm at scale 1 diverges in epoch 1 (its loss overflows): recorded once, then held as it was,
    in the run where it diverged and through a resume, while scale 0.29 trains on exactly as it
    does alone (float64, 1e-9)."""
    config = compose_config(*FUSED, "sweep.norms=[none]", "sweep.weight_scales=[1.0,0.2928644564625237]", "train.epochs=1")
    after_divergence = gloo_group(2).run(fit_members, config, tmp_path)[0][1]
    more = compose_config(*FUSED, "sweep.norms=[none]", "sweep.weight_scales=[1.0,0.2928644564625237]", "train.epochs=3")
    history, states = gloo_group(2).run(fit_members, more, tmp_path)[0]
    diverging, learning = members(more)
    assert [(r["epoch"], r["diverged"]) for r in member_records(history, diverging)] == [(1, True)]
    assert same_bits(states[0], after_divergence[0]), "frozen: not one bit changed since it diverged"
    assert same_bits(gloo_group(2).run(fit_members, more)[0][1][0], after_divergence[0]), "frozen without a resume too"
    single = compose_config(*FUSED[:3], "norm=none", "model.weight_scale=0.2928644564625237", "train.epochs=3")
    assert_same_training((member_records(history, learning), states[1]), gloo_group(2).run(fit_and_keep_weights, single)[0])


def evaluate_with_skewed_statistics(config: Config) -> tuple[float, dict]:
    """Train, then shift rank 1's BatchNorm running means far off and evaluate: the test accuracy,
    and the weights and statistics rank 0 holds."""
    training = loop.Training(config, this_rank(), None)
    training.fit()
    if dist.get_rank() == 1:
        with torch.no_grad():
            for module in training.model.module.modules():
                if isinstance(module, torch.nn.BatchNorm1d):
                    module.running_mean.add_(5.0)
    loss_sum_and_samples = torch.tensor([0.0, 1.0], dtype=torch.float64)  # any: only the accuracy is read
    return training.evaluate(loss_sum_and_samples)[0]["test_acc"], training.model.module.state_dict()


def test_per_rank_batchnorm_is_evaluated_everywhere_with_rank_0s_statistics(gloo_group):
    """As DDP's buffer broadcast makes it in training: the whole test set, sharded over 2 ranks, is
    scored as rank 0's network scores it alone (float64, so shard shapes change no prediction)."""
    config = compose_config("norm=bn", "train.epochs=1", "model.hidden=[20]", "train.dtype=float64")
    (accuracy, state), (other, _) = gloo_group(2).run(evaluate_with_skewed_statistics, config)
    network = build_network(config)
    network.load_state_dict(state)
    images, labels = data.load(config.data)[1].tensors
    with torch.no_grad():
        alone = (network.eval()(images.double()).argmax(1) == labels).double().mean().item()
    assert accuracy == other == alone


def first_batches(config: Config) -> list[torch.Tensor]:
    """The labels of the first batch of every epoch that ``fit`` trains on."""
    training = loop.Training(config, this_rank(), None)
    labels, deal, seen = training.train_set.tensors[1], training.batches.epoch, []

    def recording(epoch: int) -> list[torch.Tensor]:
        batches = deal(epoch)
        seen.append(labels[batches[0]])
        return batches

    training.batches.epoch = recording
    training.fit()
    return seen


def test_every_epoch_draws_a_new_order_of_the_training_set(gloo_group):
    """The permutation for seed + epoch: a new one each epoch, the same in every run."""
    config = compose_config("train.epochs=2", "data.train_size=200", "model.hidden=[20]", "seed=3")
    seen = gloo_group(1).run(first_batches, config)[0]
    labels = data.load(config.data)[0].tensors[1]
    expected = [labels[torch.randperm(200, generator=torch.Generator().manual_seed(3 + epoch))[:100]] for epoch in (1, 2)]
    assert not torch.equal(seen[0], seen[1])
    assert all(torch.equal(got, want) for got, want in zip(seen, expected, strict=True))


def start_from(config: Config, run_dirs: list[Path]) -> str:
    """Start training on this rank from its own run directory; the error, if the ranks refuse."""
    try:
        loop.Training(config, this_rank(), run_dirs[dist.get_rank()])
    except CheckpointError as error:
        return str(error)
    return "started"


def test_ranks_that_would_resume_different_states_all_stop_with_one_message(gloo_group, tmp_path):
    """Each node reading its own copy of the run directory (no shared filesystem): rank 0 finds the
    checkpoint, rank 1 does not. Both stop before training, saying where each stood."""
    config = compose_config("train.epochs=1", "data.train_size=200", "model.hidden=[20]")
    shared, other = tmp_path / "shared", tmp_path / "other"
    shared.mkdir()
    other.mkdir()
    gloo_group(2).run(fit_on_rank, config, shared)
    more = compose_config("train.epochs=2", "data.train_size=200", "model.hidden=[20]")
    assert gloo_group(2).run(start_from, more, [shared, shared]) == ["started", "started"]
    messages = gloo_group(2).run(start_from, more, [shared, other])
    assert messages[0] == messages[1] and messages[0].startswith(
        "the ranks did not resume the same state (rank 0 at epoch 2, step 0, rank 1 at epoch 1, step 0)")


def test_ranks_in_the_same_epoch_at_different_steps_all_stop_naming_both_steps(gloo_group, tmp_path):
    """One node's copy of the directory was saved 3 steps later than the other's, in the same epoch."""
    config = compose_config("train.epochs=1", "model.hidden=[20]", "train.checkpoint_every_steps=3")
    for name, steps in (("early", 4), ("late", 7)):
        (tmp_path / name).mkdir()
        gloo_group(2).run(train_until, config, tmp_path / name, steps)
    messages = gloo_group(2).run(start_from, config, [tmp_path / "early", tmp_path / "late"])
    assert messages[0] == messages[1] and messages[0].startswith(
        "the ranks did not resume the same state (rank 0 at epoch 1, step 3, rank 1 at epoch 1, step 6):")


def test_ranks_at_the_same_step_with_different_weights_all_stop_naming_the_weights(gloo_group, tmp_path):
    """Each node holds a checkpoint of the same epoch and step, one with a weight changed in its last
    bit: the weights' digest differs, so both stop before training."""
    config = compose_config("train.epochs=1", "data.train_size=200", "model.hidden=[20]")
    shared, other = tmp_path / "shared", tmp_path / "other"
    shared.mkdir()
    other.mkdir()
    gloo_group(2).run(fit_on_rank, config, shared)
    state = checkpoint.load(shared)
    weight = next(iter(state["model"].values()))
    weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(1.0))
    checkpoint.save(other, state)
    more = compose_config("train.epochs=2", "data.train_size=200", "model.hidden=[20]")
    messages = gloo_group(2).run(start_from, more, [shared, other])
    assert messages[0] == messages[1] == (
        "the ranks did not resume the same state (rank 0 at epoch 2, step 0, rank 1 at epoch 2, step 0, with different "
        "weights): every node must see the same run directory (hydra.run.dir on a shared filesystem)")


def fit_compiled(config: Config) -> tuple[list[dict], dict, int, int]:
    """``fit_and_keep_weights``, and what dynamo traced: the calls it captured into graphs, and the
    network's leaf modules (layers)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    training = loop.Training(config, this_rank(), None)
    history = training.fit()
    layers = sum(1 for module in training.model.module.modules() if not list(module.children()))
    return history, training.model.module.state_dict(), torch._dynamo.utils.counters["stats"]["calls_captured"], layers


@pytest.mark.skipif(CANNOT_COMPILE is not None, reason=CANNOT_COMPILE or "")
def test_a_compiled_run_trains_the_same_as_eager(gloo_group):
    """train.compile=true at 2 ranks, float64: the eager run's accuracies, losses and weights (1e-9),
    and the whole network in the graphs, not only the frames of user code (each SyncBatchNorm)."""
    eager = gloo_group(2).run(fit_and_keep_weights, compose_config(*FLOAT64[1:], "train.epochs=2"))[0]
    *compiled, captured, layers = gloo_group(2).run(
        fit_compiled, compose_config(*FLOAT64[1:], "train.epochs=2", "train.compile=true"))[0]
    assert_same_training(eager, tuple(compiled))
    assert captured >= layers, f"dynamo captured {captured} calls for a network of {layers} layers"


def member_states(model) -> list[dict]:
    return [model.member_network(index).state_dict() for index in range(len(model.members))]


BLOCKS = {  # layernorm 0-1, bn 2-3, none 4-5; the CNN's bn in two blocks of slices, 2-3 and 4-5, none 6-7
    "mlp": ("model.hidden=[20,30]",),
    "cnn": ("model=cnn", "model.hidden=[4,6]", "sweep.bn_slices=[4,2]"),
}


@pytest.mark.parametrize("model,frozen", [("mlp", [3]), ("mlp", [0, 5]), ("mlp", [2, 3, 4]), ("cnn", [3]),
                                          ("cnn", [0, 5]), ("cnn", [2, 4, 5, 7])])
def test_frozen_members_get_back_their_own_rows_in_every_norm_block_and_no_one_else_does(model, frozen):
    """Members laid out in norm blocks: a diverged member in a later block is held by its row within
    that block's tensors, and only it; in the CNN too, with blocks of per-rank BN slices."""
    config = compose_config("sweep.norms=[layernorm,bn,none]", "sweep.weight_scales=[0.1,0.02]", *BLOCKS[model],
                            "train.dtype=float64")
    model = build_network(config)
    before = member_states(model)
    held = loop.FrozenMembers(model, frozen, len(model.members))
    with torch.no_grad():
        for tensor, _ in model.member_tensors():
            tensor.add_(1)
    held.restore()
    for index, (now, then) in enumerate(zip(member_states(model), before, strict=True)):
        held = [key for key in now if now[key].is_floating_point()]  # not BN's shared batch counter
        changed = {key for key in held if not torch.equal(now[key], then[key])}
        assert changed == (set() if index in frozen else set(held)), index


@pytest.mark.parametrize("frozen", [[], [0, 1, 2, 3]])
def test_with_no_member_or_every_member_diverged_nothing_is_held(frozen):
    """None diverged: every member trains; all diverged: training stops, so nothing is put back."""
    config = compose_config("sweep.norms=[bn,none]", "sweep.weight_scales=[0.1,0.02]", "model.hidden=[20]")
    model = build_network(config)
    held = loop.FrozenMembers(model, frozen, len(model.members))
    with torch.no_grad():
        for tensor, _ in model.member_tensors():
            tensor.add_(1)
    after = [tensor.clone() for tensor, _ in model.member_tensors()]
    held.restore()
    assert all(torch.equal(tensor, kept) for (tensor, _), kept in zip(model.member_tensors(), after, strict=True))
