"""The benchmark harness end to end on a tiny case: every field of its JSON, not the times."""

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import torch
import torch.distributed as dist
from app import why_not_compiled

from syncbn.bench.cases import bench_layer, bench_step
from syncbn.bench.cli import main, parse_args
from syncbn.bench.settings import STUDY_GLOBAL_BATCH, Settings
from syncbn.bench.study import study_cases, study_commands
from syncbn.bench.sweep import sweep_commands, timed
from syncbn.bench.minimum import MinimumSyncBatchNorm
from syncbn.bench.tables import collective_table
from syncbn.cost import GLOO, Algorithm, CostModel
from syncbn.counting import count_collectives
from syncbn.distributed import DistContext

COMPILES = why_not_compiled() is None  # else the compiled contenders are left out, as a user must ask

TINY = ["--quick", "--world-sizes", "2", "--shapes", "(25,100)", "--step-norms", "syncbn", "--sweep-scales", "1",
        "--sweep-epochs", "1", "--warmup", "1", "--calls", "2", "--per-run-world-sizes", "--study-models", "mlp",
        "--study-norms", "bn", "--study-batches", "64", "--study-epochs", "1", "--collective-channels", "16"]


def test_quick_mode_writes_every_figure_and_prints_only_tables(tmp_path, capfd):
    """Without the compiled contenders (their first compile in new processes would double this
    test's time): the next test times them, on the session's Gloo group."""
    out = tmp_path / "bench.json"
    main([*TINY, "--out", str(out), "--no-compile"])
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m syncbn.bench --quick")
    assert {"cpu", "cores", "torch", "python", "cuda"} <= report["machine"].keys()
    assert report["backend"] == "gloo" and report["settings"]["calls"] == 2
    by_case = {}
    for result in report["results"]:
        by_case.setdefault(result["case"], []).append(result)
    [layer] = by_case["layer"]
    assert layer["world_size"] == 2 and layer["shape"] == "(25,100)"
    floors = {"floor_allgather", "floor_allreduce", "bn_with_gathers", "bn_inside_gathers", "floor_again", "sync_minimum"}
    assert layer["seconds"].keys() == {"syncbn", "local_bn"} | floors
    assert layer["compile_seconds"] == {}
    assert all(len(samples) == 2 and min(samples) > 0 for samples in layer["seconds"].values())
    assert layer["collectives"] == {"c10d::_allgather_base_": 2}, "one all-gather each way"
    [step] = by_case["step"]
    assert step["collectives"] == {"c10d::_allgather_base_": 10, "c10d::allreduce_": 1}, "2 per norm layer + DDP's bucket"
    assert step["seconds"].keys() == {"eager"}
    assert all(len(samples) == 2 for samples in step["seconds"].values())
    assert step["compile_seconds"] is None
    [startup] = by_case["startup"]
    assert startup["world_size"] == 2 and startup["first_seconds"] > 0
    assert len(startup["seconds"]) == 1 and len(startup["spawn_seconds"]) == 2 and min(startup["spawn_seconds"]) > 0
    assert [(r["mode"], r["world_size"]) for r in by_case["sweep"]] == [("fused", 2)]
    assert all(r["seconds"] > 0 and r["plain_seconds"] > 0 and r["networks"] == 2 for r in by_case["sweep"])
    [study] = by_case["study"]
    assert (study["rows"], study["epochs"]) == (1, 1) and len(study["each_seconds"]) == 2
    assert study["seconds"] == sum(study["each_seconds"]) / 2 and min(study["each_seconds"]) > 0 and study["per_run_seconds"] > 0
    [collective] = by_case["collective"]
    assert (collective["world_size"], collective["channels"], collective["chosen"]) == (2, 16, GLOO.choose(2, 16))
    assert collective["seconds"].keys() == collective["received_bytes"].keys() == {"all_gather", "all_reduce"}
    assert all(len(samples) == 2 and min(samples) > 0 for samples in collective["seconds"].values())
    printed, errors = capfd.readouterr()  # file descriptors 1 and 2, the ranks' included
    assert "| world | shape | syncbn ms" in printed and "| world | norm | eager ms per step" in printed
    assert "| world | shape | floor | floor ms | syncbn / floor | floor again / floor | least sync BN / floor |" in printed and "sweep command s" in printed
    assert "| fused | 2 | 2 x 1 |" in printed
    assert "| rows x epochs | fused command s (mean of 2) | per-run command s | fused / per-run |" in printed
    assert f"| 1 x 1 | {study['seconds']:.1f} | {study['per_run_seconds']:.1f} |" in printed
    assert "| world | channels | all-gather ms | all-reduce ms |" in printed and "| 2 | 16 |" in printed
    assert "| fitted to this run | latency us per call | alpha us per round |" in printed
    assert "profiler_st" not in printed + errors, "the profiler's own notices stay out of the user's terminal"


def compiled_cases_on_rank() -> list[dict]:
    settings = Settings(warmup=1, calls=2, compile=True)
    ctx = DistContext(dist.get_rank(), dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    return [bench_layer("(25,100)", settings, ctx), bench_step("syncbn", settings, ctx)]


@pytest.mark.skipif(not COMPILES, reason=str(why_not_compiled()))
def test_the_compiled_contenders_are_timed_beside_the_eager_ones_with_their_compile_time(gloo_group):
    for layer, step in gloo_group(2).run(compiled_cases_on_rank):
        compiled = {"syncbn_compiled", "local_bn_compiled"}
        assert compiled | {"bn_compiled_with_gathers", "syncbn", "local_bn"} <= layer["seconds"].keys()
        assert layer["compile_seconds"].keys() == compiled and all(s > 0 for s in layer["compile_seconds"].values())
        assert all(len(samples) == 2 for samples in layer["seconds"].values())
        assert step["seconds"].keys() == {"eager", "compiled"} and step["compile_seconds"] > 0


def least_sync_bn_on_rank(x: torch.Tensor) -> dict:
    x = x[dist.get_rank()].clone().requires_grad_()
    layer = MinimumSyncBatchNorm(x.size(1), torch.device("cpu"))
    with count_collectives() as counts:
        y = layer(x)
        y.backward(torch.ones_like(y))
    return dict(y=y.detach(), grad=x.grad, counts=dict(counts))


def test_the_least_synchronized_bn_keeps_both_collectives_and_normalizes_after_the_gather(gloo_group):
    """The benchmark's ``sync_minimum`` is a lower bound only if it does what every synchronized BN
    must: both all-gathers, and every rank normalized with statistics that came through the first
    (rank 0's: the second rank's input is shifted and scaled, so its own would give other numbers)."""
    x = torch.randn(2, 6, 3)
    x[1] = x[1] * 5 + 3
    var, mean = torch.var_mean(x[0], dim=0, correction=0)
    invstd = (var + 1e-5).rsqrt()
    for rank, result in enumerate(gloo_group(2).run(least_sync_bn_on_rank, x)):
        assert result["counts"] == {"c10d::_allgather_base_": 2}
        torch.testing.assert_close(result["y"], (x[rank] - mean) * invstd)
        torch.testing.assert_close(result["grad"], invstd.expand(6, 3))


@pytest.mark.parametrize("knobs,message", [
    (["--calls", "0"], "--calls must be at least 1, got 0"),
    (["--sweep-repeats", "0"], "--sweep-repeats must be at least 1, got 0"),
    (["--startup-launches", "1"], "--startup-launches must be at least 2 (the first starts the forkserver), got 1"),
    (["--study-epochs", "0"], "--study-epochs must be at least 1, got 0"),
    (["--study-batches", "64", "24"], "--study-batches must divide the study's global batch of 64, got 24"),
    (["--study-batches", "0"], "--study-batches must divide the study's global batch of 64, got 0"),
    (["--study-batches", "-2"], "--study-batches must divide the study's global batch of 64, got -2"),
    (["--study-models", "vit"], "argument --study-models: invalid choice: 'vit'"),
    (["--collective-world-sizes", "2", "1"], "--collective-world-sizes must be at least 2 (one rank has no collective), got 1"),
    (["--collective-channels", "16", "0"], "--collective-channels must be at least 1, got 0"),
    (["--cases", "layers"], "argument --cases: invalid choice: 'layers'"),
])
def test_knobs_that_cannot_work_are_refused_before_anything_runs(knobs, message, capsys):
    with pytest.raises(SystemExit) as refusal:
        parse_args(["--no-compile", *knobs])
    assert refusal.value.code == 2 and message in capsys.readouterr().err


def test_quick_mode_is_the_defaults_each_knob_can_override():
    settings = parse_args(["--quick", "--no-compile", "--study-epochs", "3", "--study-models"])[0]
    assert (settings.study_epochs, settings.study_models, settings.calls) == (3, [], Settings.quick().calls)
    assert parse_args(["--no-compile"])[0].study_batches == [64, 32, 16, 8, 4, 2]


def test_the_study_case_runs_the_same_reduced_study_both_ways_with_the_studys_global_batch(tmp_path):
    study = OmegaConf.load(Path(__file__).parents[2] / "conf" / "experiment" / "batch_size_study.yaml")
    assert study.train.global_batch_size == STUDY_GLOBAL_BATCH
    settings = Settings(study_models=["cnn"], study_norms=["bn", "none"], study_batches=[32, 8], study_epochs=3)
    fused, per_run = study_commands(settings, str(tmp_path))
    assert fused[3:] == ["+experiment=batch_size_study", "study.models=[cnn]", "study.norms=[bn,none]",
                         "study.per_device_batches=[32,8]", "study.seeds=[0]", "seed=0", "train.epochs=3",
                         f"hydra.run.dir={tmp_path}/fused"]
    assert per_run[3:] == ["-m", "+experiment=batch_size_study_per_run", "model=cnn", "norm=bn,none",
                           "study.per_device_batch=32,8", "seed=0", "train.epochs=3", f"hydra.sweep.dir={tmp_path}/per-run"]


def test_without_study_models_the_bench_has_no_study_case_and_runs_no_command():
    assert study_cases(parse_args(["--quick", "--no-compile", "--study-models"])[0]) == []


def test_a_command_that_fails_ends_the_benchmark_with_its_last_line_of_errors():
    with pytest.raises(SystemExit) as failure:
        timed([sys.executable, "-c", "import sys; print('first', file=sys.stderr); sys.exit('the reason')"])
    assert str(failure.value) == "python -m syncbn.bench: -c import sys; print('first', file=sys.stderr); " \
                                 "sys.exit('the reason') failed: the reason"


def test_the_sweep_case_runs_the_fused_sweep_and_the_per_run_sweep_over_the_same_networks(tmp_path):
    """The commands' shape (both run as users type them in tests/test_train.py)."""
    settings = Settings(sweep_scales=2, sweep_epochs=3)
    fused = sweep_commands(settings, "fused", 4, str(tmp_path))
    assert fused[3:] == ["+experiment=weight_scale_sweep", "sweep.weight_scales=[1.0,0.007356422544596414]", "train.epochs=3",
                         "dist.nproc=4", f"hydra.run.dir={tmp_path}"]
    assert sweep_commands(settings, "per-run", 2, str(tmp_path))[3:] == [
        "-m", "+experiment=weight_scale_sweep_per_run", "model.weight_scale=1.0,0.007356422544596414", "train.epochs=3", "dist.nproc=2",
        f"hydra.sweep.dir={tmp_path}"]


def test_only_the_cases_asked_for_run(tmp_path):
    out = tmp_path / "bench.json"
    main(["--cases", "collective", "--collective-world-sizes", "2", "--collective-channels", "8", "--warmup", "1",
          "--calls", "1", "--no-compile", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["case"], r["world_size"], r["channels"]) for r in results] == [("collective", 2, 8)]


def test_the_collective_table_reads_each_point_against_the_better_collective_and_refits():
    """``auto`` chose the all-reduce at one point, where it is 1.25x the all-gather; 4 ranks on 2
    cores are oversubscribed."""
    model = CostModel(all_gather=(Algorithm("ring_gather", alpha=1e-3, beta=1e-9),),
                      all_reduce=(Algorithm("ring_reduce", alpha=1e-3, beta=1e-9),))
    points = [dict(case="collective", world_size=w, channels=c, chosen="all_reduce" if (w, c) == (4, 64) else "all_gather",
                   received_bytes={"all_gather": 1000.0 * w, "all_reduce": 1500.0},
                   seconds={n: [model.layer_seconds(n, w, c) * (1.25 if (w, c, n) == (4, 64, "all_reduce") else 1)] * 3
                            for n in ("all_gather", "all_reduce")})
              for w in (2, 4) for c in (16, 64, 1024)]
    lines = collective_table(points, cores=2).splitlines()
    gather, reduce = (model.layer_seconds(n, 4, 64) * 1e3 for n in ("all_gather", "all_reduce"))
    assert lines[2 + 4] == (f"| 4 (oversubscribed) | 64 | {gather:.3f} | {reduce * 1.25:.3f} | {reduce * 1.25 / gather:.2f} "
                            f"| 4.0 | 1.5 | all_reduce | {reduce * 1.25 / gather:.3f} | all_gather |")
    assert lines[2].startswith("| 2 | 16 |") and lines[2].endswith("| all_gather | 1.000 | all_gather |")
    assert collective_table([r for r in points if r["case"] != "collective"], cores=2) == "(not run)"
