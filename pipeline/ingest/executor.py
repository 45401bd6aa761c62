"""Run a phase's independent tasks on a local process pool or as Ray tasks, a bounded window at a time.

The engine only changes where tasks run: task definitions and outputs are identical, so --engine and --workers are
left out of the run's fingerprint. workers=1 runs in-process (no pickling, easy to debug and profile).

Both engines keep at most `2 x workers` (Ray: 2 x the cluster's CPUs) tasks in flight and draw the next task from a
lazy iterator only when one finishes, so the driver never holds a million task specs or results. On Ray each task
declares its CPU and memory needs (the scheduler packs nodes by them instead of over-committing memory), a crashed
worker is retried by Ray, and results are collected in batches: one blocking wait for the first ready result, then
a non-blocking sweep for all others, instead of a wait per result over every pending reference.
A task that raises does not stop the run: it comes back as Failed (with the reason), for the caller to quarantine.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Resources:
    """What one task of a phase needs; Ray schedules by it (the local pool runs `workers` tasks at a time)."""

    cpus: float = 1.0
    memory_mb: int = 1024


@dataclass(frozen=True)
class Failed:
    """A task that raised: `reason` is the exception, `where` the innermost frame of our code."""

    reason: str
    where: str
    objects: tuple[str, ...] = ()  # the loose files whose faults failed the task (TransientFailure.objects)


class Engine:
    """Where a run's tasks execute. The local pool is started once and kept for every phase (spawning workers
    costs about a second each time); close() ends it."""

    def __init__(self, kind: str, workers: int):
        self.kind = kind  # "local" | "ray"
        self.workers = workers  # local: processes; ray: unused (the cluster's CPUs count)
        self.nodes: set[str] = set()  # the nodes that ran tasks (Ray node ids; "local" for the local engine)
        self._pool: ProcessPoolExecutor | None = None

    def run(self, fn: Callable[[T], R], tasks: Iterable[tuple[int, T]], resources: Resources = Resources()
            ) -> Iterator[tuple[int, R | Failed]]:
        """(task id, result or Failed) for every (task id, task), in completion order."""
        guarded = _Guarded(fn)
        if self.kind == "ray":
            return _run_ray(guarded, tasks, resources, self.nodes)
        self.nodes.add("local")
        if self.workers == 1:
            return ((i, guarded(t)) for i, t in tasks)
        if self._pool is None:
            # spawn, not fork: the parent may hold s3fs/aiohttp threads, which a forked child would inherit mid-lock.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return _run_pool(self._pool, guarded, tasks, self.workers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def default_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


class _Guarded:
    """fn(task), with any exception turned into Failed: one bad unit must not end a run of a million."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, task: Any) -> Any:
        try:
            return self.fn(task)
        except Exception as e:  # noqa: BLE001 - reported and quarantined by the caller, never dropped
            frames = traceback.extract_tb(e.__traceback__)
            ours = [f for f in frames if "pipeline" in f.filename] or frames
            where = f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else ""
            return Failed(f"{type(e).__name__}: {e}"[:500], where, tuple(getattr(e, "objects", ()) or ()))


def _run_pool(pool: ProcessPoolExecutor, fn, tasks, workers: int):
    queue = iter(tasks)
    pending = {}
    for i, task in queue:
        pending[pool.submit(fn, task)] = i
        if len(pending) >= 2 * workers:
            break
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            yield pending.pop(fut), fut.result()
            nxt = next(queue, None)
            if nxt is not None:
                pending[pool.submit(fn, nxt[1])] = nxt[0]


def _run_ray(fn, tasks, resources: Resources, nodes: set[str]):
    import ray

    remote = ray.remote(_call).options(
        num_cpus=resources.cpus, memory=resources.memory_mb * 2**20, max_retries=3)
    window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue = iter(tasks)
    pending: dict = {}

    def submit(item) -> None:
        i, task = item
        pending[remote.remote(fn, task)] = i

    for item in queue:
        submit(item)
        if len(pending) >= window:
            break
    while pending:
        refs = list(pending)
        ready, rest = ray.wait(refs, num_returns=1)
        if rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            i = pending.pop(ref)
            try:
                result, node = ray.get(ref)
                nodes.add(node)
            except Exception as e:  # noqa: BLE001 - a worker that died (OOM, node lost) after Ray's own retries
                result = Failed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500], "ray")
            yield i, result
            nxt = next(queue, None)
            if nxt is not None:
                submit(nxt)


def _call(fn: Callable, task: Any) -> tuple[Any, str]:
    """fn(task) on a Ray worker, and the id of the node it ran on (the report counts the nodes a run used)."""
    import ray

    return fn(task), ray.get_runtime_context().get_node_id()
