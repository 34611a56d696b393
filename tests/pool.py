"""A warm pool of gloo worker processes that runs a test body on every rank.

Starting a rank costs about 2 s of CPU (importing torch), so each world size gets one pool for the whole pytest
session: its workers join a gloo world once, then loop running the bodies they are sent. A body is a module-level
function (sent by module and name); its return value comes back per rank.

Failure handling:
  - a body that raises on some ranks fails the test with every failing rank's traceback; if the other ranks
    finished too, every collective matched and the pool stays;
  - a body that does not finish within its timeout (a hang, a rank waiting for a failed one), or whose worker
    died, fails the test naming those ranks, and the pool is killed and rebuilt on next use; the session goes on.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from megamoe.parallel.world import free_port

# Once one rank has failed, how long the others get to finish before the pool counts as hung.
FAILURE_GRACE_S = 5.0
DEFAULT_TIMEOUT_S = 120.0


class RankFailure(AssertionError):
    """A test body raised on some ranks or did not finish on them."""


def _worker(rank: int, world_size: int, port: int, conn: Connection) -> None:
    import torch
    import torch.distributed as dist

    # Many ranks share 2 cores: one intra-op thread per rank avoids oversubscription.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=DEFAULT_TIMEOUT_S))
    # Every process group a body creates is destroyed after it: gloo groups keep threads, and a session of
    # hundreds of bodies would otherwise pile up thousands of them in each worker.
    created = []
    new_group = dist.new_group

    def recording_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        created.append(group)
        return group

    dist.new_group = recording_new_group
    conn.send(("ready", None))
    while True:
        task = conn.recv()
        if task is None:
            break
        module, name, args, kwargs, path = task
        for entry in reversed(path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        try:
            fn = getattr(importlib.import_module(module), name)
            reply = ("ok", fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - report everything, including pytest's skip/fail exceptions
            reply = ("error", traceback.format_exc())
        for group in created:
            if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(group)
        created.clear()
        conn.send(reply)


class GlooPool:
    """`world_size` gloo ranks, started on first use and kept warm."""

    def __init__(self, world_size: int, start_timeout_s: float = 120.0) -> None:
        self.world_size = world_size
        self.start_timeout_s = start_timeout_s
        self._procs: list[mp.Process] = []
        self._conns: list[Connection] = []
        self.starts = 0  # how many times the pool was (re)built

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, self.world_size, port, child), daemon=True,
                               name=f"gloo-pool-{self.world_size}-rank{rank}")
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        deadline = time.monotonic() + self.start_timeout_s
        for rank, conn in enumerate(self._conns):
            if not conn.poll(max(deadline - time.monotonic(), 0)):
                self.close()
                raise RuntimeError(f"gloo pool of {self.world_size}: rank {rank} did not start in time")
            conn.recv()
        self.starts += 1

    def close(self) -> None:
        """Stop every worker (killing those that do not stop at once)."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def run(self, fn: Callable, *args: Any, timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
        """Run fn(*args, **kwargs) on every rank; return the per-rank results, or raise RankFailure."""
        if not self._procs:
            self._start()
        task = (fn.__module__, fn.__qualname__, args, kwargs, list(sys.path))
        for conn in self._conns:
            conn.send(task)
        results: dict[int, tuple[str, Any]] = {}
        died = False
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(pending), timeout=remaining):
                rank = pending.pop(conn)
                try:
                    results[rank] = conn.recv()
                except EOFError:
                    results[rank] = ("error", f"rank {rank}'s worker process died")
                    died = True
            if any(status == "error" for status, _ in results.values()):
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        hung = sorted(pending.values())
        if hung or died:
            self.close()  # mismatched collectives: the next run starts a fresh pool
        failed = {r: v for r, (status, v) in results.items() if status == "error"}
        if failed or hung:
            parts = [f"--- rank {r} raised:\n{tb}" for r, tb in sorted(failed.items())]
            if hung:
                parts.append(f"--- ranks {hung} did not finish within the timeout; the pool was rebuilt")
            raise RankFailure(f"{fn.__qualname__} failed on {self.world_size} ranks\n" + "\n".join(parts))
        return [results[r][1] for r in range(self.world_size)]


class PoolSet:
    """One GlooPool per world size, created on demand; closed at the end of the session."""

    def __init__(self) -> None:
        self.pools: dict[int, GlooPool] = {}

    def __call__(self, world_size: int, fn: Callable, *args: Any, **kwargs: Any) -> list[Any]:
        pool = self.pools.setdefault(world_size, GlooPool(world_size))
        return pool.run(fn, *args, **kwargs)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

