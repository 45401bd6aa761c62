"""Run independent tasks on a local process pool or as Ray tasks, yielding results as they complete.

The engine only changes where tasks run: task definitions and outputs are identical, so --engine and --workers are
left out of the run's fingerprint. workers=1 runs in-process (no pickling, easy to debug and profile).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def run_tasks(fn: Callable[[T], R], tasks: Iterable[T], workers: int, engine: str,
              ray_address: str | None) -> Iterator[R]:
    tasks = list(tasks)
    if not tasks:
        return iter(())
    if engine == "ray":
        return _run_ray(fn, tasks, workers, ray_address)
    if workers == 1:
        return (fn(t) for t in tasks)
    return _run_pool(fn, tasks, workers)


def _run_pool(fn, tasks, workers):
    # spawn, not fork: the parent may hold s3fs/aiohttp threads, which a forked child would inherit mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
        # Bounded submission keeps memory flat for runs with millions of units.
        pending, queue = set(), iter(tasks)
        for task in queue:
            pending.add(pool.submit(fn, task))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
                nxt = next(queue, None)
                if nxt is not None:
                    pending.add(pool.submit(fn, nxt))


def _run_ray(fn, tasks, workers, ray_address):
    import ray

    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address)
        else:
            ray.init(num_cpus=workers, include_dashboard=False)
    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    pending = [remote.remote(t) for t in tasks]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            yield ray.get(ref)
