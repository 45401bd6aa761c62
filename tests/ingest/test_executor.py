"""The local pool when one of its worker processes dies (executor._run_pool)."""

from __future__ import annotations

from pipeline.ingest.executor import Engine, Failed
from tests.ingest.faults import crashing_task


def test_a_worker_that_dies_fails_only_its_own_task_and_the_pool_goes_on(tmp_path):
    """A worker killed mid-task (OOM killer, a segfault in a decoder) broke the whole ProcessPoolExecutor: every task
    in flight raised BrokenProcessPool, the run stopped, and each rerun stopped at the same unit. Now the pool is
    started again and the tasks in flight run again; the one that kills its worker alone comes back Failed, one that
    died once only (task 5) succeeds, and the engine serves the next phase."""
    engine = Engine("local", 2)
    try:
        marker = str(tmp_path / "crashed-once")
        results = dict(engine.run(crashing_task, ((x, (x, marker)) for x in range(10))))
        assert sorted(results) == list(range(10))
        assert isinstance(results[3], Failed) and "worker process died" in results[3].reason, results[3]
        assert {x: r for x, r in results.items() if x != 3} == {x: 2 * x for x in range(10) if x != 3}
        assert dict(engine.run(crashing_task, ((x, (x, marker)) for x in (10, 11)))) == {10: 20, 11: 22}
    finally:
        engine.close()


def test_a_pool_broken_while_idle_or_between_results_is_started_again():
    """A worker that dies while the pool waits for nothing (between two phases, or while the consumer handles a
    result) is found at the next submit, which raised BrokenProcessPool out of the run (review s16c). The task that
    was refused never ran: it runs on a fresh pool."""
    import time

    from tests.ingest.faults import dying_worker

    engine = Engine("local", 2)
    try:
        assert dict(engine.run(dying_worker, [(0, 0)])) == {0: 0}
        time.sleep(1.0)  # its worker is dead now: the next phase's first submit finds the pool broken
        assert dict(engine.run(dying_worker, ((i, i) for i in range(1, 6)))) == {i: i for i in range(1, 6)}
        results = {}
        for i, r in engine.run(dying_worker, ((i, i) for i in (0, 7, 8, 9))):
            results[i] = r
            time.sleep(0.5)  # the consumer is busy while task 0's worker dies
        assert results == {0: 0, 7: 7, 8: 8, 9: 9}
    finally:
        engine.close()


def test_ray_results_come_by_completion_callbacks_and_a_task_that_kills_its_worker_comes_back_failed(tmp_path,
                                                                                                      monkeypatch):
    """executor._run_ray on local Ray, with fewer slots in its window (2 x 2 CPUs) than tasks: every task's result
    comes back once, through its ref's completion callback; a task whose worker dies every time comes back Failed
    after Ray's own retries, and one whose worker died once is retried by Ray and succeeds."""
    import ray

    def no_wait(*args, **kwargs):
        raise AssertionError("ray.wait over the refs in flight: O(in flight) of driver CPU per result")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    monkeypatch.setattr(ray, "wait", no_wait)
    try:
        engine = Engine("ray", 0)
        marker = str(tmp_path / "crashed-once")
        results = dict(engine.run(crashing_task, ((x, (x, marker)) for x in range(10))))
        assert sorted(results) == list(range(10))
        assert isinstance(results[3], Failed) and "died" in results[3].reason.lower(), results[3]
        assert {x: r for x, r in results.items() if x != 3} == {x: 2 * x for x in range(10) if x != 3}
    finally:
        ray.shutdown()
