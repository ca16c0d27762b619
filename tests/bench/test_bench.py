"""The benchmark harness end to end on a tiny case: every field of its JSON, not the times."""

import json

import torch
import torch.distributed as dist
from app import why_not_compiled

from syncbn.bench.cli import main
from syncbn.bench.minimum import MinimumSyncBatchNorm
from syncbn.distributed import count_collectives

COMPILES = why_not_compiled() is None  # else the compiled contenders are left out, as a user must ask

TINY = ["--quick", "--world-sizes", "2", "--shapes", "(25,100)", "--step-norms", "syncbn", "--sweep-scales", "1",
        "--sweep-epochs", "1", "--warmup", "1", "--calls", "2", "--per-run-world-sizes", "1"]


def test_quick_mode_writes_every_figure_and_prints_only_tables(tmp_path, capfd):
    out = tmp_path / "bench.json"
    main([*TINY, "--out", str(out), *([] if COMPILES else ["--no-compile"])])
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m syncbn.bench --quick")
    assert {"cpu", "cores", "torch", "python", "cuda"} <= report["machine"].keys()
    assert report["backend"] == "gloo" and report["settings"]["calls"] == 2
    by_case = {}
    for result in report["results"]:
        by_case.setdefault(result["case"], []).append(result)
    [layer] = by_case["layer"]
    assert layer["world_size"] == 2 and layer["shape"] == "(25,100)"
    compiled = {"syncbn_compiled", "local_bn_compiled"} if COMPILES else set()
    floors = {"floor_allgather", "floor_allreduce", "bn_with_gathers", "bn_inside_gathers", "floor_again", "sync_minimum"} | ({"bn_compiled_with_gathers"} if COMPILES else set())
    assert layer["seconds"].keys() == {"syncbn", "local_bn"} | floors | compiled
    assert layer["compile_seconds"].keys() == compiled and all(s > 0 for s in layer["compile_seconds"].values())
    assert all(len(samples) == 2 and min(samples) > 0 for samples in layer["seconds"].values())
    assert layer["collectives"] == {"c10d::_allgather_base_": 2}, "one all-gather each way"
    [step] = by_case["step"]
    assert step["collectives"] == {"c10d::_allgather_base_": 10, "c10d::allreduce_": 1}, "2 per norm layer + DDP's bucket"
    assert step["seconds"].keys() == {"eager"} | ({"compiled"} if COMPILES else set())
    assert all(len(samples) == 2 for samples in step["seconds"].values())
    assert (step["compile_seconds"] > 0) if COMPILES else step["compile_seconds"] is None
    [startup] = by_case["startup"]
    assert startup["world_size"] == 2 and startup["first_seconds"] > 0
    assert len(startup["seconds"]) == 1 and len(startup["spawn_seconds"]) == 2 and min(startup["spawn_seconds"]) > 0
    assert [(r["mode"], r["world_size"]) for r in by_case["sweep"]] == [("fused", 2), ("per-run", 1)]
    assert all(r["seconds"] > 0 and r["plain_seconds"] > 0 and r["networks"] == 2 for r in by_case["sweep"])
    printed, errors = capfd.readouterr()  # file descriptors 1 and 2, the ranks' included
    assert "| world | shape | syncbn ms" in printed and "| world | norm | eager ms per step" in printed
    assert "| world | shape | floor | floor ms | syncbn / floor | floor again / floor | least sync BN / floor |" in printed and "sweep command s" in printed
    assert "| fused | 2 | 2 x 1 |" in printed and "| per-run | 1 | 2 x 1 |" in printed
    assert "profiler_st" not in printed + errors, "the profiler's own notices stay out of the user's terminal"


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
