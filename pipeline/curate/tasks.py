"""Run independent tasks in this process (workers=1: no pickling, easy to profile) or as Ray tasks.

Ray: at most `2 x cluster CPUs` tasks are in flight (the driver never holds a reference per task of a million-task
stage, and ray.wait scans only the window), each task declares its CPUs and memory, and is retried on worker
failure. Results come back in task order, whatever order the tasks finish in: callers' outputs are then the same
for any number of workers.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_tasks(fn: Callable[[T], R], tasks: Sequence[T], workers: int, ray_address: str | None = None,
              memory_bytes: int = 0) -> list[R]:
    """[fn(t) for t in tasks], as Ray tasks (workers > 1 or an address: the Ray the caller started, local CPUs or a
    cluster) or in this process (workers == 1 and no address). memory_bytes: what one task needs (Ray schedules by
    it)."""
    if not tasks:
        return []
    if workers <= 1 and not ray_address:
        return [fn(t) for t in tasks]
    import ray

    if not ray.is_initialized():  # the caller starts Ray (engine._start_ray): joining a cluster must ship the code
        raise RuntimeError("run_tasks needs Ray started first: pipeline.curate.engine.run_curation starts it")
    options = {"num_cpus": 1, "max_retries": 3} | ({"memory": memory_bytes} if memory_bytes else {})
    remote = ray.remote(**options)(fn)
    window = 2 * int(ray.cluster_resources().get("CPU", workers))
    results: list = [None] * len(tasks)
    pending: dict = {}
    nxt = 0
    while nxt < len(tasks) or pending:
        while nxt < len(tasks) and len(pending) < window:
            pending[remote.remote(tasks[nxt])] = nxt
            nxt += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            results[pending.pop(ref)] = ray.get(ref)
    return results

