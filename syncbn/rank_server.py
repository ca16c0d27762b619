"""Imported only by the CPU simulation's rank server (the forkserver of ``distributed.warm_start_method``,
which preloads it): the server's children, each a rank being started, fail quietly where their
launcher ended while they were being started. Each rank unpickles its launch data, semaphores
included, which the ending launcher has unlinked: a 15-line ``FileNotFoundError`` traceback per
rank, under the launcher's own one line, said nothing a user could act on.
"""

from __future__ import annotations

import sys
import traceback


def quiet_when_orphaned(exc_type, exc, tb) -> None:
    """``sys.excepthook`` of the server (its children inherit it): silent for that one failure."""
    rebuilding = any(frame.f_code.co_name == "__setstate__" and frame.f_code.co_filename.endswith("synchronize.py")
                     for frame, _ in traceback.walk_tb(tb))
    if issubclass(exc_type, FileNotFoundError) and rebuilding:
        return
    sys.__excepthook__(exc_type, exc, tb)


sys.excepthook = quiet_when_orphaned
