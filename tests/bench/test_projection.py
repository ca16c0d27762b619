"""The ResNet-50 projection: each contender's payloads, the layers it sums, and the CSV in docs/
being what it computes."""

import csv

import pytest
from app import ROOT

from syncbn.bench.projection import (CONTENDERS, WORLD_SIZES, layer_step_seconds, projection, resnet50_channels, table,
                                     write)
from syncbn.cost import NCCL, Algorithm, CostModel

# Every byte a rank receives costs a second, nothing else: the contenders' payloads, counted.
BYTES = CostModel(all_gather=(Algorithm("ring_gather", alpha=0.0, beta=1.0),),
                  all_reduce=(Algorithm("ring_reduce", alpha=0.0, beta=1.0),))


def test_resnet50_has_53_batchnorms_from_64_to_2048_channels():
    channels = resnet50_channels()
    assert len(channels) == 53 and channels[0] == 64 and max(channels) == 2048 and sum(channels) == 26560


@pytest.mark.parametrize("contender,expected", [
    ("syncbn all_gather", 3 * (9 * 8 + 8 * 4)),  # W - 1 = 3 copies of (2C + 1) float64 and 2C float32
    ("syncbn all_reduce", 1.5 * (9 * 8 + 8 * 4)),  # 2 (W - 1) / W of each
    ("torch SyncBatchNorm", 3 * 9 * 4 + 1.5 * 8 * 4),  # (2C + 1) float32 gathered, 2C float32 reduced
])
def test_each_contender_moves_its_own_payloads(contender, expected):
    assert layer_step_seconds(BYTES, contender, 4, 4) == expected


def test_auto_is_each_layers_cheaper_collective():
    for world_size in (8, 16, 1024):
        for channels in (64, 2048):
            both = [layer_step_seconds(NCCL, f"syncbn {c}", world_size, channels) for c in ("all_gather", "all_reduce")]
            assert layer_step_seconds(NCCL, "syncbn auto", world_size, channels) == min(both)


def test_the_csv_and_figure_in_docs_are_what_the_projection_computes(tmp_path):
    rows = projection()
    assert [r["world_size"] for r in rows] == WORLD_SIZES == [8 * 2**k for k in range(10)]
    write(rows, tmp_path)
    assert (tmp_path / "collective_projection.png").stat().st_size > 0
    ours = (tmp_path / "collective_projection.csv").read_text()
    assert ours == (ROOT / "docs" / "collective_projection.csv").read_text()
    read = list(csv.DictReader(ours.splitlines()))
    assert [int(r["world_size"]) for r in read] == WORLD_SIZES and list(read[0]) == ["world_size", *CONTENDERS]


def test_the_table_gives_each_contender_and_the_ratios_to_the_all_reduce():
    rows = [dict(world_size=8, **{"syncbn all_gather": 3.0, "syncbn all_reduce": 2.0, "syncbn auto": 2.0,
                                  "torch SyncBatchNorm": 5.0})]
    assert table(rows).splitlines()[-1] == "| 8 | 3.00 | 2.00 | 2.00 | 5.00 | 1.5 | 2.5 |"
