"""The worker processes of one rank's loader (worker.py), and the order in which their batches are taken.

Processes come from a forkserver that has imported pipeline.worker once, so each starts in tens of milliseconds and
none is forked from a training process that holds CUDA state. Each worker gets a ring of shared-memory slots
(shm_ring.py, unlinked as soon as it is mapped) and a semaphore counting its free slots.

Order: "ordered" takes batches round-robin over the active workers, worker w's k-th batch as the rank's batch
k * W + w, so a restart replays the stream exactly (the default; a worker that falls further behind than its
worker_prefetch batches makes the rank wait for it). Unordered takes whichever worker's batch is ready first: a slow
or retrying worker never holds the others up, and a restart still loses and repeats nothing (each worker resumes at
its own position), but the interleaving of workers after a restart is not the uninterrupted run's.
Eval: a worker that has read all its shards leaves the rotation; the pass ends when none is left.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing as mp
import queue
import time
from typing import Any

import numpy as np

from pipeline.shm_ring import SlotRing
from pipeline.worker import Batch, End, Failed, Ready, WorkerSpec, drain, run_worker

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a worker process that has not mapped its slots by then is reported, not waited for


class PoolClosed(Exception):
    """Raised in a thread waiting for a batch when the pool is closed."""


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.worker"])  # takes effect when the forkserver starts (once per process)
    return ctx


class WorkerPool:
    def __init__(self, specs: list[WorkerSpec], slots: int, slot_bytes: int, ordered: bool, position: dict | None):
        """specs: one per worker, without slot names (filled in here); position: from position() to resume."""
        ctx = _context()
        self.ordered = ordered
        self.queue = ctx.Queue()
        self.stop = ctx.Event()
        self.rings = [SlotRing.create(slots, slot_bytes, f"loader worker {s.worker} of rank {s.rank}") for s in specs]
        self.free = [ctx.Semaphore(slots) for _ in specs]
        self.procs = []
        for spec, ring, free in zip(specs, self.rings, self.free):
            spec = dataclasses.replace(spec, slot_names=tuple(ring.names), slot_bytes=slot_bytes)
            self.procs.append(ctx.Process(target=run_worker, args=(spec, self.queue, free, self.stop),
                                          name=f"loader-rank{spec.rank}-worker{spec.worker}", daemon=True))
        for p in self.procs:
            p.start()
        self.pending: dict[int, collections.deque] = {w: collections.deque() for w in range(len(specs))}
        self.arrivals: collections.deque[int] = collections.deque()  # worker of each pending message, in arrival order
        self.worker_counters: dict[int, dict[str, float]] = {}
        self.active = list(range(len(specs))) if position is None else list(position["active"])
        self.rr = 0 if position is None else int(position["rr"])
        self._await_ready(len(specs))

    def _await_ready(self, n: int) -> None:
        """Every worker has mapped its slots: unlink the names (see shm_ring.py)."""
        ready, deadline = set(), time.monotonic() + START_TIMEOUT_S
        while len(ready) < n:
            msg = self._receive(deadline)
            if isinstance(msg, Ready):
                ready.add(msg.worker)
            else:
                self._route(msg)
        for ring in self.rings:
            ring.unlink()

    def _receive(self, deadline: float | None = None) -> Any:
        while True:
            if self.stop.is_set():
                raise PoolClosed
            try:
                msg = self.queue.get(timeout=0.5)
            except queue.Empty:
                self._check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"loader workers did not start within {START_TIMEOUT_S:.0f} s")
                continue
            if isinstance(msg, Failed):
                raise RuntimeError(f"loader worker {msg.worker} failed:\n{msg.error}")
            if isinstance(msg, logging.LogRecord):  # a worker's log line: emitted here, by this process's handlers
                logging.getLogger(msg.name).handle(msg)
                continue
            return msg

    def _check_alive(self) -> None:
        for w, p in enumerate(self.procs):
            if p.exitcode not in (None, 0):  # 0: a clean exit after its End message, or at close
                raise RuntimeError(f"loader worker {w} ({p.name}) died with exit code {p.exitcode} (killed for "
                                   "memory, or a crash in a native library)")

    def _route(self, msg: Any) -> None:
        self.pending[msg.worker].append(msg)
        self.arrivals.append(msg.worker)
        self.worker_counters[msg.worker] = msg.counters

    def next_batch(self) -> Batch | None:
        """The next batch in this pool's order, or None when every worker has ended (eval)."""
        while self.active:
            self.rr %= len(self.active)
            w = self.active[self.rr] if self.ordered else self._first_ready()
            if w is None or not self.pending[w]:
                self._route(self._receive())
                continue
            msg = self.pending[w].popleft()
            self.arrivals.remove(w)
            if isinstance(msg, End):
                i = self.active.index(w)
                self.active.pop(i)
                self.rr -= i < self.rr  # the cursor keeps pointing at the same next worker
                continue
            self.rr = (self.active.index(w) + 1) % len(self.active)
            return msg
        return None

    def _first_ready(self) -> int | None:
        return self.arrivals[0] if self.arrivals else None

    def release(self, batch: Batch) -> None:
        """The loader is done with batch's slot (DALI has produced its outputs)."""
        if batch.slot is not None:
            self.free[batch.worker].release()

    def views(self, batch: Batch) -> list[np.ndarray]:
        """The batch's encoded images as uint8 arrays: views of its slot (no copy), or of its inline bytes."""
        if batch.images is not None:
            return [np.frombuffer(b, np.uint8) for b in batch.images]
        return self.rings[batch.worker].views(batch.slot, batch.offsets)

    def position(self) -> dict:
        return {"active": list(self.active), "rr": self.rr}

    def counters(self) -> list[dict[str, float]]:
        return list(self.worker_counters.values())

    def close(self) -> None:
        """Stop the workers; one still blocked after 2 s (a read held up by the storage) is terminated."""
        self.stop.set()
        deadline = time.monotonic() + 2
        for p in self.procs:
            while p.is_alive() and time.monotonic() < deadline:
                drain(self.queue)  # a worker's queue feeder may be blocked on a full pipe
                p.join(timeout=0.1)
            if p.is_alive():
                log.warning("loader worker %s did not stop in time: terminated", p.name)
                p.terminate()
                p.join(timeout=5)
        drain(self.queue)
        self.queue.close()
        for ring in self.rings:
            ring.close()
