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
