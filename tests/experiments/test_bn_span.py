"""The study read against the BN span and with its three evaluations: which rows make each curve,
and the tables docs/batch-size-study.md quotes."""

from __future__ import annotations

from syncbn.experiments import bn_span


def row(norm: str, b: int, world: int, group: int | None, span: int | None, seed: int, test: float, **evaluations) -> dict:
    return dict(model="mlp", norm=norm, per_device_batch=b, world_size=world, group_size=group, bn_span=span, seed=seed,
                final_test_acc=test, **evaluations)


ROWS = [
    row("syncbn", 64, 1, 1, 64, 0, 0.9), row("bn", 64, 1, 1, 64, 0, 0.9),  # W = 1: one member, two rows
    row("syncbn", 2, 32, 32, 64, 0, 0.91), row("syncbn", 2, 32, 32, 64, 1, 0.93),
    row("syncbn", 2, 32, 4, 8, 0, 0.80), row("syncbn", 2, 32, 4, 8, 1, 0.84),
    row("bn", 2, 32, 1, 2, 0, 0.30), row("bn", 2, 32, 1, 2, 1, 0.34),
    row("bn", 8, 8, 1, 8, 0, 0.81), row("bn", 8, 8, 1, 8, 1, 0.83),
    row("layernorm", 2, 32, None, None, 0, 0.5), dict(row("bn", 2, 32, 1, 2, 0, 0.6), model="cnn"),
]


def test_each_per_device_batch_is_a_curve_of_its_spans_one_value_per_seed():
    assert bn_span.span_curves(ROWS, "mlp") == {64: {64: [0.9]}, 2: {64: [0.91, 0.93], 8: [0.80, 0.84], 2: [0.30, 0.34]},
                                                8: {8: [0.81, 0.83]}}
    assert bn_span.has_groups(ROWS, "mlp") and not bn_span.has_groups(ROWS, "cnn")


def test_the_span_table_has_a_row_per_model_with_groups_and_per_device_batch():
    assert bn_span.span_table(ROWS).splitlines() == [
        "| model | b | BN span: test accuracy, mean (seeds' range) |", "|---|---|---|",
        "| mlp | 2 | 2: 0.320 (0.300-0.340), 8: 0.820 (0.800-0.840), 64: 0.920 (0.910-0.930) |",
        "| mlp | 8 | 8: 0.820 (0.810-0.830) |",
        "| mlp | 64 | 64: 0.900 (0.900-0.900) |"]
    assert bn_span.span_table([r for r in ROWS if r["group_size"] in (1, 32, None)]) == "", "no groups, no table"


EVALUATED = [dict(row("bn", b, 64 // b, 1, b, seed, test), final_train_acc=train, final_precise_test_acc=precise,
                  final_batch_test_acc=batch)
             for b, seed, train, test, precise, batch in [(2, 0, 0.5, 0.2, 0.45, 0.48), (2, 1, 0.7, 0.4, 0.55, 0.52),
                                                         (8, 0, 0.99, 0.9, 0.91, 0.92)]]


def test_per_rank_bn_is_read_three_ways_beside_its_training_accuracy_and_groups_stay_apart():
    grouped = dict(EVALUATED[0], norm="syncbn", group_size=4, world_size=32, final_test_acc=0.0)
    found = bn_span.evaluations([*EVALUATED, grouped], "mlp", "bn")
    assert found["final_precise_test_acc"] == {2: [0.45, 0.55], 8: [0.91]}
    assert bn_span.evaluations([*EVALUATED, grouped], "mlp", "syncbn") == {}, "a BN group is not synchronized BN"
    assert bn_span.evaluation_table(EVALUATED).splitlines() == [
        "| model | norm | b | training set, running statistics | test, running statistics | test, PreciseBN statistics | "
        "test, batch statistics |", "|---|---|---|---|---|---|---|",
        "| mlp | bn | 8 | 0.990 (0.990-0.990) | 0.900 (0.900-0.900) | 0.910 (0.910-0.910) | 0.920 (0.920-0.920) |",
        "| mlp | bn | 2 | 0.600 (0.500-0.700) | 0.300 (0.200-0.400) | 0.500 (0.450-0.550) | 0.500 (0.480-0.520) |"]
    assert bn_span.evaluation_table(ROWS) == "", "without PreciseBN and batch statistics, no table"
