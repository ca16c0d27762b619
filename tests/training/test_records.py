"""The epoch's line for a job of many members: accuracy ranges over those training, and who
diverged, each named so that no two members read alike."""

from syncbn.training.records import epoch_summary


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
