"""Projected, not measured: ResNet-50's BatchNorm synchronization per training step on NCCL, 8 to
4096 GPUs, with each collective, by NCCL's own cost model.

    python -m syncbn.bench.projection   # docs/collective_projection.csv and .png, and the table

``syncbn.cost.NCCL`` is NCCL's tuner's model (``src/graph/tuning.cc``, NVIDIA/nccl) with its
published constants, for GPUs joined by 400 Gb/s (50 GB/s) each, every step of an algorithm a
network hop (a node's NVLink would make the first steps cheaper; these payloads are latency-bound).
It is what ``collective="auto"`` uses for CUDA tensors. Each of ResNet-50's 53 BatchNorm layers
synchronizes on its own, forward and backward:

- syncbn all-gather: ``[count, mean, var]`` (2C + 1 float64) gathered, then 2C float32 sums gathered;
- syncbn all-reduce: the same payloads all-reduced (ring or tree, as NCCL picks);
- syncbn auto: each layer the cheaper of the two, as ``collective="auto"`` chooses;
- torch's SyncBatchNorm: 2C + 1 float32 gathered, 2C float32 all-reduced.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

from syncbn.cost import NCCL, CostModel, layer_payloads

WORLD_SIZES = [8 * 2**k for k in range(10)]  # 8 .. 4096 GPUs
CONTENDERS = ("syncbn all_gather", "syncbn all_reduce", "syncbn auto", "torch SyncBatchNorm")


def layer_step_seconds(model: CostModel, contender: str, world_size: int, channels: int) -> float:
    if contender == "torch SyncBatchNorm":  # float32 [mean, invstd, count] gathered, the sums reduced
        _, backward = layer_payloads(channels)
        return model.collective_seconds("all_gather", world_size, (2 * channels + 1) * 4) + \
            model.collective_seconds("all_reduce", world_size, backward)
    collective = contender.removeprefix("syncbn ")
    if collective == "auto":  # each layer as the layer chooses on CUDA tensors
        collective = model.choose(world_size, channels)
    return model.layer_seconds(collective, world_size, channels)


@functools.cache
def resnet50_channels() -> tuple[int, ...]:
    """The channels of ResNet-50's BatchNorm layers, in order (torchvision's model; built once)."""
    import torch.nn as nn
    from torchvision.models import resnet50

    return tuple(m.num_features for m in resnet50().modules() if isinstance(m, nn.BatchNorm2d))


def projection(model: CostModel = NCCL) -> list[dict]:
    """Per world size: each contender's milliseconds of BatchNorm synchronization per step."""
    channels = resnet50_channels()
    return [dict(world_size=w, **{c: sum(layer_step_seconds(model, c, w, ch) for ch in channels) * 1e3
                                  for c in CONTENDERS}) for w in WORLD_SIZES]


def write(rows: list[dict], folder: Path) -> None:
    with open(folder / "collective_projection.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["world_size", *CONTENDERS])
        writer.writeheader()
        writer.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for contender, style in zip(CONTENDERS, ("o-", "s-", "k:", "^--")):
        ax.plot([r["world_size"] for r in rows], [r[contender] for r in rows], style, label=contender)
    ax.set(xscale="log", yscale="log", xlabel="GPUs (400 Gb/s each)", ylabel="ms per step",
           title="ResNet-50's BatchNorm synchronization per step\n(projected by NCCL's cost model, not measured)")
    ax.set_xticks(WORLD_SIZES, [str(w) for w in WORLD_SIZES])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "collective_projection.png", dpi=120)


def table(rows: list[dict]) -> str:
    lines = ["| GPUs | " + " | ".join(f"{c} ms" for c in CONTENDERS) + " | all-gather / all-reduce | torch / all-reduce |",
             "|---" * (len(CONTENDERS) + 3) + "|"]
    for r in rows:
        reduce = r["syncbn all_reduce"]
        cells = [str(r["world_size"]), *(f"{r[c]:.2f}" for c in CONTENDERS),
                 f"{r['syncbn all_gather'] / reduce:.1f}", f"{r['torch SyncBatchNorm'] / reduce:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    rows = projection()
    write(rows, Path("docs"))
    print(table(rows))


if __name__ == "__main__":
    main()
