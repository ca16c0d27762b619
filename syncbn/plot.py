"""``python -m syncbn.plot SWEEP_DIR``, the first name of ``python -m syncbn.experiments.weight_scale``,
kept for the scripts and Hydra configs (``syncbn.plot.SweepSummary``) that use it."""

from syncbn.experiments.weight_scale import SweepSummary, main, summarize

__all__ = ["SweepSummary", "main", "summarize"]

if __name__ == "__main__":
    main(prog="syncbn.plot")
