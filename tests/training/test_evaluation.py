"""BN groups in the trainer, and the two other evaluations of a BatchNorm network: a run of
``norm.group_size=k`` trains as the fused member that emulates its groups; PreciseBN's metrics
(``train.precise_bn``) and batch-statistics metrics (``train.batch_stats_eval``) change nothing
else, agree across world sizes, and are the plain metrics of a network without BatchNorm."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from app import compose_config, strip
from test_loop import assert_same_training, fit_and_keep_weights, fit_members, same_bits

from syncbn import precise_bn
from syncbn.training import data
from syncbn.training.config import members
from syncbn.training.members import build_network

def member_records(history: list[dict], member) -> list[dict]:
    return [r for r in history if all(r.get(key) == value for key, value in member.record().items())
            and r.get("bn_group") == member.bn_group]


GROUPED = ("train.dtype=float64", "train.epochs=2", "data.train_size=1000", "model.hidden=[20]",
           "model.weight_scale=0.05")


def test_a_run_in_bn_groups_trains_as_the_fused_member_that_emulates_its_groups(gloo_group):
    """4 ranks in groups of 2 (25 samples a rank, 50 a group) against one process's member of slices
    of 25 in groups of 2: the same accuracies, losses within 1e-9 and weights within 1e-9 (float64,
    rounding differs by ~1e-16 a step); both record 2 ranks to a group, and the run's ranks agree."""
    run = gloo_group(4).run(fit_and_keep_weights, compose_config(*GROUPED, "norm.group_size=2"))
    assert strip(run[0][0]) == strip(run[3][0])
    fused = compose_config(*GROUPED, "sweep.norms=[syncbn]", "sweep.bn_slices=[25]", "sweep.bn_groups=[2]")
    history, states = gloo_group(1).run(fit_members, fused)[0]
    whole, grouped = members(fused)
    assert (whole.bn_group, grouped.bn_slice, grouped.bn_group) == (None, 25, 2)
    assert_same_training(run[0], (member_records(history, grouped), states[1]))
    assert {r["group_size"] for r in run[0][0]} == {r["group_size"] for r in member_records(history, grouped)} == {2}
    assert {r["group_size"] for r in member_records(history, whole)} == {1}, "the whole batch of one process"
    ungrouped = gloo_group(1).run(fit_and_keep_weights, compose_config(*GROUPED))[0]
    assert_same_training(ungrouped, (member_records(history, whole), states[0]))


EVALUATIONS = (*GROUPED, "train.precise_bn=final", "train.batch_stats_eval=true")


def batch_statistics_test_accuracy(network, config, slices: int) -> float:
    """The test set in whole batches of 100 in order, each split into ``slices`` interleaved ranks'
    shares normalized on their own by their own statistics (train-mode BatchNorm), in this process."""
    images, labels = data.load(config.data)[1].tensors
    network.train()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), 100):
            for rank in range(slices):
                share = slice(start + rank, start + 100, slices)
                correct += (network(images[share].double()).argmax(1) == labels[share]).sum().item()
    return correct / len(labels)


def train_precisely(config):
    """The run's records; its final weights' test accuracy with PreciseBN statistics computed in this
    one process over the whole training set (what the run's every rank should have computed
    together), and with batch statistics; its final state."""
    history, state = fit_and_keep_weights(config)
    network = build_network(replace(config, norm=replace(config.norm, name="bn")))  # no collective here
    network.load_state_dict(state)
    batch = batch_statistics_test_accuracy(network, config, 2 if config.norm.name == "bn" else 1)
    images = data.load(config.data)[0].tensors[0].double()
    precise_bn(network, [images[start : start + 64] for start in range(0, len(images), 64)])
    labels = data.load(config.data)[1].tensors[1]
    with torch.no_grad():
        test = (network.eval()(data.load(config.data)[1].tensors[0].double()).argmax(1) == labels).double().mean()
    return history, state, test.item(), batch


@pytest.mark.parametrize("norm", ["syncbn", "bn"])
def test_precise_and_batch_metrics_are_the_final_networks_computed_in_one_process(gloo_group, norm):
    """PreciseBN after the last epoch, at 2 ranks: the test accuracy of the final weights on the
    whole training set's statistics computed in one process; batch statistics: the test set's
    batches of 100 normalized over the global batch (syncbn) or each rank's 50 (bn); the statistics
    the run trains on are left as they were (its final state holds the running ones)."""
    config = compose_config(*EVALUATIONS, f"norm={norm}")
    history, state, test, batch = gloo_group(2).run(train_precisely, config)[0]
    assert [("precise_test_acc" in r) for r in history] == [False, True], "final: the last epoch only"
    assert history[-1]["precise_test_acc"] == test
    assert history[-1]["batch_test_acc"] == batch != history[-1]["test_acc"]
    plain, plain_state = gloo_group(2).run(fit_and_keep_weights, compose_config(*GROUPED, f"norm={norm}"))[0]
    assert same_bits(state, plain_state), "weights and running statistics as without PreciseBN, to the bit"
    evaluated = {"precise_train_acc", "precise_test_acc", "batch_test_acc"}
    assert [{k: v for k, v in r.items() if k not in evaluated} for r in strip(history)] == strip(plain)


def test_every_epochs_precise_metrics_leave_training_bit_for_bit_as_it_was(gloo_group):
    config = compose_config(*GROUPED, "train.precise_bn=every_epoch", "norm.group_size=1", "train.epochs=3")
    history, state = gloo_group(2).run(fit_and_keep_weights, config)[0]
    plain, plain_state = gloo_group(2).run(fit_and_keep_weights, compose_config(*GROUPED, "norm.group_size=1",
                                                                                  "train.epochs=3"))[0]
    assert all("precise_test_acc" in r for r in history) and same_bits(state, plain_state)
    assert [{k: v for k, v in r.items() if not k.startswith("precise_")} for r in strip(history)] == strip(plain)


def test_batch_statistics_metrics_agree_across_world_sizes_and_emulation(gloo_group):
    """Batch statistics at the training span: synchronized BN at 1 and 2 ranks (the same global
    batches), per-rank BN at 2 ranks and the fused member emulating those 2 ranks' slices, give
    the same test accuracies (float64: the same predictions)."""
    syncbn = compose_config(*EVALUATIONS)
    one, two = (gloo_group(w).run(fit_and_keep_weights, syncbn)[0][0] for w in (1, 2))
    assert [r["batch_test_acc"] for r in one] == [r["batch_test_acc"] for r in two]
    per_rank = gloo_group(2).run(fit_and_keep_weights, compose_config(*EVALUATIONS, "norm=bn"))[0][0]
    emulated = compose_config(*EVALUATIONS, "sweep.norms=[bn]", "sweep.bn_slices=[50]")
    history = gloo_group(1).run(fit_members, emulated)[0][0]
    assert [r["batch_test_acc"] for r in per_rank] == [r["batch_test_acc"] for r in history]
    assert [r["batch_test_acc"] for r in per_rank] != [r["batch_test_acc"] for r in one], "another model"


def test_without_batchnorm_every_evaluation_is_the_same_accuracy(gloo_group):
    """norm=none: PreciseBN has no statistic to change and batch statistics none to use; the whole
    test set (4000 samples, 40 batches of 100) scored three ways gives one number."""
    config = compose_config(*EVALUATIONS, "sweep.norms=[none,layernorm]")
    history = gloo_group(2).run(fit_members, config)[0][0]
    for record in history[-2:]:
        assert record["precise_test_acc"] == record["batch_test_acc"] == record["test_acc"]
        assert record["precise_train_acc"] == record["train_acc"] and record["group_size"] is None
