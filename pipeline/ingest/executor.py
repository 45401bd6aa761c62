"""Run a phase's independent tasks on a local process pool or as Ray tasks, a bounded window at a time.

The engine only changes where tasks run: task definitions and outputs are identical, so --engine and --workers are
left out of the run's fingerprint. workers=1 runs in-process (no pickling, easy to debug and profile).

Both engines keep at most `2 x workers` (Ray: 2 x the cluster's CPUs) tasks in flight and draw the next task from a
lazy iterator only when one finishes, so the driver never holds a million task specs or results. On Ray each task
declares its CPU and memory needs (the scheduler packs nodes by them instead of over-committing memory), a crashed
worker is retried by Ray, and results are collected in batches: one blocking wait for the first ready result, then
a non-blocking sweep for all others, instead of a wait per result over every pending reference.
A task that raises does not stop the run: it comes back as Failed (with the reason), for the caller to quarantine;
so does one whose worker process dies under it (the local pool finds it by halving the tasks in flight, _run_pool).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import traceback
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
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
        return _run_pool(self, guarded, tasks, self.workers)

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent may hold s3fs/aiohttp threads, which a forked child would inherit mid-lock.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
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


def _run_pool(engine: Engine, fn, tasks, workers: int):
    """The local pool's window. A worker process that dies (the kernel's OOM killer, a crash in a decoder on one bad
    image) breaks the whole pool: every task in flight fails with BrokenProcessPool, and nothing says which one
    killed it. So the pool is started again and the tasks in flight are tested in groups, by halves: a group runs
    with nothing beside it, one that completes is cleared, one in which a worker dies again is halved, and a task
    whose worker dies under it alone twice comes back Failed (quarantined, named), as a task that crashes Ray's
    workers does after Ray's retries; ~2 log2(2 x workers) group runs find it. Before, the first crash ended the
    run, and every rerun stopped at that unit."""
    queue = iter(tasks)
    unsent: deque = deque()  # (id, task) refused by a pool found broken at submit: they never ran, they go first
    suspects: deque = deque()  # groups of (id, task) in flight when a worker died, each to run by itself
    deaths: Counter = Counter()  # id -> times a worker died running it alone
    pending: dict = {}  # future -> (id, task)

    def submit(item) -> bool:
        try:
            pending[engine.pool().submit(fn, item[1])] = item
            return True
        except BrokenProcessPool:  # a worker died while nothing waited on the pool (between phases, or as we
            return False  # yielded): found here, handled as a death under the tasks in flight below

    while True:
        if not pending and suspects:
            group = suspects.popleft()
            for n, item in enumerate(group):
                if not submit(item):
                    suspects.appendleft(group[n:])
                    break
        elif not suspects:
            while len(pending) < 2 * workers:
                item = unsent.popleft() if unsent else next(queue, None)
                if item is None:
                    break
                if not submit(item):
                    unsent.appendleft(item)
                    break
        if not pending:
            if not unsent and not suspects:
                return
            engine.close(wait=False)  # broken with nothing in flight: a fresh pool for what waits
            continue
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
            done, _ = wait(pending)  # the broken pool fails every task still in flight
        died = []
        for fut in done:
            item = pending.pop(fut)
            if isinstance(fut.exception(), BrokenProcessPool):
                died.append(item)
            else:
                yield item[0], fut.result()
        if not died:
            continue
        engine.close(wait=False)
        if len(died) > 1:
            half = len(died) // 2
            suspects.extendleft([died[half:], died[:half]])
            continue
        i, task = died[0]
        deaths[i] += 1
        if deaths[i] < _DEATHS_ALONE:  # once may be the machine's memory, not the task: it runs alone again
            suspects.appendleft(died)
        else:
            yield i, Failed(f"a worker process died running this task alone, {deaths[i]} times (killed by a "
                            "signal: out of memory, or a crash in native code such as an image decoder)", "executor")


_DEATHS_ALONE = 2  # a task whose worker dies under it alone this many times is Failed


def _run_ray(fn, tasks, resources: Resources, nodes: set[str]):
    """Ray tasks, at most 2 x the cluster's CPUs in flight (each core has one running and one queued, so a result
    collected late idles no core). Results come through completion callbacks into a queue: O(1) of driver CPU per
    result. `ray.wait` over the refs in flight costs O(in flight) per call: taken one per result, that was 3 ms a
    result at 2,559 in flight, all of a driver core at ~330 results a second (1.2M stage units an hour);
    `python -m bench.ray_driver` measures both."""
    import ray

    remote = ray.remote(_call).options(
        num_cpus=resources.cpus, memory=resources.memory_mb * 2**20, max_retries=3)
    window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))
    todo = iter(tasks)
    done: queue.SimpleQueue = queue.SimpleQueue()  # (task index, its future), put from Ray's callback thread
    in_flight = 0

    def submit(item) -> None:
        nonlocal in_flight
        i, task = item
        # The callback runs on Ray's core-worker thread: it only queues (a Ray call from there can deadlock Ray).
        # Ray completes every task's future, with its error if the task or its worker failed (the future holds its
        # ref, so nothing is freed before then).
        remote.remote(fn, task).future().add_done_callback(lambda fut, i=i: done.put((i, fut)))
        in_flight += 1

    for item in todo:
        submit(item)
        if in_flight >= window:
            break
    while in_flight:
        i, fut = done.get()
        in_flight -= 1
        try:
            result, node = fut.result()
            nodes.add(node)
        except Exception as e:  # noqa: BLE001 - a worker that died (OOM, node lost) after Ray's own retries
            result = Failed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500], "ray")
        yield i, result
        nxt = next(todo, None)
        if nxt is not None:
            submit(nxt)


def _call(fn: Callable, task: Any) -> tuple[Any, str]:
    """fn(task) on a Ray worker, and the id of the node it ran on (the report counts the nodes a run used)."""
    import ray

    return fn(task), ray.get_runtime_context().get_node_id()
