"""The benchmark's report: a markdown table per case, from ``python -m syncbn.bench``'s results."""

from __future__ import annotations

import statistics

from syncbn.bench.costfit import fit, worst_error


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def layer_table(results: list[dict]) -> str:
    lines = ["| world | shape | syncbn ms | local BN ms | syncbn / BN | floor ms: 2 all-gathers | same as all-reduces "
             "| BN, then each all-gather ms | BN while they travel ms | (syncbn - BN) / floor | collectives per fwd+bwd "
             "| torch SyncBN ms |", "|---" * 12 + "|"]
    for r in (r for r in results if r["case"] == "layer"):
        s = {name: statistics.median(v) for name, v in r["seconds"].items()}
        floor = s.get("floor_allgather")
        cells = [r["world_size"], r["shape"], _ms(s["syncbn"]), _ms(s["local_bn"]), f"{s['syncbn'] / s['local_bn']:.2f}"]
        if floor:
            cells += [_ms(floor), _ms(s["floor_allreduce"]), _ms(s["bn_with_gathers"]), _ms(s["bn_inside_gathers"]),
                      f"{(s['syncbn'] - s['local_bn']) / floor:.2f}"]
        else:
            cells += ["-"] * 5
        cells += [sum(r["collectives"].values()), _ms(s["torch_syncbn"]) if "torch_syncbn" in s else "-"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _floor(s: dict, compiled: bool = False) -> tuple[str, float]:
    """The least a synchronized layer can cost: local BN with the two all-gathers, or alone at 1 rank;
    ``compiled``: the same with local BN compiled."""
    bn, with_gathers = ("local_bn_compiled", "bn_compiled_with_gathers") if compiled else ("local_bn", "bn_with_gathers")
    return ("BN + all-gathers", s[with_gathers]) if with_gathers in s else ("local BN", s[bn])


def layer_gap_table(results: list[dict]) -> str:
    """The layer against its floor, eager and compiled; the floor's second copy against the floor (how
    far apart two copies of one contender come out: the run's noise) and the least synchronized BN
    against it (what no synchronized BN here avoids); compile time of the first call."""
    lines = ["| world | shape | floor | floor ms | syncbn / floor | floor again / floor | least sync BN / floor "
             "| syncbn compiled ms | compiled floor ms | syncbn compiled / compiled floor | syncbn compiled / floor "
             "| compile s (syncbn, BN) |", "|---" * 12 + "|"]
    for r in (r for r in results if r["case"] == "layer"):
        s = {name: statistics.median(v) for name, v in r["seconds"].items()}
        name, floor = _floor(s)
        cells = [r["world_size"], r["shape"], name, _ms(floor), f"{s['syncbn'] / floor:.2f}",
                 f"{s['floor_again'] / floor:.2f}", f"{s['sync_minimum'] / floor:.2f}" if "sync_minimum" in s else "-"]
        if "syncbn_compiled" in s:
            compiled = s["syncbn_compiled"]
            _, compiled_floor = _floor(s, compiled=True)
            times = r["compile_seconds"]
            cells += [_ms(compiled), _ms(compiled_floor), f"{compiled / compiled_floor:.2f}", f"{compiled / floor:.2f}",
                      f"{times['syncbn_compiled']:.1f}, {times['local_bn_compiled']:.1f}"]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def step_table(results: list[dict]) -> str:
    lines = ["| world | norm | eager ms per step | compiled ms per step | compiled / eager | compile s "
             "| collectives per step (eager) |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in results if r["case"] == "step"):
        counts = ", ".join(f"{n.removeprefix('c10d::')} x{c}" for n, c in sorted(r["collectives"].items()))
        eager = statistics.median(r["seconds"]["eager"])
        cells = [r["world_size"], r["norm"], _ms(eager)]
        if "compiled" in r["seconds"]:
            compiled = statistics.median(r["seconds"]["compiled"])
            cells += [_ms(compiled), f"{compiled / eager:.2f}", f"{r['compile_seconds']:.1f}"]
        else:
            cells += ["-"] * 3
        lines.append("| " + " | ".join(map(str, [*cells, counts])) + " |")
    return "\n".join(lines)


def startup_table(results: list[dict]) -> str:
    lines = ["| world | forkserver: first launch s (the process's first also starts the server) | forkserver: each launch "
             "after s (median) | spawn: each launch s (median) | spawn / forkserver |", "|---|---|---|---|---|"]
    for r in (r for r in results if r["case"] == "startup"):
        forkserver, spawn = statistics.median(r["seconds"]), statistics.median(r["spawn_seconds"])
        lines.append(f"| {r['world_size']} | {r['first_seconds']:.2f} | {forkserver:.2f} | {spawn:.2f} | {spawn / forkserver:.1f} |")
    return "\n".join(lines)


def sweep_table(results: list[dict]) -> str:
    lines = ["| mode | world | networks x epochs | sweep command s (median) | plain loop s (median) | ratio | each run s "
             "(sweep / plain) |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in results if r["case"] == "sweep"):
        each = ", ".join(f"{s:.1f} / {p:.1f}" for s, p in zip(r["each_seconds"], r["each_plain_seconds"]))
        lines.append(f"| {r['mode']} | {r['world_size']} | {r['networks']} x {r['epochs']} | {r['seconds']:.1f} | "
                     f"{r['plain_seconds']:.1f} | {r['seconds'] / r['plain_seconds']:.2f} | {each} |")
    return "\n".join(lines)


def study_table(results: list[dict]) -> str:
    lines = ["| rows x epochs | fused command s (mean of 2) | per-run command s | fused / per-run | each fused run s |",
             "|---|---|---|---|---|"]
    for r in (r for r in results if r["case"] == "study"):
        each = ", ".join(f"{s:.1f}" for s in r["each_seconds"])
        lines.append(f"| {r['rows']} x {r['epochs']} | {r['seconds']:.1f} | {r['per_run_seconds']:.1f} | "
                     f"{r['seconds'] / r['per_run_seconds']:.3f} | {each} |")
    return "\n".join(lines)


def _kb(n: float) -> str:
    return f"{n / 1e3:.1f}"


def collective_table(results: list[dict], cores: int) -> str:
    """Both collectives per (W, C), the bytes a rank receives in each, and ``auto``'s choice against
    the better of the two there; the choice a model fitted to this run would make."""
    points = [r for r in results if r["case"] == "collective"]
    if not points:
        return "(not run)"
    fitted = fit(points)
    lines = ["| world | channels | all-gather ms | all-reduce ms | all-reduce / all-gather | kB received per rank: "
             "all-gather | all-reduce | auto chose | chosen / better | this run's fit chooses |", "|---" * 10 + "|"]
    for r in points:
        s = {name: statistics.median(v) for name, v in r["seconds"].items()}
        world = f"{r['world_size']} (oversubscribed)" if r["world_size"] > cores else str(r["world_size"])
        b = r["received_bytes"]
        cells = [world, r["channels"], _ms(s["all_gather"]), _ms(s["all_reduce"]),
                 f"{s['all_reduce'] / s['all_gather']:.2f}", _kb(b["all_gather"]), _kb(b["all_reduce"]), r["chosen"],
                 f"{s[r['chosen']] / min(s.values()):.3f}", fitted.choose(r["world_size"], r["channels"])]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n\n" + fit_table(fitted, points)


def fit_table(model, points: list[dict]) -> str:
    lines = ["| fitted to this run | latency us per call | alpha us per round | alpha_per_rank us per round and rank "
             "| beta ns per byte | largest relative error |", "|---|---|---|---|---|---|"]
    for name in ("all_gather", "all_reduce"):
        [a] = getattr(model, name)
        lines.append(f"| {name} ({a.name}) | {a.latency * 1e6:.1f} | {a.alpha * 1e6:.2f} | {a.alpha_per_rank * 1e6:.2f} | "
                     f"{a.beta * 1e9:.3f} | {worst_error(model, points, name):.2f} |")
    return "\n".join(lines)


def report(report_data: dict) -> str:
    results = report_data["results"]
    m = report_data["machine"]
    return "\n\n".join([
        f"`{report_data['command']}` on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, {report_data['backend']}",
        "Layer, forward + backward, float32:\n\n" + layer_table(results),
        "The layer against its floor, eager and compiled (torch.compile(fullgraph=True)):\n\n" + layer_gap_table(results),
        "DDP training step of the 5x100 MLP, global batch 100:\n\n" + step_table(results),
        "Rank start-up per job:\n\n" + startup_table(results),
        "Weight-scale sweep end to end:\n\n" + sweep_table(results),
        "Batch-size study end to end, one seed:\n\n" + study_table(results),
        "The layer's collectives, (16, C) per rank, forward + backward (auto: syncbn/cost.py's model):\n\n"
        + collective_table(results, m["cores"]),
    ])
