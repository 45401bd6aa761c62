"""Readers -> one deterministic sample stream -> shuffle buffer -> batches of encoded images, with a resumable state.

The stream of one loader worker process (worker.py), which has one reader; the merge takes any number.
Stages (declared in this order, as OpenCLIP's data pipeline; invariants asserted where they are cheap):
  1. shards     per-reader shard lists from ShardPlan (disjoint across readers)
  2. read       reader threads stream, validate and queue samples (readers.py)
  3. merge      round-robin over the stream's readers in a fixed order, one sample per turn, waiting for the reader
                whose turn it is: the merged order does not depend on thread timing, so the same state always gives
                the same samples
  4. shuffle    train only: a buffer of `shuffle_buffer` samples, seeded by (seed, stream id)
  5. batch      batch_size samples, numbered 0, 1, ... per stream (worker.py turns the number into the rank's batch
                index, which seeds the batch's augmentation, view_params.py); eval's last batch may be partial

State (plain dict, picklable), as of the end of a batch: the merge position (per-reader position of the last sample
taken from its queue, which readers are still active, the round-robin cursor), the number of samples pulled and of
batches made, the shuffle RNG, and the shuffle buffer as the merge indices of the samples in it, in buffer order, plus
the merge position just before the oldest of them. Restoring replays the merge from that older position, keeps the
samples whose indices are listed (the others were already emitted) and rebuilds the buffer in the same order, so
train resumes exactly, with or without a shuffle buffer; the replay re-reads the samples pulled since the oldest
buffered one (about shuffle_buffer * a few samples; ~1-5 s per 10,000 at header-validation speed). Eval has no buffer.
The state also keeps the cuts (shards that ended early on a read fault, readers.py) the replay will re-read: without
them a fault that has gone by the resume would give the replay more samples than the run had, and no resume.
"""

from __future__ import annotations

import copy
import queue
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.counters import Counters
from pipeline.readers import Item, Reader, ReadSettings
from pipeline.shards import ShardPlan
from pipeline.stream import Sample
from pipeline.validate import Size


class StreamClosed(Exception):
    """Raised in the consumer when the stream is closed while it waits for a sample."""


@dataclass
class EncodedBatch:
    """keys/labels/images/sizes of up to batch_size samples (images: encoded bytes, any of validate.FORMATS);
    index = this batch's number in the stream; state = the stream state just after this batch."""

    keys: list[str]
    labels: list[int]
    images: list[bytes]
    sizes: list[Size | None]
    index: int
    state: dict[str, Any]


MergeState = tuple[dict[int, tuple[int, int, int]], list[int], int]  # positions, active readers, round-robin cursor


@dataclass
class _Buffered:
    """A sample in the shuffle buffer: its merge index and the merge state just before it was pulled."""

    index: int
    sample: Sample
    before: MergeState


class BatchStream:
    def __init__(self, plan: ShardPlan, train: bool, reader_ids: list[int], settings: ReadSettings,
                 counters: Counters, batch_size: int, shuffle_buffer: int, seed: int, stream_id: int):
        self.plan, self.train, self.reader_ids = plan, train, list(reader_ids)
        self.settings, self.counters = settings, counters
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer if train else 0  # eval order must be reproducible sample by sample
        self.rng = np.random.default_rng([seed, stream_id, 0x5A1])  # stream_id: one per worker of every rank
        self.positions: dict[int, tuple[int, int, int]] = {r: (0, 0, 0) for r in self.reader_ids}
        self.active: list[int] = list(self.reader_ids)
        self.rr = 0
        self.pulled = 0  # samples taken from the merge so far (the merge index of the next one)
        self.batches = 0  # batches made so far (the index of the next one)
        self.buffer: list[_Buffered] = []
        self.cuts: dict[int, dict[tuple[int, int], int]] = {r: {} for r in self.reader_ids}  # per reader, see state()
        self.readers: dict[int, Reader] = {}
        self.closed = False
        self._replay: dict[str, Any] | None = None  # a restored state whose buffer is still to be rebuilt

    # ----- state -------------------------------------------------------------------------------------------------
    def _merge_state(self) -> MergeState:
        return dict(self.positions), list(self.active), self.rr

    def _set_merge_state(self, m: MergeState) -> None:
        self.positions = {int(r): tuple(p) for r, p in m[0].items()}
        self.active, self.rr = list(m[1]), int(m[2])

    def _prune_cuts(self, since: dict[int, tuple[int, int, int]] | None) -> None:
        """Keep only the cuts of shards a replay from the positions `since` re-reads (None: no replay, none)."""
        for r, cuts in self.cuts.items():
            keep = {} if since is None else {sh: at for sh, at in cuts.items() if sh >= tuple(since[r][:2])}
            if len(keep) != len(cuts):
                self.cuts[r] = keep

    def state(self) -> dict[str, Any]:
        oldest = min(self.buffer, key=lambda b: b.index) if self.buffer else None
        self._prune_cuts(None if oldest is None else oldest.before[0])
        return {"positions": {r: tuple(p) for r, p in self.positions.items()}, "active": list(self.active),
                "cuts": {r: [(*sh, at) for sh, at in cuts.items()] for r, cuts in self.cuts.items()}, "rr": self.rr,
                "rng": copy.deepcopy(self.rng.bit_generator.state), "pulled": self.pulled,
                # An array, not a list: the state travels with every batch to the training process, where unpickling
                # a list of shuffle_buffer ints cost ~100 us per batch at 5,000 (Loader.state_dict makes it a list).
                "batches": self.batches, "buffer": np.fromiter((b.index for b in self.buffer), np.int64,
                                                               len(self.buffer)),
                "buffer_from": None if oldest is None else {"index": oldest.index, "positions": oldest.before[0],
                                                            "active": oldest.before[1], "rr": oldest.before[2]}}

    def load_state(self, state: dict[str, Any]) -> None:
        assert not self.readers, "load state before the stream starts"
        assert sorted(state["positions"]) == sorted(self.reader_ids), "state is from another rank/worker layout"
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.pulled, self.batches = int(state["pulled"]), int(state["batches"])
        for r, cuts in state.get("cuts", {}).items():
            self.cuts[int(r)] = {(int(e), int(sh)): int(at) for e, sh, at in cuts}
        start = state["buffer_from"]
        if start is None:
            self._set_merge_state((state["positions"], state["active"], state["rr"]))
            return
        # Readers restart where the oldest buffered sample was pulled; _rebuild_buffer replays up to `pulled`.
        self._set_merge_state((start["positions"], start["active"], start["rr"]))
        self._replay = {"from": int(start["index"]), "until": self.pulled, "buffer": [int(i) for i in state["buffer"]],
                        "merge": (state["positions"], state["active"], state["rr"])}
        self.pulled = int(start["index"])

    def _rebuild_buffer(self) -> None:
        replay, self._replay = self._replay, None
        wanted = set(replay["buffer"])
        kept: dict[int, _Buffered] = {}
        while self.pulled < replay["until"]:
            before, index = self._merge_state(), self.pulled
            s = self._pull()
            if s is None:
                raise RuntimeError("stream ended while replaying the shuffle buffer: the shards changed since the save, "
                                   "or a read failed during the replay (see the warnings; a rerun retries it)")
            if index in wanted:
                kept[index] = _Buffered(index, s, before)
        m = replay["merge"]
        if self._merge_state() != ({int(r): tuple(p) for r, p in m[0].items()}, list(m[1]), int(m[2])) or \
                sorted(kept) != sorted(wanted):
            raise RuntimeError("replaying the shuffle buffer did not reach the saved position: the shards changed "
                               "since the save, or a read failed during the replay (see the warnings; a rerun retries "
                               "it)")
        self.buffer = [kept[i] for i in replay["buffer"]]

    # ----- running -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        for r in self.active:
            self.readers[r] = Reader(r, self.plan, self.train, self.positions[r], self.settings, self.counters,
                                     self.cuts[r])
            self.readers[r].start()

    def close(self) -> None:
        self.closed = True
        for reader in self.readers.values():
            reader.stop()
        for reader in self.readers.values():
            reader.join(timeout=10)
        self.readers = {}

    def _pull(self) -> Sample | None:
        """Next sample in round-robin order over the active readers; None when every reader has ended (eval)."""
        while self.active:
            self.rr %= len(self.active)
            r = self.active[self.rr]
            item = self._get(r)
            if item.error is not None:
                raise RuntimeError(item.error)
            self.positions[r] = item.pos
            if item.cut is not None:
                self.cuts[r][item.cut[:2]] = item.cut[2]
            if item.end:
                self.active.pop(self.rr)
                continue
            if item.sample is None:  # shard-boundary marker: position only, not a turn
                continue
            self.rr += 1
            self.pulled += 1
            return item.sample
        return None

    def _get(self, r: int) -> Item:
        while True:
            if self.closed:
                raise StreamClosed
            try:
                return self.readers[r].queue.get(timeout=0.1)
            except queue.Empty:
                continue

    def _next_sample(self) -> Sample | None:
        if self._replay is not None:
            self._rebuild_buffer()
        if self.shuffle_buffer <= 1 and not self.buffer:  # (a buffer restored into an unbuffered stream drains first)
            return self._pull()
        while len(self.buffer) < self.shuffle_buffer:
            before, index = self._merge_state(), self.pulled
            s = self._pull()
            if s is None:
                break
            self.buffer.append(_Buffered(index, s, before))
        if not self.buffer:
            return None
        i = int(self.rng.integers(len(self.buffer)))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop().sample

    def next_batch(self) -> EncodedBatch | None:
        samples: list[Sample] = []
        while len(samples) < self.batch_size:
            s = self._next_sample()
            if s is None:
                break
            samples.append(s)
        if not samples:
            return None
        assert self.train is False or len(samples) == self.batch_size, "train batches are always full"
        index, self.batches = self.batches, self.batches + 1
        return EncodedBatch([s.key for s in samples], [s.label for s in samples], [s.image for s in samples],
                            [s.size for s in samples], index, self.state())
