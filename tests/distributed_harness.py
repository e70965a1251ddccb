"""A pool of gloo worker processes for the distributed tests.

Starting a process costs an import of torch (about 3 s here), so each world size gets one pool
per pytest process, reused by every test: :func:`pool` starts it on first use, and
:meth:`WorkerPool.run` runs one job, a module-level function called on every rank at once.

Rendezvous goes through a TCPStore that the pytest process hosts on a port the OS picks (port
0), so two test runs on one machine never collide; gloo then opens its own ephemeral ports.
Every wait has a timeout: a job that hangs (a collective that one rank never joins) fails its
test with :class:`JobTimeout`, the pool's processes are killed, and the next test starts a
fresh pool. Collectives themselves time out after ``COLLECTIVE_TIMEOUT`` inside the workers.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import multiprocessing
import os
import queue
import traceback
from typing import Any

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
START_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 120.0


class JobTimeout(RuntimeError):
    pass


class JobFailed(RuntimeError):
    pass


def _worker_main(rank: int, world_size: int, port: int, jobs, results) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
        results.put((rank, "ready", None))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        job = jobs.get()
        if job is None:
            break
        module_name, function_name, kwargs = job
        try:
            function = getattr(importlib.import_module(module_name), function_name)
            torch.manual_seed(0)
            results.put((rank, "ok", function(**kwargs)))
        except Exception:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    """``world_size`` processes in one gloo process group, waiting for jobs."""

    def __init__(self, world_size: int) -> None:
        import torch.distributed as dist

        self.world_size = world_size
        self.broken = False
        context = multiprocessing.get_context("spawn")
        # Hosted here, on a port the OS picks; the workers connect as clients.
        self._store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
        self._jobs = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(
                target=_worker_main, args=(rank, world_size, self._store.port, self._jobs[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()
        self._collect("ready", START_TIMEOUT_S, "start")

    def _collect(self, expected: str, timeout_s: float, what: str) -> list[Any]:
        values: list[Any] = [None] * self.world_size
        errors = []
        pending = set(range(self.world_size))
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        while pending:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, status, value = self._results.get(timeout=min(max(left, 0.01), 1.0))
            except queue.Empty:
                dead = sorted(r for r in pending if not self._processes[r].is_alive())
                if left > 1.0 and not dead:
                    continue
                self.close()
                reason = f"ranks {dead} died" if dead else f"no answer within {timeout_s:.0f} s"
                raise JobTimeout(
                    f"{what}: ranks {sorted(pending)} did not finish ({reason})"
                    + ("\n" + "\n".join(errors) if errors else "")
                ) from None
            pending.discard(rank)
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
            else:
                values[rank] = value
        if errors:
            # The other ranks answered, so the group is still usable; a rank that hangs instead
            # is caught by the timeout above.
            raise JobFailed(f"{what} failed:\n" + "\n".join(errors))
        return values

    def run(self, function, timeout_s: float = JOB_TIMEOUT_S, **kwargs: Any) -> list[Any]:
        """Call ``function(**kwargs)`` on every rank; returns the ranks' results, rank 0 first."""
        if self.broken:
            raise RuntimeError("this pool was closed after a timeout")
        for jobs in self._jobs:
            jobs.put((function.__module__, function.__name__, kwargs))
        return self._collect("ok", timeout_s, f"{function.__name__} on {self.world_size} ranks")

    def close(self) -> None:
        self.broken = True
        for jobs in self._jobs:
            try:
                jobs.put(None)
            except (ValueError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


_pools: dict[int, WorkerPool] = {}


def pool(world_size: int) -> WorkerPool:
    """The pool of ``world_size`` ranks, started on first use (and again after a timeout)."""
    current = _pools.get(world_size)
    if current is None or current.broken:
        current = _pools[world_size] = WorkerPool(world_size)
    return current


@atexit.register
def _close_pools() -> None:
    for current in _pools.values():
        if not current.broken:
            current.close()

