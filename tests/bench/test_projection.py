"""The ResNet-50 projection: each contender's payloads, the layers it sums, the CSV in docs/ being
what it computes, and its command line."""

import csv

import pytest
from app import ROOT

from syncbn.bench.projection import (CONTENDERS, GPUS_PER_NODE, WORLD_SIZES, crossover, layer_step_seconds, main,
                                     projection, resnet50_channels, summary, table, write)
from syncbn.cost import NCCL, Algorithm, CostModel

# Every byte a rank receives costs a second, nothing else: the contenders' payloads, counted.
BYTES = CostModel(all_gather=(Algorithm("ring_gather", alpha=0.0, beta=1.0),),
                  all_reduce=(Algorithm("ring_reduce", alpha=0.0, beta=1.0),))


def test_resnet50_has_53_batchnorms_from_64_to_2048_channels():
    channels = resnet50_channels()
    assert len(channels) == 53 and channels[0] == 64 and max(channels) == 2048 and sum(channels) == 26560


@pytest.mark.parametrize("contender,expected", [
    ("syncbn all_gather", 3 * (9 * 8 + 8 * 8)),  # W - 1 = 3 copies of (2C + 1) and 2C float64
    ("syncbn all_reduce", 1.5 * (9 * 8 + 8 * 8)),  # 2 (W - 1) / W of each
    ("syncbn all_reduce compiled", 1.5 * (9 * 8 + 2 * 8 * 8)),  # and the 2C moments again
    ("torch SyncBatchNorm", 3 * 9 * 4 + 1.5 * 8 * 4),  # (2C + 1) float32 gathered, 2C float32 reduced
])
def test_each_contender_moves_its_own_payloads(contender, expected):
    assert layer_step_seconds(BYTES, contender, 4, 4) == expected


@pytest.mark.parametrize("world_size", [8, 16, 1024])
def test_bn_groups_of_8_cost_what_the_layer_costs_at_8_gpus_whatever_the_world(world_size):
    """Each group synchronizes on its own, all at once: the step costs one group's collectives."""
    for channels in (64, 2048):
        assert layer_step_seconds(NCCL, "syncbn auto, groups of 8", world_size, channels) == \
            layer_step_seconds(NCCL, "syncbn auto", 8, channels)
    assert layer_step_seconds(BYTES, "syncbn auto, groups of 8", 4, 4) == layer_step_seconds(BYTES, "syncbn auto", 4, 4)


def test_auto_is_each_layers_cheaper_collective():
    for world_size in (8, 16, 1024):
        for channels in (64, 2048):
            both = [layer_step_seconds(NCCL, f"syncbn {c}", world_size, channels) for c in ("all_gather", "all_reduce")]
            assert layer_step_seconds(NCCL, "syncbn auto", world_size, channels) == min(both)


def test_the_csv_and_figure_in_docs_are_what_the_projection_computes(tmp_path):
    rows = projection()
    assert [(r["gpus_per_node"], r["world_size"]) for r in rows] == [(g, w) for g in GPUS_PER_NODE for w in WORLD_SIZES]
    assert WORLD_SIZES == [8 * 2**k for k in range(10)] and GPUS_PER_NODE == (1, 8)
    write(rows, tmp_path / "new")
    assert (tmp_path / "new" / "collective_projection.png").stat().st_size > 0
    ours = (tmp_path / "new" / "collective_projection.csv").read_text()
    assert ours == (ROOT / "docs" / "collective_projection.csv").read_text()
    read = list(csv.DictReader(ours.splitlines()))
    assert len(read) == 20 and list(read[0]) == ["gpus_per_node", "world_size", *CONTENDERS]


def test_the_table_gives_each_contender_and_the_ratios_to_the_all_reduce():
    rows = [dict(gpus_per_node=8, world_size=8, **{"syncbn all_gather": 3.0, "syncbn all_reduce": 2.0,
                                                    "syncbn all_reduce compiled": 2.5, "syncbn auto": 2.0,
                                                    "torch SyncBatchNorm": 5.0, "syncbn auto, groups of 8": 2.0})]
    assert table(rows).splitlines()[-1] == "| 8 | 8 | 3.00 | 2.00 | 2.50 | 2.00 | 5.00 | 2.00 | 1.5 | 2.5 |"


def test_the_summary_gives_the_crossover_and_the_1024_gpu_ratios_over_the_gpus_a_node():
    def row(per_node, world_size, gather, reduce, torch_ms):
        return {"gpus_per_node": per_node, "world_size": world_size, "syncbn all_gather": gather,
                "syncbn all_reduce": reduce, "torch SyncBatchNorm": torch_ms, "syncbn auto": min(gather, reduce),
                "syncbn auto, groups of 8": 0.25}

    rows = [row(1, 8, 1.0, 2.0, 1.0), row(1, 16, 3.0, 2.0, 1.0), row(1, 1024, 40.0, 2.0, 20.0),
            row(8, 16, 1.0, 1.0, 1.0), row(8, 32, 3.0, 1.0, 1.0), row(8, 1024, 30.0, 1.0, 12.0)]
    assert crossover(rows, 1) == 16 and crossover(rows, 8) == 32 and crossover(rows[:1], 1) is None
    assert summary(rows) == ("all-reduce cheaper than the all-gather from 16 GPUs at 1 a node, 32 GPUs at 8 a node; "
                             "at 1024 GPUs it is 20.0-30.0x cheaper than our all-gather and 10.0-12.0x than torch's "
                             "SyncBatchNorm; BN groups of 8 inside a node (8 GPUs a node) cost 0.25 ms a step at 1024 "
                             "GPUs, against 1.00 ms synchronizing the whole world (4.0x)")


def test_the_command_writes_where_it_is_told_and_refuses_a_file_for_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert (tmp_path / "outputs" / "projection" / "collective_projection.csv").is_file()
    assert "cheaper than our all-gather" in capsys.readouterr().out
    (tmp_path / "a-file").write_text("")
    assert main(["--out", "a-file"]) == 2
    assert capsys.readouterr().err == "error: --out a-file is a file, not a folder\n"
