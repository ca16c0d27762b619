"""Projected, not measured: ResNet-50's BatchNorm synchronization per training step on NCCL, 8 to
4096 GPUs with 1 and with 8 GPUs a node, with each collective, by NCCL's own cost model.

    python -m syncbn.bench.projection                # outputs/projection/: the CSV, the figure; the table
    python -m syncbn.bench.projection --out docs     # what docs/performance.md shows

The model is NCCL 2.30.7's tuner (``syncbn/nccl_tuner.py``: its constants and formulas, NVLink
inside a node, 400 Gb/s a GPU between nodes), ``syncbn.cost.nccl_model``; ``collective="auto"``
uses it, for 8 GPUs a node, on NCCL groups. Each of ResNet-50's 53 BatchNorm layers synchronizes on
its own, forward and backward:

- syncbn all-gather: ``[count, mean, var]`` (2C + 1 float64) gathered, then the 2C float64 sums;
- syncbn all-reduce: the same payloads all-reduced (ring or tree, as NCCL picks), one forward
  round (the steps whose sums cancel take a second: rare, so left out);
- syncbn all-reduce compiled: its two forward rounds at every step, as a compiled layer runs them;
- syncbn auto: each layer the cheaper of the two, as ``collective="auto"`` chooses;
- torch's SyncBatchNorm: 2C + 1 float32 gathered, 2C float32 all-reduced;
- syncbn auto, groups of 8 (``group_size=8``): each group of 8 GPUs synchronizes on its own, all
  groups at once, so a step costs what the layer costs at 8 GPUs (inside one node at 8 a node).
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from pathlib import Path

from syncbn.cost import CostModel, nccl_model

WORLD_SIZES = [8 * 2**k for k in range(10)]  # 8 .. 4096 GPUs
GPUS_PER_NODE = (1, 8)
GROUP = 8  # BN groups of 8 GPUs (group_size=8): inside one node at 8 GPUs a node
CONTENDERS = ("syncbn all_gather", "syncbn all_reduce", "syncbn all_reduce compiled", "syncbn auto",
              "torch SyncBatchNorm", f"syncbn auto, groups of {GROUP}")


def layer_step_seconds(model: CostModel, contender: str, world_size: int, channels: int) -> float:
    if contender == "torch SyncBatchNorm":  # float32 [mean, invstd, count] gathered, the sums reduced
        return model.collective_seconds("all_gather", world_size, (2 * channels + 1) * 4) + \
            model.collective_seconds("all_reduce", world_size, 2 * channels * 4)
    if contender.endswith(f"groups of {GROUP}"):  # each group synchronizes alone, all groups at once
        return layer_step_seconds(model, "syncbn auto", min(world_size, GROUP), channels)
    if contender == "syncbn all_reduce compiled":
        return model.layer_seconds("all_reduce", world_size, channels, reduce_rounds=2)
    collective = contender.removeprefix("syncbn ")
    if collective == "auto":  # each layer as the layer chooses, eager
        collective = model.choose(world_size, channels)
    return model.layer_seconds(collective, world_size, channels)


@functools.cache
def resnet50_channels() -> tuple[int, ...]:
    """The channels of ResNet-50's BatchNorm layers, in order (torchvision's model; built once)."""
    import torch.nn as nn
    from torchvision.models import resnet50

    return tuple(m.num_features for m in resnet50().modules() if isinstance(m, nn.BatchNorm2d))


def projection() -> list[dict]:
    """Per GPUs a node and world size: each contender's milliseconds of BatchNorm synchronization."""
    channels = resnet50_channels()
    rows = []
    for per_node in GPUS_PER_NODE:
        model = nccl_model(per_node)
        rows += [dict(gpus_per_node=per_node, world_size=w,
                      **{c: sum(layer_step_seconds(model, c, w, ch) for ch in channels) * 1e3 for c in CONTENDERS})
                 for w in WORLD_SIZES]
    return rows


def crossover(rows: list[dict], per_node: int) -> int | None:
    """The fewest GPUs at which the all-reduce costs less than the all-gather, or None."""
    return next((r["world_size"] for r in rows if r["gpus_per_node"] == per_node
                 and r["syncbn all_reduce"] < r["syncbn all_gather"]), None)


def write(rows: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "collective_projection.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["gpus_per_node", "world_size", *CONTENDERS])
        writer.writeheader()
        writer.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GPUS_PER_NODE), figsize=(11, 4.4), sharey=True)
    for ax, per_node in zip(axes, GPUS_PER_NODE):
        mine = [r for r in rows if r["gpus_per_node"] == per_node]
        for contender, style in zip(CONTENDERS, ("o-", "s-", "s:", "k:", "^--", "D-.")):
            ax.plot([r["world_size"] for r in mine], [r[contender] for r in mine], style, label=contender)
        ax.set(xscale="log", yscale="log", xlabel="GPUs (400 Gb/s each)",
               title=f"{per_node} GPU{'s' if per_node > 1 else ''} a node" + (", NVLink inside" if per_node > 1 else ""))
        ax.set_xticks(WORLD_SIZES, [str(w) for w in WORLD_SIZES], fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms per step")
    axes[0].legend(fontsize=8)
    fig.suptitle("ResNet-50's BatchNorm synchronization per step (projected by NCCL 2.30.7's cost model, not measured)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "collective_projection.png", dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| GPUs a node | GPUs | " + " | ".join(f"{c} ms" for c in CONTENDERS)
             + " | all-gather / all-reduce | torch / all-reduce |", "|---" * (len(CONTENDERS) + 4) + "|"]
    for r in rows:
        reduce = r["syncbn all_reduce"]
        cells = [str(r["gpus_per_node"]), str(r["world_size"]), *(f"{r[c]:.2f}" for c in CONTENDERS),
                 f"{r['syncbn all_gather'] / reduce:.1f}", f"{r['torch SyncBatchNorm'] / reduce:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The crossover and the 1024-GPU ratios, as ranges over the GPUs a node."""
    at = {r["gpus_per_node"]: r for r in rows if r["world_size"] == 1024}
    ratios = {name: [at[g][name] / at[g]["syncbn all_reduce"] for g in GPUS_PER_NODE]
              for name in ("syncbn all_gather", "torch SyncBatchNorm")}
    spans = {name: f"{min(v):.1f}-{max(v):.1f}x" for name, v in ratios.items()}
    crossings = ", ".join(f"{crossover(rows, g)} GPUs at {g} a node" for g in GPUS_PER_NODE)
    grouped = at[8][f"syncbn auto, groups of {GROUP}"]
    return (f"all-reduce cheaper than the all-gather from {crossings}; at 1024 GPUs it is "
            f"{spans['syncbn all_gather']} cheaper than our all-gather and {spans['torch SyncBatchNorm']} than "
            f"torch's SyncBatchNorm; BN groups of {GROUP} inside a node (8 GPUs a node) cost {grouped:.2f} ms a step "
            f"at 1024 GPUs, against {at[8]['syncbn auto']:.2f} ms synchronizing the whole world "
            f"({at[8]['syncbn auto'] / grouped:.1f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m syncbn.bench.projection", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/projection"),
                        help="folder for collective_projection.csv and .png (docs: what docs/performance.md shows)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    rows = projection()
    write(rows, args.out)
    print(table(rows))
    print(summary(rows))
    print(f"wrote {args.out / 'collective_projection.csv'} and {args.out / 'collective_projection.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
