"""What the experiments share: the style of their figures, and the summary each leaves in its
directory (a CSV and a figure), written when the experiment ends and redrawn by its command."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402  (the experiments take pyplot from here, Agg chosen)
from hydra.experimental.callback import Callback  # noqa: E402

LINE_STYLES = {"syncbn": "-", "bn": "-", "none": "--", "layernorm": "-.", "groupnorm": ":"}
LABELS = {
    "syncbn": "BatchNorm (synchronized)",
    "bn": "BatchNorm (per rank)",
    "none": "without BatchNorm",
    "layernorm": "LayerNorm",
    "groupnorm": "GroupNorm",
}


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_csv(rows: list[dict], path: Path, columns: list[str]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@dataclass(frozen=True)
class Summary:
    """An experiment's summary: rows read from its directory of runs, written as ``csv_name`` (the
    ``columns``) and drawn as ``figure_name``; ``table`` is the Markdown its command prints."""

    read: Callable[[Path], list[dict]]
    csv_name: str
    columns: list[str]
    figure_name: str
    draw: Callable[[list[dict], Path], Path]
    table: Callable[[list[dict]], str]

    def write(self, directory: Path) -> list[dict]:
        """Write the CSV and the figure into ``directory``; returns the rows."""
        rows = self.read(directory)
        for path in (write_csv(rows, directory / self.csv_name, self.columns), self.draw(rows, directory / self.figure_name)):
            print(f"wrote {path}")
        return rows

    def command(self, prog: str, description: str, directory_help: str, argv: list[str] | None = None) -> None:
        """``python -m PROG DIR``: redraw ``DIR``'s summary and print its table."""
        parser = argparse.ArgumentParser(prog=prog, description=description)
        parser.add_argument("sweep_dir", type=Path, help=directory_help)
        args = parser.parse_args(argv)
        try:
            print(self.table(self.write(args.sweep_dir)))
        except FileNotFoundError as error:
            parser.exit(1, f"{parser.prog}: error: {error}\n")


class SummaryCallback(Callback):
    """Hydra callback: write the experiment's summary into the sweep directory when the multirun ends."""

    summary: Summary

    def on_multirun_end(self, config, **kwargs) -> None:
        self.summary.write(Path(config.hydra.sweep.dir))
