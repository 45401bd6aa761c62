"""build_loader: the one entry point the trainer and the probes call (contracts.md).

    loader = build_loader(cfg, rank, world_size, device)
    for batch in loader:          # train: endless, or cfg.steps_per_epoch steps per `for`; eval: one pass
        batch["view1"]            # [B,3,H,W] float32, normalised, on `device`
        batch["view2"]            # [B,3,H,W] (absent when cfg.num_views == 1)
        batch["mask_keys1"]       # [B,L] float32 uniform [0,1): the model argsorts them (low = visible, as MAE)
        batch["mask_keys2"]       # [B,L] (absent when num_views == 1)
        batch["views_extra"]      # MSCN with num_masks M > 1: [B,M-1,3,H,W] float32, view 1's other masked copies
        batch["labels"]           # [B] int64, -1 where the sample has no .cls
        batch["keys"]             # list[str] of B sample keys
    ckpt["data"] = loader.state_dict(); loader.load_state_dict(ckpt["data"]); loader.counters()

Eval mode reads every sample exactly once across ranks. Ranks may get different numbers of samples (shards are split
between readers, not samples); each rank's last batch is partial (B' < batch_size) rather than padded or dropped, so
callers must not run a per-step collective in eval (gather features after the pass instead). Train mode never ends
(shards are resampled per shard-epoch), so every rank can take the same number of steps.

Where the work happens:
- cfg.workers worker processes per rank (worker.py, worker_pool.py) read, parse, validate, shuffle and batch samples
  and draw each batch's augmentation parameters and mask keys (view_params.py, from (seed, rank, batch index));
  a batch's encoded images reach this process through shared memory (shm_ring.py).
- In this process, one producer thread feeds DALI views of those bytes (no copy) and the parameters, with DALI's
  asynchronous pipelined executor running cfg.prefetch iterations ahead (augment.py), and hands DALI's outputs to
  torch without a copy (DLPack), bound to the stream that trains; labels and mask keys go to the GPU as pinned,
  non-blocking copies. In training an iteration is cfg.batches_per_iteration batches of one worker, cut into batches
  here (views): this thread's cost per iteration is paid once for all of them. The trainer's time blocked on the next
  batch is the wait_s counter.
Train and eval both resume exactly from state_dict() (pipeline/README.md, "Resume"). With MSCN masking
(cfg.augment.mscn) the views are high-passed and masked: the workers also draw the masks (mscn_params.py), DALI builds
them, and the noise fill runs here on `device` from host-drawn seeds (mscn_fill.py).
"""

from __future__ import annotations

import collections
import functools
import io
import logging
import os
import queue
import threading
import time
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline import augment, dali_calls
from pipeline.config import DataConfig
from pipeline.counters import Counters
from pipeline.mscn_fill import mscn_batch_fields
from pipeline.mscn_graph import feed_masks
from pipeline.prefetch import RetryPolicy
from pipeline.readers import ReadSettings
from pipeline.shards import ShardPlan, build_plan
from pipeline.shm_ring import byte_lengths
from pipeline.validate import decodes_fully
from pipeline.worker import Batch, WorkerSpec
from pipeline.worker_pool import PoolClosed, WorkerPool

log = logging.getLogger(__name__)

STATE_VERSION = 3  # 3: one stream per worker process (state per worker), batch order of worker_pool.py
# Not bumped when evaluation readers became worker-major (shards.reader_id): training states, the only ones any job
# saves, did not change, and a bump would refuse every training checkpoint written before it. An eval-mode state
# saved before that change, on more than one rank, is refused by the sampler's layout check instead.


def dali_device_id(mode: str, device: torch.device) -> int | None:
    """DALI's device_id for data.device `mode` on a rank that trains on `device` (None: a CPU pipeline).

    auto and cuda decode on the rank's own GPU, the one it trains on (cuda:LOCAL_RANK, jobs/launch.py), so the views
    never cross GPUs; a bare "cuda" would be GPU 0 for every rank of the node."""
    if mode == "cpu" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device()


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A DALI output (TensorList, CPU or GPU) -> torch tensor on `device`, sharing DALI's memory (DLPack). DALI's
    default (dynamic) executor allocates each output anew and frees it when the last reference goes, ordered on the
    stream the outputs were bound to (share_outputs(cuda_stream)), so the tensor stays valid as long as torch holds it."""
    t = torch.utils.dlpack.from_dlpack(tl.as_tensor())
    return t if t.device == device else t.to(device, non_blocking=True)


def _parts(t: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """t's rows cut into `count` equal parts, as views."""
    return (t,) if count == 1 else t.chunk(count)


def _host_to(x: np.ndarray | list, device: torch.device, dtype: torch.dtype | None = None,
             copy: bool = False) -> torch.Tensor:
    """A small host array to `device`: pinned and non-blocking on CUDA (the copy queues on the current stream).
    copy: `x` is a view of memory that will be written again (a shared-memory slot): on the CPU the tensor gets its
    own copy (on CUDA the pinned buffer is one)."""
    # from_numpy: as_tensor's checks of what x might be cost ~50 us of the loader's thread here, per call.
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.clone() if copy else t


class Loader:
    """Iterable of batches for one rank; see the module docstring for the batch layout and mode semantics."""

    def __init__(self, cfg: DataConfig, plan: ShardPlan, rank: int, world_size: int, device: torch.device,
                 sample_counts: dict[str, int]):
        self.cfg, self.plan, self.rank, self.world_size, self.device = cfg, plan, rank, world_size, device
        self.sample_counts = sample_counts  # from manifests; empty when shards were named by pattern or prefix
        self.train = cfg.mode == "train"
        self.dali_device_id = dali_device_id(cfg.device, device)
        self._counters = Counters()
        self._state: dict[str, Any] | None = None  # stream state after the last delivered batch
        self._batches = 0  # batches delivered in this pass (eval) / ever (train)
        self._settings = ReadSettings(cfg.storage_options, cfg.read_block_bytes, cfg.read_concurrency,
                                      RetryPolicy(cfg.read_retries, cfg.retry_backoff_s), cfg.validate)
        self._active: _Producer | None = None
        self._worker_counters: list[dict[str, float]] = []  # of the last closed producer

    # ----- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain python (ints, tuples, dicts): the stream position after the last batch handed to the caller."""
        return {"version": STATE_VERSION, "mode": self.cfg.mode, "rank": self.rank, "world_size": self.world_size,
                "workers": self.cfg.workers, "ordered": self.cfg.ordered, "seed": self.cfg.seed,
                "batches": self._batches, "stream": _plain_stream(self._state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}: it was saved by "
                             "another version of the loader")
        expected = {"mode": self.cfg.mode, "rank": self.rank, "world_size": self.world_size,
                    "workers": self.cfg.workers, "seed": self.cfg.seed}
        for k, v in expected.items():
            if state[k] != v:
                raise ValueError(f"loader state has {k}={state[k]}, this loader {v}: resume needs the same layout")
        self._close()
        self._state, self._batches = state["stream"], int(state["batches"])

    def counters(self) -> dict[str, float]:
        workers = self._active.pool.counters() if self._active is not None else self._worker_counters
        return self._counters.snapshot(workers)

    # ----- iteration ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker processes (their shared-memory slots) and build DALI's pipeline now, rather than at the
        first batch, raising what fails: a node short of /dev/shm, a worker that cannot start or a decoder that
        cannot be built shows here, where a trainer can agree on it with the other ranks (jobs.startup.agree)
        instead of failing alone inside its first step while every other rank waits in a collective."""
        if self._active is None:
            self._active = _Producer(self)
        try:
            self._active.wait_built()
        except Exception:
            self._close()  # the worker processes and their slots go now, not when this process exits
            raise

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._active is None:
            self._active = _Producer(self)
        steps = 0
        # A caller that breaks out of its loop keeps the producer: the next `for` continues from the exact position.
        while self.cfg.steps_per_epoch is None or not self.train or steps < self.cfg.steps_per_epoch:
            t0 = time.monotonic()
            out = self._active.get()
            self._counters.add("wait_s", time.monotonic() - t0)
            if out is None:  # eval pass complete: the next iteration starts a new pass
                self._close()
                self._state, self._batches = None, 0
                return
            batch, state = out
            self._state, self._batches = state, self._batches + 1
            self._counters.add("samples", len(batch["keys"]))
            steps += 1
            yield batch

    def _close(self) -> None:
        if self._active is not None:
            self._worker_counters = self._active.pool.counters()
            self._active.close()
            self._active = None

    def close(self) -> None:
        self._close()

    def __del__(self) -> None:
        self._close()


class _Producer(threading.Thread):
    """Owns the worker pool and the DALI pipeline; turns encoded batches into device batches, cfg.prefetch DALI
    iterations ahead."""

    def __init__(self, loader: Loader):
        super().__init__(name=f"dali-producer-rank{loader.rank}", daemon=True)
        cfg = loader.cfg
        self.loader, self.cfg = loader, cfg
        saved = loader._state or {}
        self.worker_states: dict[int, Any] = {int(w): s for w, s in saved.get("workers", {}).items()}
        # Per worker, batches of its stream still to drop: those it makes again from worker_states (the state before
        # an iteration the trainer had taken only part of when the state was saved). See _record.
        self.skip: dict[int, int] = {int(w): int(n) for w, n in saved.get("skip", {}).items()}
        self.pool = WorkerPool([self._spec(w) for w in range(cfg.workers)], worker_slots(cfg),
                               slot_bytes(cfg, loader.train), cfg.ordered, saved.get("position"))
        # Device batches ready for the trainer, at most cfg.prefetch: a bounded queue made of two C-level queues, the
        # batches and the free places (queue.Queue's Python-level condition variables cost this thread ~0.1 ms per
        # batch on this VM; these a few microseconds).
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.room: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, cfg.prefetch)):
            self.room.put(None)
        self._stop_event = threading.Event()
        self.pipe = None
        self._built = threading.Event()  # set once the thread has built the pipeline (or failed to)
        self._build_error: Exception | None = None
        # Fed to DALI, outputs not taken: each iteration with its parts' states (_record), or None for eval padding.
        self.inflight: collections.deque[tuple[Batch, list[dict | None] | None]] = collections.deque()
        self._blind_drops = 0  # iterations dropped in a row for a DALI failure no Pillow decode explains
        self.start()

    def _spec(self, worker: int) -> WorkerSpec:
        cfg, lo = self.cfg, self.loader
        return WorkerSpec(lo.plan, lo.train, lo.rank, worker, cfg.workers, lo._settings, cfg.batch_size,
                          cfg.shuffle_buffer, cfg.seed, cfg.augment, cfg.num_views, cfg.num_patches, cfg.img_size,
                          self.worker_states.get(worker), dict(os.environ), os.getpid(),
                          group=cfg.iteration_batches)

    def _build_pipe(self):
        cfg, lo = self.cfg, self.loader
        if lo.train:
            return augment.train_pipeline(cfg.batch_size * cfg.iteration_batches, cfg.img_size, cfg.num_views,
                                          cfg.augment, lo.dali_device_id, cfg.dali_threads, cfg.prefetch)
        return augment.eval_pipeline(cfg.batch_size, cfg.img_size, cfg.augment, lo.dali_device_id, cfg.dali_threads,
                                     cfg.prefetch)

    def _put(self, item) -> bool:
        # A trainer that is the bottleneck keeps the queue full: this thread waits here once per batch. A short
        # timeout would wake it every 0.1 s to look at the stop event (~0.15 ms of CPU per batch on this VM); close()
        # makes room in the queue instead, so a blocked put returns at once.
        while not self._stop_event.is_set():
            try:
                self.room.get(timeout=1.0)
            except queue.Empty:
                continue
            if self._stop_event.is_set():  # the room close() made
                break
            self.out.put(item)
            return True
        return False

    def wait_built(self) -> None:
        """Block until the thread has built DALI's pipeline; raise if that failed."""
        self._built.wait()
        if self._build_error is not None:
            raise RuntimeError(f"the data pipeline could not be built: {self._build_error}") from self._build_error

    def run(self) -> None:
        try:
            try:
                self.pipe = self._build_pipe()
            except Exception as e:
                self._build_error = e
                raise
            finally:
                self._built.set()
            self._run()
        except PoolClosed:
            return
        except Exception as e:  # surface in the trainer's thread instead of leaving it blocked
            if not self._stop_event.is_set():
                log.exception("data producer crashed")
                self._put(e)

    def _run(self) -> None:
        """Keep cfg.prefetch iterations in DALI; take the oldest one's outputs; repeat. DALI's first schedule_run runs
        cfg.prefetch iterations, so that many are fed first (an eval pass shorter than that pads with repeats of its
        last batch, whose outputs are dropped)."""
        started = ended = False
        while not self._stop_event.is_set():
            t0 = time.thread_time()
            while not ended and len(self.inflight) < self.cfg.prefetch:
                before = self.pool.position()
                batch = self.pool.next_batch()
                if batch is None:
                    ended = True
                    break
                self._feed(batch, self._record(batch, before))
                if started:
                    dali_calls.schedule_run(self.pipe)
            if not self.inflight:
                self._put(None)  # eval: every worker has ended
                return
            if not started:
                while len(self.inflight) < self.cfg.prefetch:  # a pass shorter than the prefetch depth
                    self._feed(self.inflight[-1][0], None)
                self.pipe.schedule_run()
                started = True
            outputs = self._outputs()
            batch, states = self.inflight.popleft()
            if states is None:  # padding: its slot went back with the batch it repeats
                continue
            results = self._to_batches(batch, outputs, states)  # first: it copies the mask keys out of the slot
            self.pool.release(batch)
            if results:
                self._blind_drops = 0
            delivered = all(self._put(result) for result in results)
            # The wait for room in the queue counts too: its wake-ups are this thread's CPU.
            self.loader._counters.add("input_cpu_s", time.thread_time() - t0)
            if not delivered:
                return

    def _record(self, batch: Batch, before: dict) -> list[dict | None]:
        """The loader state as of each part of `batch` (a part's becomes the loader's state when the trainer takes
        it); None for a part to drop (self.skip). before: the pool's position before it gave `batch`.

        After the last part: every worker's state as of its last batch taken, as before iterations were grouped. After
        an earlier part j: the state from before this iteration, with this worker's skip at j + 1. A resume restarts
        the worker from that state, it makes the same batches again (a batch's draws are seeded by its own number),
        and the first j + 1 of them are dropped here: exact, whatever batches_per_iteration the resumed run uses."""
        w = batch.worker
        earlier = {"workers": dict(self.worker_states), "position": before, "skip": dict(self.skip)}
        skip = self.skip.pop(w, 0)
        drop = min(skip, batch.parts)
        if skip > drop:  # (a state saved under more batches per iteration than this run's)
            self.skip[w] = skip - drop
        self.worker_states[w] = batch.state
        states: list[dict | None] = [None] * drop
        states += [{**earlier, "skip": {**earlier["skip"], w: j + 1}} for j in range(drop, batch.parts - 1)]
        if drop < batch.parts:
            states.append({"workers": dict(self.worker_states), "position": self.pool.position(),
                           "skip": dict(self.skip)})
        return states

    def _feed(self, batch: Batch, states: list[dict | None] | None) -> None:
        # no_copy: DALI reads the shared-memory slot itself; the slot is given back after this batch's outputs.
        augment.feed_images(self.pipe, self.pool.views(batch), batch.lengths)
        if batch.params is not None:
            augment.feed_params(self.pipe, batch.params)
        if batch.masks:
            feed_masks(self.pipe, batch.masks)
        self.inflight.append((batch, states))

    def _outputs(self):
        """The oldest in-flight iteration's outputs, bound to the stream that trains. DALI fails a whole iteration on
        one bad image, and then the pipeline: it is rebuilt and the in-flight iterations fed again without the
        culprits, found by a full Pillow decode, dropped and counted (decode_error). In training a batch that had a
        culprit is dropped whole (its other samples counted as bad_batch), never delivered short: every rank's
        contrastive all-gather needs the same batch size, and a rank with 63 of 64 would break the collective for all
        ranks; the other batches of its iteration go on. In evaluation only the culprits go. When Pillow decodes every
        image (the GPU decoder can refuse what Pillow takes), nothing tells which batch failed: the oldest iteration,
        whose outputs failed, is dropped whole, its keys logged; a failure that does not go away with the data (not
        the data's fault: a device error) is raised after _MAX_BLIND_DROPS such drops with no batch delivered between
        them (the stand-ins fed in their place may well succeed: they do not count). Either way the drop is
        deterministic for data faults, so an exact resume that replays the iteration drops it again rather than
        crash-looping on it (after a one-off device failure, which cost an iteration, a resume from before it
        delivers it: that rank's stream then runs an iteration apart from the interrupted run's)."""
        stream = torch.cuda.current_stream(self.loader.device) if self.loader.device.type == "cuda" else None
        try:
            return dali_calls.share_outputs(self.pipe, stream)
        except RuntimeError as e:
            error = e
        fed = list(self.inflight)
        self.inflight.clear()
        self.pipe = self._build_pipe()
        images = [[image[:n] for image, n in zip(self.pool.views(b), b.lengths.tolist())] for b, _ in fed]
        bad = [[i for i, image in enumerate(imgs) if not decodes_fully(bytes(image))] for imgs in images]
        blind = not any(bad)
        if blind:
            self._blind_drops += 1
            if self._blind_drops > _MAX_BLIND_DROPS:
                raise RuntimeError(f"DALI failed {self._blind_drops} iterations in a row whose images all decode with "
                                   "Pillow, and delivered none between them: not a data fault") from error
            bad[0] = list(range(len(images[0])))
            log.warning("DALI rejected a batch whose images all decode with Pillow (%s): batch dropped, keys %s",
                        str(error).splitlines()[0], fed[0][0].keys)
        for (batch, states), imgs, culprits in zip(fed, images, bad):
            if not culprits:
                self._feed(batch, states)
                continue
            bad_set = set(culprits)
            keep = [i for i in range(len(imgs)) if i not in bad_set]
            counters = self.loader._counters if states is not None else Counters()  # padding repeats count nothing
            if not blind:
                log.warning("DALI rejected a batch (%s): undecodable %s", str(error).splitlines()[0],
                            [batch.keys[i] for i in culprits])
            counters.skip("bad_batch" if blind else "decode_error", len(culprits))
            if keep and not self.loader.train:
                self._feed(_subset(batch, keep, imgs), states)
                continue
            if self.loader.train:  # the iteration's other batches go on, each whole or not at all
                size = len(batch.keys) // batch.parts
                clean = [j for j in range(batch.parts) if not any(j * size <= i < (j + 1) * size for i in culprits)]
                if clean:
                    whole = [i for j in clean for i in range(j * size, (j + 1) * size)]
                    counters.skip("bad_batch", len(keep) - len(whole))
                    self._feed(_subset(batch, whole, imgs, clean), [states[j] for j in clean])
                    continue
            counters.skip("bad_batch", len(keep))
            # DALI takes no empty batch: a stand-in keeps the batch's turn, and its outputs are dropped.
            stand_in = _subset(batch, [0], [_stand_in_jpeg()])
            stand_in.keys, stand_in.labels = [], stand_in.labels[:0]
            self._feed(stand_in, states)
        self.pipe.schedule_run()
        return self._outputs()

    def _to_batches(self, enc: Batch, outputs, states: list[dict | None]) -> list[tuple[dict[str, Any], dict]]:
        """The iteration's batches to deliver, each with its state: one per part whose state is not None. Each tensor
        is converted once for the iteration, and a part is a slice of it (a view of DALI's output, no copy)."""
        parts = [j for j, state in enumerate(states) if state is not None]
        if not enc.keys or not parts:
            return []  # every sample of the batch was bad, or the whole iteration is dropped (a resume's skip)
        n = len(enc.keys) // enc.parts  # train: every part is a full batch; eval: one part
        self.loader._counters.add("decoded", n * len(parts))
        device, mscn = self.loader.device, self.cfg.augment.mscn
        labels = _host_to(enc.labels, device, torch.long)
        if not self.loader.train:
            return [({"keys": enc.keys, "labels": labels, "view1": _to_torch(outputs[0], device)}, states[0])]
        views, count = len(enc.params), enc.parts
        # Each tensor cut into its parts by one call (views of it, no copy): per batch and field, a call costs the
        # thread tens of microseconds here.
        labels = _parts(labels, count)
        whole = [_parts(_to_torch(outputs[v], device), count) for v in range(views)]
        mask_keys = _host_to(enc.mask_keys, device, copy=True)  # [V, n x parts, L]: one copy for every view
        mask_keys = mask_keys.unflatten(1, (count, n)).flatten(0, 1).unbind(0)  # [n, L] per (view, part)
        keeps = [_parts(_to_torch(o, device), count) for o in outputs[views:]] if enc.masks else []
        delivered = []
        for j in parts:
            batch: dict[str, Any] = {"keys": enc.keys if count == 1 else enc.keys[j * n:(j + 1) * n],
                                     "labels": labels[j]}
            for v in range(views):
                batch[f"view{v + 1}"] = whole[v][j]
                batch[f"mask_keys{v + 1}"] = mask_keys[v * count + j]
            if enc.masks:
                batch.update(mscn_batch_fields([batch[f"view{v + 1}"] for v in range(views)],
                                               [k[j] for k in keeps], enc.masks[j], mscn))
            delivered.append((batch, states[j]))
        return delivered

    def get(self):
        item = self.out.get()
        self.room.put(None)
        if isinstance(item, Exception):
            raise RuntimeError("data pipeline failed") from item
        return item

    def close(self) -> None:
        self._stop_event.set()
        self.pool.stop.set()
        self.room.put(None)  # a put blocked in _put returns, sees the stop event and the thread ends
        if threading.current_thread() is not self:
            self.join(timeout=10)
        while True:  # batches the trainer will not take: their device memory goes now
            try:
                self.out.get_nowait()
            except queue.Empty:
                break
        # DALI and the in-flight batches hold views of the shared-memory slots: drop them before the slots close.
        self.inflight.clear()
        self.pipe = None
        self.pool.close()


# Iterations DALI may fail in a row, every image decoding with Pillow and none delivered between them, before the loader
# calls it a device fault: a rank that would otherwise deliver nothing, for ever, while the others wait for it.
_MAX_BLIND_DROPS = 16


@functools.cache
def _stand_in_jpeg() -> bytes:
    """A valid 16 x 16 JPEG, fed in place of an iteration none of whose batches can go on (DALI takes no empty
    batch)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, format="JPEG")
    return buf.getvalue()


def worker_slots(cfg: DataConfig) -> int:
    """A worker's shared-memory slots, one iteration each: cfg.worker_prefetch batches, and one more than DALI can
    hold of this worker's iterations (cfg.prefetch in flight, taken from the workers in turn), so that the worker
    always has a slot to fill (with fewer slots than that, a worker with worker_prefetch 1 and prefetch 2 never
    started: the loader waited for its second batch, the worker for a free slot). With workers >= prefetch grouping
    batches into iterations leaves the memory as it was (production: 2 slots of 2 batches where there were 4 of 1);
    one worker gets 3 slots of 2 batches."""
    return max(-(-cfg.worker_prefetch // cfg.iteration_batches), -(-cfg.prefetch // cfg.workers) + 1)


def slot_bytes(cfg: DataConfig, train: bool) -> int:
    """A worker's shared-memory slot: one DALI iteration's images, then (train) its mask keys in the tail
    (shm_ring.py)."""
    samples = cfg.batch_size * (cfg.batches_per_iteration if train else 1)
    return samples * cfg.slot_bytes_per_sample + (4 * cfg.num_views * samples * cfg.num_patches if train else 0)


def _plain_stream(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stream state with each worker's shuffle-buffer indices as a list of ints (a checkpoint holds plain python;
    they travel from the workers as an array)."""
    if state is None:
        return None
    workers = {w: {**s, "buffer": [int(i) for i in s["buffer"]]} for w, s in state["workers"].items()}
    return {**state, "workers": workers}


def _subset(batch: Batch, keep: list[int], images: list, parts: list[int] | None = None) -> Batch:
    """The batch with only the samples `keep`, as inline bytes (its slot, if any, is still released once). parts: the
    whole parts `keep` holds, in order (a training iteration without its failed batches); None: `keep` lies in part 0
    (an eval batch, which has one part, without its culprits; a training stand-in of one sample)."""
    train, kept = batch.params is not None, [bytes(images[i]) for i in keep]
    if parts is None:
        assert batch.parts == 1 or max(keep) < len(batch.keys) // batch.parts, (batch.parts, keep)
        masks = [[[m.take(keep) for m in copies] for copies in batch.masks[0]]] if batch.masks else []
    else:
        masks = [batch.masks[j] for j in parts] if batch.masks else []
    return Batch(batch.worker, batch.index, [batch.keys[i] for i in keep], batch.labels[keep], batch.slot,
                 byte_lengths(kept), 0, kept, batch.params[:, keep] if train else None,
                 batch.mask_keys[:, keep] if train else None, masks, batch.state, batch.counters,
                 parts=1 if parts is None else len(parts))


def build_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device) -> Loader:
    """The loader of one rank. world_size * cfg.workers readers share the shards (see shards.ShardPlan)."""
    assert 0 <= rank < world_size, (rank, world_size)
    plan, counts = build_plan(cfg.sources, world_size * cfg.workers, cfg.seed, cfg.storage_options)
    return Loader(cfg, plan, rank, world_size, torch.device(device), counts)
