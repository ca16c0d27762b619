"""Run functions on N real processes joined in one Gloo group (or NCCL, a GPU each), started once and reused.

Starting a process that imports torch takes seconds on a small machine, so a ``GlooGroup`` starts
its ranks once and then runs many calls on them: ``group.run(fn, *args)`` calls ``fn(*args)`` on
every rank (``fn`` must be a module-level function) and returns the list of per-rank results.
Every call has a deadline: a hang fails the test instead of blocking CI, and a rank's exception
comes back with its traceback. After a failure the group is restarted for the next call.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """An exception raised on one of the ranks; its message holds the remote traceback."""


def _serve(rank: int, world_size: int, init_file: str, timeout_s: float, conn, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    if backend == "nccl":  # a GPU per rank
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        while (job := conn.recv()) is not None:
            fn, args = job
            try:
                conn.send(("ok", fn(*args)))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # done: the interpreter's teardown of torch would only make the session wait for it


class GlooGroup:
    def __init__(self, world_size: int, call_timeout_s: float = 60.0, collective_timeout_s: float = 20.0,
                 backend: str = "gloo"):
        self.world_size, self.backend = world_size, backend
        self.call_timeout_s = call_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self._procs: list = []
        self._conns: list = []
        self._tmpdir: tempfile.TemporaryDirectory | None = None

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tmpdir = tempfile.TemporaryDirectory(prefix="gloo-group-")
        init_file = os.path.join(self._tmpdir.name, "rendezvous")
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_serve,
                args=(rank, self.world_size, init_file, self.collective_timeout_s, child, self.backend),
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)

    def run(self, fn, *args) -> list:
        if not self._procs:
            self.start()
        for conn in self._conns:
            conn.send((fn, args))
        results, errors = [], []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(self.call_timeout_s):
                self.close()
                raise TimeoutError(f"rank {rank} did not answer {fn.__name__} within {self.call_timeout_s}s")
            try:
                status, value = conn.recv()
            except (EOFError, ConnectionError) as error:
                self.close()
                raise RankError(f"rank {rank} died during {fn.__name__} ({error!r})") from error
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
            results.append(value)
        if errors:
            self.close()
            raise RankError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return results

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs, self._conns = [], []
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
