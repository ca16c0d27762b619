"""The epoch's line for a job of many members: accuracy ranges over those training, and who
diverged, each named so that no two members read alike."""

import logging

from syncbn.training.records import epoch_summary, log_epoch


def record(norm: str, scale: float, seed: int, train_acc: float, test_acc: float, diverged: bool = False, **names) -> dict:
    return dict(norm=norm, weight_scale=scale, seed=seed, **names, epoch=3, train_acc=train_acc, test_acc=test_acc,
                diverged=diverged, seconds=1.234)


def test_a_summary_gives_the_ranges_and_medians_of_the_members_still_training_and_names_the_diverged():
    records = [record("syncbn", 0.1, 0, 0.5, 0.4), record("none", 1.0, 0, 0.1, 0.1, diverged=True),
               record("bn", 0.1, 1, 0.9, 0.8, bn_slice=4), record("bn", 0.1, 1, 0.2, 0.1, diverged=True, bn_slice=2),
               record("layernorm", 0.1, 0, 0.7, 0.6)]
    assert epoch_summary(records, 8) == (
        "epoch 3/8  5 networks  train_acc 0.500-0.900 (median 0.700)  test_acc 0.400-0.800 (median 0.600)"
        "  diverged, frozen: none scale 1 seed 0, bn slice 2 scale 0.1 seed 1  (1.23s)")


def test_a_summary_of_members_that_all_diverged_has_no_ranges():
    assert epoch_summary([record("none", 1.0, 2, 0.1, 0.1, diverged=True)], 8) == (
        "epoch 3/8  1 networks  diverged, frozen: none scale 1 seed 2  (1.23s)")


def test_members_of_bn_groups_are_named_by_slice_and_group():
    records = [record("syncbn", 0.1, 0, 0.1, 0.1, diverged=True, bn_slice=4, bn_group=2),
               record("syncbn", 0.1, 0, 0.1, 0.1, diverged=True, bn_slice=4, bn_group=8)]
    assert epoch_summary(records, 8).endswith(
        "diverged, frozen: syncbn slice 4 group 2 scale 0.1 seed 0, syncbn slice 4 group 8 scale 0.1 seed 0  (1.23s)")


def test_a_single_runs_line_has_the_evaluations_it_was_asked_for(caplog):
    plain = dict(record("syncbn", 0.1, 0, 0.5, 0.4), train_loss=1.5)
    with caplog.at_level(logging.INFO, logger="syncbn.training.records"):
        log_epoch([plain], 8, 1)
        log_epoch([dict(plain, batch_test_acc=0.3, precise_train_acc=0.6, precise_test_acc=0.45)], 8, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 3/8  train_acc 0.5000  test_acc 0.4000  train_loss 1.5000  (1.23s)",
        "epoch 3/8  train_acc 0.5000  test_acc 0.4000  batch_test_acc 0.3000  precise_train_acc 0.6000  "
        "precise_test_acc 0.4500  train_loss 1.5000  (1.23s)"]
