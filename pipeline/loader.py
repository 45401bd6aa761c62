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

Stages after the sample stream (sampler.py): a producer thread draws the batch's augmentation parameters and mask keys
on the host from (seed, rank, batch index) (view_params.py), feeds them and the encoded batch to DALI (augment.py),
copies the outputs to torch on `device`, and queues `prefetch` finished batches; the trainer's time blocked on that
queue is the wait_s counter. Train and eval both resume exactly from state_dict() (pipeline/README.md, "Resume").
With MSCN masking (cfg.augment.mscn) the views are high-passed and masked: the host also draws the masks
(mscn_params.py), DALI builds them, and the noise fill runs here on `device` from host-drawn seeds (mscn_fill.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Iterator

import numpy as np
import torch

from pipeline import augment
from pipeline.config import DataConfig
from pipeline.counters import Counters
from pipeline.mscn_fill import mscn_batch_fields
from pipeline.mscn_graph import feed_masks
from pipeline.mscn_params import MaskParams, draw_batch_masks
from pipeline.readers import ReadSettings
from pipeline.sampler import BatchStream, EncodedBatch, StreamClosed
from pipeline.shards import ShardPlan, build_plan
from pipeline.stream import RetryPolicy
from pipeline.validate import check_jpeg_full
from pipeline.view_params import ViewParams, draw_batch

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: host-drawn augmentation (batch index in the stream state), resumable shuffle buffer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to_torch(tl, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DALI TensorList (CPU or GPU) of `dtype` (views: float32, MSCN keep masks: uint8) -> torch tensor on `device`."""
    if hasattr(tl, "as_cpu") and type(tl).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tl.as_tensor()
        out = torch.empty(dense.shape(), dtype=dtype, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tl.as_tensor())).to(device, non_blocking=True)


class Loader:
    """Iterable of batches for one rank; see the module docstring for the batch layout and mode semantics."""

    def __init__(self, cfg: DataConfig, plan: ShardPlan, rank: int, world_size: int, device: torch.device,
                 sample_counts: dict[str, int]):
        self.cfg, self.plan, self.rank, self.world_size, self.device = cfg, plan, rank, world_size, device
        self.sample_counts = sample_counts  # from manifests; empty when shards were named by pattern or prefix
        self.train = cfg.mode == "train"
        dali_device = resolve_device(cfg.device)
        self.dali_device_id = (dali_device.index or 0) if dali_device.type == "cuda" else None
        self._counters = Counters()
        self._state: dict[str, Any] | None = None  # stream state after the last delivered batch
        self._batches = 0  # batches delivered in this pass (eval) / ever (train)
        self._settings = ReadSettings(cfg.storage_options, cfg.read_block_bytes,
                                      RetryPolicy(cfg.read_retries, cfg.retry_backoff_s), cfg.validate)
        self._active: _Producer | None = None

    # ----- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain python (ints, tuples, dicts): the stream position after the last batch handed to the caller."""
        return {"version": STATE_VERSION, "mode": self.cfg.mode, "rank": self.rank, "world_size": self.world_size,
                "workers": self.cfg.workers, "seed": self.cfg.seed, "batches": self._batches, "stream": self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["version"] == STATE_VERSION, state["version"]
        expected = {"mode": self.cfg.mode, "rank": self.rank, "world_size": self.world_size,
                    "workers": self.cfg.workers, "seed": self.cfg.seed}
        for k, v in expected.items():
            assert state[k] == v, f"loader state has {k}={state[k]}, this loader {v}: resume needs the same layout"
        self._close()
        self._state, self._batches = state["stream"], int(state["batches"])

    def counters(self) -> dict[str, float]:
        return self._counters.snapshot()

    # ----- iteration ---------------------------------------------------------------------------------------------
    def reader_ids(self) -> list[int]:
        return [self.rank * self.cfg.workers + w for w in range(self.cfg.workers)]

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
            self._active.close()
            self._active = None

    def close(self) -> None:
        self._close()

    def __del__(self) -> None:
        self._close()


class _Producer(threading.Thread):
    """Owns the sample stream and the DALI pipeline; turns encoded batches into device batches, `prefetch` ahead."""

    def __init__(self, loader: Loader):
        super().__init__(name=f"dali-producer-rank{loader.rank}", daemon=True)
        cfg = loader.cfg
        self.loader, self.cfg = loader, cfg
        self.stream = BatchStream(loader.plan, loader.train, loader.reader_ids(), loader._settings, loader._counters,
                                  cfg.batch_size, cfg.shuffle_buffer, cfg.seed, loader.rank)
        if loader._state is not None:
            self.stream.load_state(loader._state)
        self.out: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch))
        self._stop_event = threading.Event()
        self.pipe = None
        self.stream.start()
        self.start()

    def _build_pipe(self):
        cfg, lo = self.cfg, self.loader
        if lo.train:
            return augment.train_pipeline(cfg.batch_size, cfg.img_size, cfg.num_views, cfg.augment,
                                          lo.dali_device_id, cfg.dali_threads, 1)
        return augment.eval_pipeline(cfg.batch_size, cfg.img_size, cfg.augment, lo.dali_device_id, cfg.dali_threads, 1)

    def _put(self, item) -> bool:
        while not self._stop_event.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            self.pipe = self._build_pipe()
            while not self._stop_event.is_set():
                enc = self.stream.next_batch()
                if enc is None:
                    self._put(None)
                    return
                batch = self._augment(enc)
                if batch is not None and not self._put((batch, enc.state)):
                    return
        except StreamClosed:
            return
        except Exception as e:  # surface in the trainer's thread instead of leaving it blocked
            log.exception("data producer crashed")
            self._put(e)

    def _augment(self, enc: EncodedBatch) -> dict[str, Any] | None:
        """Run DALI on one encoded batch. DALI fails a whole iteration on one bad image: then the pipeline is rebuilt,
        the culprits are found by a full PIL decode, counted as skipped, and the rest of the batch goes on.
        Train: every random number comes from view_params.draw_batch(..., seed, rank, enc.index), so the batch is a
        pure function of its samples and its index (the survivors of a rejected batch keep their own draws)."""
        cfg, mscn = self.cfg, self.cfg.augment.mscn
        views = (draw_batch(enc.sizes, cfg.augment, cfg.num_views, cfg.num_patches, cfg.seed, self.loader.rank,
                            enc.index) if self.loader.train else [])
        masks = (draw_batch_masks(len(enc.jpegs), cfg.img_size, mscn, cfg.num_views, cfg.seed, self.loader.rank,
                                  enc.index) if self.loader.train and mscn is not None else [])
        try:
            outputs = self._run(enc.jpegs, views, masks)
        except RuntimeError as e:
            keep = [i for i, j in enumerate(enc.jpegs) if check_jpeg_full(j)]
            self.loader._counters.skip("decode_error", len(enc.jpegs) - len(keep))
            log.warning("DALI rejected a batch (%s); %d sample(s) dropped", str(e).splitlines()[0],
                        len(enc.jpegs) - len(keep))
            self.pipe = self._build_pipe()
            if not keep:
                return None
            enc = EncodedBatch([enc.keys[i] for i in keep], [enc.labels[i] for i in keep],
                               [enc.jpegs[i] for i in keep], [enc.sizes[i] for i in keep], enc.index, enc.state)
            views = [v.take(keep) for v in views]
            masks = [[m.take(keep) for m in copies] for copies in masks]
            outputs = self._run(enc.jpegs, views, masks)
        self.loader._counters.add("decoded", len(enc.jpegs))
        device = self.loader.device
        batch: dict[str, Any] = {"keys": enc.keys, "labels": torch.tensor(enc.labels, dtype=torch.long).to(device)}
        if self.loader.train:
            for v, params in enumerate(views):
                batch[f"view{v + 1}"] = _to_torch(outputs[v], device)
                batch[f"mask_keys{v + 1}"] = torch.from_numpy(params.mask_keys).to(device, non_blocking=True)
            if masks:
                keeps = [_to_torch(o, device, torch.uint8) for o in outputs[len(views):]]
                batch.update(mscn_batch_fields([batch[f"view{v + 1}"] for v in range(len(views))], keeps, masks,
                                               mscn))
        else:
            batch["view1"] = _to_torch(outputs[0], device)
        return batch

    def _run(self, jpegs: list[bytes], views: list[ViewParams], masks: list[list[MaskParams]]):
        self.pipe.feed_input(augment.JPEG_INPUT, [np.frombuffer(j, dtype=np.uint8) for j in jpegs])
        if views:
            augment.feed_params(self.pipe, self.cfg.augment, views)
        if masks:
            feed_masks(self.pipe, masks)
        return self.pipe.run()

    def get(self):
        item = self.out.get()
        if isinstance(item, Exception):
            raise RuntimeError("data pipeline failed") from item
        return item

    def close(self) -> None:
        self._stop_event.set()
        self.stream.close()
        if threading.current_thread() is not self:
            self.join(timeout=10)


def build_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device) -> Loader:
    """The loader of one rank. world_size * cfg.workers readers share the shards (see shards.ShardPlan)."""
    assert 0 <= rank < world_size, (rank, world_size)
    plan, counts = build_plan(cfg.sources, world_size * cfg.workers, cfg.seed, cfg.storage_options)
    return Loader(cfg, plan, rank, world_size, torch.device(device), counts)
