"""One phase of an ingest run: its tasks on the engine, its saved summaries, quarantine and progress.

A phase is `n` independent tasks (id, task). Each task's summary is a few numbers; the phase keeps them as arrays
indexed by task id, saves them every CHECKPOINT_S seconds (`done/PHASE.partial.parquet`) and when the phase ends
(`done/PHASE.parquet`). A phase whose summaries were saved is not run again; an interrupted one resubmits only the
tasks missing from its checkpoint, and those that finished since find their own done marks (done.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.ingest.atomic import put_table, url_to_fs
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.executor import Engine, Failed, Resources
from pipeline.ingest.layout import Layout
from pipeline.ingest.retry import Retried, RetryPolicy, retry
from pipeline.ingest.sources import IngestError

log = logging.getLogger(__name__)

# Test hook: "PHASE:N" SIGKILLs this process group after N completed tasks of that phase (list, stage, map,
# reduce, resolve, shard).
KILL_HOOK_ENV = "CANVIT_INGEST_TEST_KILL_AFTER"
CHECKPOINT_S = 60.0  # how often a running phase's summaries are saved (a kill costs at most this much re-checking)
# Memory each task asks Ray for (MB): what it holds at its peak, with room for Python and Pillow.
RESOURCES = {"list": Resources(1, 1024), "stage": Resources(1, 1536), "map": Resources(1, 2048),
             "reduce": Resources(1, 3072), "resolve": Resources(1, 2048), "shard": Resources(1, 1024),
             "give_up": Resources(1, 1024)}


class QuarantineError(IngestError):
    """Some tasks failed after their retries; everything else of the phase is saved. Rerun to retry them."""

    def __init__(self, phase: str, failures: list[tuple[int, Failed]]):
        self.phase, self.failures = phase, failures
        lines = [f"  {phase} {i}: {f.reason} ({f.where})" for i, f in failures[:20]]
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        super().__init__(f"{len(failures)} {phase} task(s) quarantined after retries; the rest of the phase is "
                         f"saved. Rerun the same command to retry them.\n" + "\n".join(lines) + more)


class Run:
    """One run's phases: saved summaries, quarantine, progress and the kill hook."""

    def __init__(self, cfg: IngestConfig, layout: Layout, engine: Engine, fs):
        self.cfg, self.layout, self.engine, self.fs = cfg, layout, engine, fs
        self.policy = RetryPolicy(cfg.retries, cfg.retry_base_s)

    def phase(self, name: str, fn: Callable, tasks: Iterator[tuple[int, object]], n: int, fields: tuple[str, ...],
              progress: str | None = None, keep_json: str | None = None,
              quarantine: list[tuple[int, Failed]] | None = None) -> dict[str, np.ndarray]:
        """Run `n` tasks (id, task); returns each summary field as an array indexed by task id. A phase whose
        summaries were saved is not run again; one interrupted resumes from its last checkpoint (tasks done since
        find their own done marks). Failed tasks raise QuarantineError once the others are done, or, given a
        `quarantine` list, are appended to it (their fields stay 0) and the phase is left unfinished, so the next
        run retries exactly them."""
        saved = self._load(self.layout.phase_done(name))
        if saved is not None:
            return saved
        partial = self._load(self.layout.phase_done(name + ".partial"))
        cols = {f: np.zeros(n, np.float64 if f == "seconds" else np.int64) for f in fields}
        if keep_json:
            cols[keep_json] = np.full(n, "{}", dtype=object)
        done = np.zeros(n, bool)
        if partial is not None:
            done[partial["id"]] = True
            for f in cols:
                cols[f][partial["id"]] = partial[f]
        failures: list[tuple[int, Failed]] = []
        last_save = time.monotonic()
        bar = _Progress(name, n, int(done.sum()), self.cfg.quiet, progress)
        pending = ((i, t) for i, t in tasks if not done[i])
        task_fn = Retried(fn, self.policy, name)
        for count, (i, result) in enumerate(self.engine.run(task_fn, pending, RESOURCES[name]), 1):
            if isinstance(result, Failed):
                failures.append((i, result))
                log.warning("%s task %d quarantined: %s (%s)", name, i, result.reason, result.where)
                continue
            done[i] = True
            for f in cols:
                cols[f][i] = json.dumps(result[f]) if f == keep_json else result[f]
            bar.advance(result.get(progress, 0) if progress else 0)
            maybe_kill(name, count)
            if time.monotonic() - last_save > CHECKPOINT_S:
                self._save(self.layout.phase_done(name + ".partial"), done, cols)
                last_save = time.monotonic()
        bar.close()
        if failures:
            self._save(self.layout.phase_done(name + ".partial"), done, cols)
            if quarantine is None:
                raise QuarantineError(name, failures)
            quarantine.extend(failures)
        else:
            self._save(self.layout.phase_done(name), done, cols)
        return {f: cols[f] for f in cols}

    def _save(self, url: str, done: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        ids = np.flatnonzero(done)
        table = pa.table({"id": ids, **{f: (list(c[ids]) if c.dtype == object else c[ids]) for f, c in cols.items()}})
        # Retried: a failed checkpoint write was an uncaught error of the driver, the run's end (review s16a).
        retry(lambda: put_table(url, table, self.cfg.storage_options), self.policy, f"save {url}")

    def _load(self, url: str) -> dict[str, np.ndarray] | None:
        fs, path = url_to_fs(url, self.cfg.storage_options)

        def read() -> pa.Table | None:
            if not fs.exists(path):
                return None
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).read()

        table = retry(read, self.policy, f"read {url}")
        if table is None:
            return None
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def maybe_kill(phase: str, completed: int) -> None:
    hook = os.environ.get(KILL_HOOK_ENV, "")
    if hook == f"{phase}:{completed}":
        os.killpg(os.getpgrp(), signal.SIGKILL)


class _Progress:
    """tqdm bar with items/s, or (quiet) one log line per 5% of the tasks."""

    def __init__(self, phase: str, total: int, initial: int, quiet: bool, unit: str | None):
        self.phase, self.quiet, self.unit, self.items, self.start = phase, quiet, unit, 0, time.perf_counter()
        self.bar = None if quiet else tqdm(total=total, initial=initial, desc=phase, unit="task", dynamic_ncols=True)
        self.tasks, self.total, self.step = initial, total, max(1, total // 20)

    def advance(self, items: int) -> None:
        self.items += items
        self.tasks += 1
        rate = self.items / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            if self.unit:
                self.bar.set_postfix_str(f"{rate:.1f} {self.unit}/s", refresh=False)
            self.bar.update(1)
        elif self.tasks % self.step == 0 or self.tasks == self.total:
            log.info("%s %d/%d tasks%s", self.phase, self.tasks, self.total,
                     f", {self.items} {self.unit}, {rate:.1f}/s" if self.unit else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
