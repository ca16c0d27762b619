"""``python -m syncbn.study SWEEP_DIR``, the first name of ``python -m syncbn.experiments.batch_size``,
kept for the scripts and Hydra configs (``syncbn.study.BatchStudySummary``) that use it."""

from syncbn.experiments.batch_size import BatchStudySummary, main, summarize

__all__ = ["BatchStudySummary", "main", "summarize"]

if __name__ == "__main__":
    main(prog="syncbn.study")
