"""A loader worker process: reads its shards, validates, shuffles and batches samples, draws each batch's augmentation
parameters, and hands the encoded batch to the training process through shared memory.

Everything per sample happens here, in processes of their own with their own GIL (reading, tar parsing and validation
cost ~100-400 us per sample, which at 2,500 images/s would fill one GIL, the trainer's): the training process only
receives one message per DALI iteration (spec.group batches; their mask keys, ~100 KB a batch at ViT-B/16 with batch
64, lie in the slot), gives DALI views of the shared-memory slot, and dispatches GPU work. This module imports no torch, and workers do not import the
trainer's __main__ (worker_pool._main_module_hidden), so a worker starts in a fraction of a second (forked from a
preloaded forkserver) and holds ~90 MB, not ~450.

Worker w of rank r reads shards as reader r * W + w (shards.ShardPlan) and makes that stream's batches k = 0, 1, ...;
its batch k is the rank's batch k * W + w: the number that seeds the batch's augmentation (view_params.py), so a batch
is the same whichever order the training process takes them in, and however many share a DALI iteration. The worker's
stream state after each iteration travels with it: the loader's checkpoint holds each worker's state as of the last
iteration the trainer took whole, and how many batches of the next it took (loader._Producer._record).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import AugmentConfig
from pipeline.counters import Counters
from pipeline.mscn_params import MaskParams, draw_batch_masks
from pipeline.readers import ReadSettings
from pipeline.sampler import BatchStream, StreamClosed
from pipeline.shards import ShardPlan, reader_id
from pipeline.shm_ring import SlotRing, byte_lengths
from pipeline.view_params import draw_batch, pack_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process needs (pickled to it once, at start)."""

    plan: ShardPlan
    train: bool
    rank: int
    worker: int
    workers: int  # per rank
    settings: ReadSettings
    batch_size: int
    shuffle_buffer: int
    seed: int
    augment: AugmentConfig
    num_views: int
    num_patches: int
    img_size: int
    state: dict[str, Any] | None  # this worker's stream state to resume from (None: from the start)
    # The training process's environment when the loader started (AWS_* endpoint and credentials among it): the
    # forkserver the worker comes from may have started earlier, with another one.
    environ: dict[str, str]
    trainer_pid: int  # the training process: the worker ends when it is gone (killed with SIGKILL, say)
    slot_names: tuple[str, ...] = ()
    slot_bytes: int = 0
    group: int = 1  # batches per message (one DALI iteration): DataConfig.iteration_batches

    @property
    def reader_id(self) -> int:
        return reader_id(self.rank, self.worker, self.workers, self.plan.num_readers // self.workers, self.train)


@dataclass
class Batch:
    """One DALI iteration's encoded samples: `parts` consecutive batches of one worker, each of batch_size samples
    (train; eval: one batch, possibly short). images in shared memory (slot, lengths, stride: SlotRing.write), or
    inline when they did not fit a slot. Arrays run over every part's samples, part by part."""

    worker: int
    index: int  # the rank's batch number of the message's first batch: k * workers + worker (its j-th: + j * workers)
    keys: list[str]
    labels: np.ndarray  # int64 [n]
    slot: int | None
    lengths: np.ndarray  # int32 [n]: the images' sizes in bytes
    stride: int  # in the slot: image i at i * stride (0: back to back)
    images: list[bytes] | None
    params: np.ndarray | None  # train: the views' augmentation parameters, [V, B, K] float32 (pack_params); eval: None
    # train: [V, B, L] float32 U[0, 1); eval: None. Travels in the slot's tail (shape in mask_keys_shape, the field
    # None on the pipe) unless the batch is inline; WorkerPool.next_batch puts it back as a view of the tail.
    mask_keys: np.ndarray | None
    masks: list[list[list[MaskParams]]]  # MSCN: per part, per view, one per masked copy; else []
    state: dict[str, Any]  # the worker's stream state after the last part
    counters: dict[str, float]  # the worker's raw counters so far
    mask_keys_shape: tuple[int, ...] | None = None
    parts: int = 1


@dataclass
class Ready:
    worker: int


@dataclass
class End:
    """Eval: the worker has read all its shards."""

    worker: int
    counters: dict[str, float]


@dataclass
class Failed:
    worker: int
    error: str


class StopFlag:
    """The loader's "stop" for its workers: one byte of shared memory, read and written without a lock. (A
    multiprocessing.Event takes a cross-process lock on every is_set(): a worker SIGKILLed while holding it, during
    its poll, would leave the training process blocked on that lock for ever.)"""

    def __init__(self, ctx: Any):
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)


# Signals a worker ignores. SLURM (--signal without B:, scancel, preemption) and a terminal's Ctrl-C signal every
# process of the job step, the workers as well as their rank: the rank turns SIGTERM / SIGUSR1 into a checkpoint at
# the next step boundary, and needs its workers' batches until then. Workers end when the loader stops them or their
# training process is gone (_watch), or by SIGKILL.
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class _Sender:
    """The worker's end of its pipe to the loader, for every thread of the worker (the reader logs too). A thread of
    its own does the writing, so the worker runs ahead of a loader that is not reading (its slots bound how far)."""

    def __init__(self, conn: Any):
        self.conn, self.queue = conn, queue.Queue()
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        while (msg := self.queue.get()) is not None:
            self.conn.send(msg)

    def put_nowait(self, msg: Any) -> None:  # logging.handlers.QueueHandler's call
        self.queue.put(msg)

    put = put_nowait

    def flush(self) -> None:
        self.queue.put(None)
        self.thread.join()


def run_worker(spec: WorkerSpec, conn: Any, free: Any, stop: StopFlag) -> None:
    """The worker's main: conn = the writing end of its pipe to the loader (the worker holds the only one, so its
    death reads as the end of the pipe there), free = a semaphore of this worker's credits, one per message (an
    iteration of spec.group batches) sent and not yet done with (the loader releases one per message, slotted or
    inline, in the order it got them; so at most `slots` iterations are in flight, and the slot written next is
    always free), stop = set when the loader closes."""
    for s in IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(spec.environ)
    out = _Sender(conn)
    # Warnings (a skipped shard, a retried read) go to the training process's logging, as records on the pipe.
    logging.basicConfig(level=logging.INFO, handlers=[logging.handlers.QueueHandler(out)], force=True)
    ring = stream = None
    halt = threading.Event()  # the loader closes, or the training process is gone
    try:
        ring = SlotRing.attach(list(spec.slot_names), spec.slot_bytes)
        counters = Counters()
        stream = BatchStream(spec.plan, spec.train, [spec.reader_id], spec.settings, counters, spec.batch_size,
                             spec.shuffle_buffer, spec.seed, spec.reader_id)
        if spec.state is not None:
            stream.load_state(spec.state)  # a state that does not fit is reported (Failed), not a silent exit
        encoder = _Encoder(spec, ring, free, halt, counters)
        out.put(Ready(spec.worker))
        stream.start()
        threading.Thread(target=_watch, args=(stop, spec.trainer_pid, halt, stream), daemon=True).start()
        while not halt.is_set():
            encs = []
            while len(encs) < spec.group and (enc := stream.next_batch()) is not None:
                encs.append(enc)
            if encs:
                out.put(encoder(encs))
            if len(encs) < spec.group:
                out.put(End(spec.worker, counters.values()))
                return
    except StreamClosed:
        return
    except Exception:  # a bug or an unusable source: the trainer must see it, not wait on an empty queue
        out.put(Failed(spec.worker, traceback.format_exc()))
    finally:
        if stream is not None:
            stream.close()
        if ring is not None:
            ring.close()
        if not halt.is_set():  # a normal end (eval): the loader reads on until it has everything
            out.flush()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped) still takes signals
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _watch(stop: StopFlag, trainer_pid: int, halt: threading.Event, stream: BatchStream) -> None:
    """Halt the worker (and close its stream, which unblocks next_batch) once the loader stops or the training
    process is gone: a worker of a SIGKILLed rank would otherwise wait on its slots for ever. Polls a lock-free flag
    (StopFlag): nothing the worker holds can block the loader when the worker dies."""
    while not stop.is_set() and _alive(trainer_pid):
        time.sleep(0.2)
    halt.set()
    stream.close()


class _Encoder:
    """EncodedBatch -> Batch: the augmentation draws, and the images into the next slot of the ring."""

    def __init__(self, spec: WorkerSpec, ring: SlotRing, free: Any, halt: threading.Event, counters: Counters):
        self.spec, self.ring, self.free, self.halt, self.counters = spec, ring, free, halt, counters
        self.next_slot = 0  # slots are filled, and given back, in ring order

    def _acquire(self) -> None:
        while not self.halt.is_set():
            if self.free.acquire(timeout=0.1):
                return
        raise StreamClosed

    def __call__(self, encs: list) -> Batch:
        """encs: consecutive batches of this worker's stream, one DALI iteration. Each batch's draws are seeded by its
        own rank batch number, so a batch is the same however many share its iteration."""
        spec, mscn = self.spec, self.spec.augment.mscn
        indices = [enc.index * spec.workers + spec.worker for enc in encs]
        params = mask_keys = None
        if spec.train:
            drawn = [draw_batch(enc.sizes, spec.augment, spec.num_views, spec.num_patches, spec.seed, spec.rank, i)
                     for enc, i in zip(encs, indices)]
            params = _joined([pack_params(spec.augment, views) for views in drawn])  # [V, n, K]
            mask_keys = _joined([np.stack([v.mask_keys for v in views]) for views in drawn])  # [V, n, L]
        masks = ([draw_batch_masks(len(enc.images), spec.img_size, mscn, spec.num_views, spec.seed, spec.rank, i)
                  for enc, i in zip(encs, indices)] if spec.train and mscn is not None else [])
        images = encs[0].images if len(encs) == 1 else [image for enc in encs for image in enc.images]
        batch = Batch(spec.worker, indices[0], [k for enc in encs for k in enc.keys],
                      np.asarray([label for enc in encs for label in enc.labels], np.int64), None, None, 0, None,
                      params, mask_keys, masks, encs[-1].state, {}, parts=len(encs))
        self._acquire()
        written = self.ring.write(self.next_slot, images, mask_keys)
        if written is None:  # larger than a slot: inline, pickled through the pipe. It keeps its credit
            self.counters.add("batches_over_slot", len(encs))  # (the loader gives it back): inline ones are bounded
            batch.images = list(images)
            batch.lengths = byte_lengths(images)
        else:
            batch.lengths, batch.stride = written
            if mask_keys is not None:
                batch.mask_keys, batch.mask_keys_shape = None, mask_keys.shape
            if batch.stride == 0:  # one image far above the rest: a list feed, ~0.4 ms more of the trainer's CPU
                self.counters.add("batches_packed", len(encs))
            batch.slot, self.next_slot = self.next_slot, (self.next_slot + 1) % len(self.ring.segments)
        batch.counters = self.counters.values()
        return batch


def _joined(per_batch: list[np.ndarray]) -> np.ndarray:
    """[V, n_j, ...] arrays of consecutive batches -> [V, sum n_j, ...]."""
    return per_batch[0] if len(per_batch) == 1 else np.concatenate(per_batch, axis=1)
