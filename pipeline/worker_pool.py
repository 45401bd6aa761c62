"""The worker processes of one rank's loader (worker.py), and the order in which their batches are taken.

Processes come from a forkserver that has imported pipeline.worker once, so each starts in tens of milliseconds and
none is forked from a training process that holds CUDA state. Each worker gets a ring of shared-memory slots
(shm_ring.py, unlinked as soon as it is mapped), a semaphore counting its free slots, and a pipe of its own whose
writing end only it holds: a worker that dies, even in the middle of a message, reads here as the end of its pipe
(a shared multiprocessing.Queue would leave the reader waiting for the rest of that message for ever).

Order: "ordered" takes batches round-robin over the active workers, worker w's k-th batch as the rank's batch
k * W + w, so a restart replays the stream exactly (the default; a worker that falls further behind than its
worker_prefetch batches makes the rank wait for it). Unordered takes whichever worker's batch is ready first: a slow
or retrying worker never holds the others up, and a restart still loses and repeats nothing (each worker resumes at
its own position), but the interleaving of workers after a restart is not the uninterrupted run's.
Eval: a worker that has read all its shards leaves the rotation; the pass ends when none is left.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.util
import select
import signal
import sys
import time
import weakref
from typing import Any

import numpy as np

from pipeline.shm_ring import SlotRing
from pipeline.worker import Batch, End, Failed, Ready, StopFlag, WorkerSpec, run_worker

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a worker process that has not mapped its slots by then is reported, not waited for


_LIVE: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register  # after multiprocessing.util's own hook, so it runs first (atexit runs last-registered first)
def _close_live_pools() -> None:
    """A training process that exits without closing its loader (an error on the way out): multiprocessing's exit
    hook would SIGTERM its daemon workers and join them, and workers ignore SIGTERM (worker.IGNORED_SIGNALS), so the
    process would never end. Close them here first: the stop flag, then SIGKILL for any still running."""
    for pool in list(_LIVE):
        pool.close()


class PoolClosed(Exception):
    """Raised in a thread waiting for a batch when the pool is closed."""


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.forkserver_init"])  # when the forkserver starts (once per process)
    return ctx


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the process that unlinks shared memory a crashed process leaves)
    with SIGUSR1 and SIGUSR2 blocked, as it starts itself with SIGINT and SIGTERM blocked: SLURM's `--signal=USR1`
    reaches every process of the step, and a tracker killed by it is relaunched with a warning by the next process
    that needs it. Blocked, not ignored, in this thread only: a signal meanwhile still reaches the trainer."""
    from multiprocessing import resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _main_module_hidden():
    """A forkserver child imports the parent's __main__ (spawn.prepare) before it runs its target: for the trainer,
    jobs/pretrain.py with torch and DeepSpeed, about 400 MB and seconds per worker, for nothing (run_worker needs
    pipeline/ only). Without __file__ and __spec__ on __main__ while the process starts, none is imported."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)


class WorkerPool:
    def __init__(self, specs: list[WorkerSpec], slots: int, slot_bytes: int, ordered: bool, position: dict | None):
        """specs: one per worker, without slot names (filled in here); position: from position() to resume."""
        ctx = _context()
        self.ordered = ordered
        self.stop = StopFlag(ctx)
        self.rings: list[SlotRing] = []
        # conns: fd -> (the reading end of a live worker's pipe, its worker). One poll object over them, kept:
        # connection.wait builds a selector per call (~0.1 ms of the loader thread's CPU per batch on this VM).
        self.procs, self.conns, self.poller = [], {}, select.poll()
        _LIVE.add(self)
        self.inbox: collections.deque = collections.deque()  # received, not yet routed
        self.ended: set[int] = set()  # workers whose End message came
        self.pending: dict[int, collections.deque] = {w: collections.deque() for w in range(len(specs))}
        self.arrivals: collections.deque[int] = collections.deque()  # worker of each pending message, in arrival order
        self.worker_counters: dict[int, dict[str, float]] = {}
        self.active = list(range(len(specs))) if position is None else list(position["active"])
        self.rr = 0 if position is None else int(position["rr"])
        try:
            self._start(ctx, specs, slots, slot_bytes)
            self._await_ready(len(specs))
        except BaseException:  # no process and no shared memory outlives a pool that failed to start
            self.close()
            raise

    def _start(self, ctx: Any, specs: list[WorkerSpec], slots: int, slot_bytes: int) -> None:
        _start_resource_tracker()
        for s in specs:
            self.rings.append(SlotRing.create(slots, slot_bytes, f"loader worker {s.worker} of rank {s.rank}"))
        self.free = [ctx.Semaphore(slots) for _ in specs]
        for spec, ring, free in zip(specs, self.rings, self.free):
            spec = dataclasses.replace(spec, slot_names=tuple(ring.names), slot_bytes=slot_bytes)
            reading, writing = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=run_worker, args=(spec, writing, free, self.stop),
                               name=f"loader-rank{spec.rank}-worker{spec.worker}", daemon=True)
            with _main_module_hidden():
                proc.start()
            writing.close()  # the worker's is now the only writing end
            self.procs.append(proc)
            self.conns[reading.fileno()] = (reading, spec.worker)
            self.poller.register(reading.fileno(), select.POLLIN)

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
        """The next message from any worker (a worker's own messages in order)."""
        while not self.inbox:
            if self.stop.is_set():
                raise PoolClosed
            ready = self.poller.poll(500)  # POLLIN, or POLLHUP at a worker's end: both read below
            if not ready and deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"loader workers did not start within {START_TIMEOUT_S:.0f} s")
            for fd, _ in ready:
                self._read(fd)
        return self.inbox.popleft()

    def _read(self, fd: int) -> None:
        conn, worker = self.conns[fd]
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            # The worker exited: after its End message (eval) that is its normal end. A worker killed in the middle
            # of a message (most are larger than a pipe's buffer) reads as OSError("got end of file during message").
            del self.conns[fd]
            self.poller.unregister(fd)
            if worker not in self.ended:
                self.procs[worker].join(timeout=5)
                raise RuntimeError(f"loader worker {worker} ({self.procs[worker].name}) died with exit code "
                                   f"{self.procs[worker].exitcode} (killed for memory, or a crash in a native "
                                   "library)") from None
            return
        if isinstance(msg, Failed):
            raise RuntimeError(f"loader worker {msg.worker} failed:\n{msg.error}")
        if isinstance(msg, logging.LogRecord):  # a worker's log line: emitted here, by this process's handlers
            logging.getLogger(msg.name).handle(msg)
            return
        if isinstance(msg, End):
            self.ended.add(worker)
        self.inbox.append(msg)

    def _route(self, msg: Any) -> None:
        self.worker_counters[msg.worker] = msg.counters
        if msg.worker not in self.active:  # a worker that had ended before the saved position repeats its End
            return
        self.pending[msg.worker].append(msg)
        self.arrivals.append(msg.worker)

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
            if msg.mask_keys_shape is not None:
                msg.mask_keys = self.rings[w].tail(msg.slot, msg.mask_keys_shape, np.float32)  # a view: see release
            return msg
        return None

    def _first_ready(self) -> int | None:
        return self.arrivals[0] if self.arrivals else None

    def release(self, batch: Batch) -> None:
        """The loader is done with `batch` (DALI has produced its outputs, and the mask keys, a view of the slot's
        tail, have been copied out): its worker's credit, and with it its slot if it had one, comes back. Inline
        messages hold a credit too, so a worker whose iterations do not fit its slots still runs at most `slots`
        iterations ahead."""
        self.free[batch.worker].release()

    def views(self, batch: Batch) -> np.ndarray | list[np.ndarray]:
        """The batch's encoded images, as DALI takes them (augment.feed_images): views of its slot (no copy; one
        [n, stride] array, or a list), or of its inline bytes (a list)."""
        if batch.images is not None:
            return [np.frombuffer(b, np.uint8) for b in batch.images]
        return self.rings[batch.worker].views(batch.slot, batch.lengths, batch.stride)

    def position(self) -> dict:
        return {"active": list(self.active), "rr": self.rr}

    def counters(self) -> list[dict[str, float]]:
        return list(self.worker_counters.values())

    def close(self) -> None:
        """Stop the workers; one still blocked after 2 s (a read held up by the storage) is killed. A stopping
        worker does not wait for its last messages to be read (worker.run_worker): the pipes are just closed."""
        _LIVE.discard(self)
        self.stop.set()
        deadline = time.monotonic() + 2
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("loader worker %s did not stop in time: killed", p.name)
                p.kill()  # workers ignore SIGTERM (worker.IGNORED_SIGNALS)
                p.join(timeout=5)
        for fd, (conn, _) in self.conns.items():  # a poll left running must not see a closed pipe's fd number reused
            self.poller.unregister(fd)
            conn.close()
        self.conns.clear()
        for ring in self.rings:
            ring.unlink()  # (already unlinked once every worker was ready; not when the start failed)
            ring.close()
