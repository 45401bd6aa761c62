"""Readers -> one deterministic sample stream -> shuffle buffer -> batches of encoded JPEGs, with a resumable state.

Stages (declared in this order, as OpenCLIP's data pipeline; invariants asserted where they are cheap):
  1. shards     per-reader shard lists from ShardPlan (disjoint across readers)
  2. read       reader threads stream, validate and queue samples (readers.py)
  3. merge      round-robin over this rank's readers in a fixed order: the merged order does not depend on thread
                timing, so the same state always gives the same samples
  4. shuffle    train only: a buffer of `shuffle_buffer` samples, seeded by (seed, rank)
  5. batch      batch_size samples; eval's last batch may be partial

State (plain dict, picklable): per-reader positions of the last sample taken from its queue, which readers are still
active, the round-robin cursor and the shuffle RNG. Eval has no shuffle buffer, so restoring the state of the last
delivered batch yields exactly the remaining samples. Train drops the samples sitting in the shuffle buffer at save
time (at most shuffle_buffer samples, not replayed) and continues the same shard sequence from there.
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


class StreamClosed(Exception):
    """Raised in the consumer when the stream is closed while it waits for a sample."""


@dataclass
class EncodedBatch:
    """keys/labels/jpegs of up to batch_size samples; state = the stream state just after this batch."""

    keys: list[str]
    labels: list[int]
    jpegs: list[bytes]
    state: dict[str, Any]


class BatchStream:
    def __init__(self, plan: ShardPlan, train: bool, reader_ids: list[int], settings: ReadSettings,
                 counters: Counters, batch_size: int, shuffle_buffer: int, seed: int, rank: int):
        self.plan, self.train, self.reader_ids = plan, train, list(reader_ids)
        self.settings, self.counters = settings, counters
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer if train else 0  # eval order must be reproducible sample by sample
        self.rng = np.random.default_rng([seed, rank, 0x5A1])
        self.positions: dict[int, tuple[int, int, int]] = {r: (0, 0, 0) for r in self.reader_ids}
        self.active: list[int] = list(self.reader_ids)
        self.rr = 0
        self.buffer: list[Sample] = []
        self.readers: dict[int, Reader] = {}
        self.closed = False

    # ----- state -------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"positions": {r: tuple(p) for r, p in self.positions.items()}, "active": list(self.active),
                "rr": self.rr, "rng": copy.deepcopy(self.rng.bit_generator.state)}

    def load_state(self, state: dict[str, Any]) -> None:
        assert not self.readers, "load state before the stream starts"
        assert sorted(state["positions"]) == sorted(self.reader_ids), "state is from another rank/worker layout"
        self.positions = {int(r): tuple(p) for r, p in state["positions"].items()}
        self.active, self.rr = list(state["active"]), int(state["rr"])
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])

    # ----- running -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        for r in self.active:
            self.readers[r] = Reader(r, self.plan, self.train, self.positions[r], self.settings, self.counters)
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
            if item.end:
                self.active.pop(self.rr)
                continue
            if item.sample is None:  # shard-boundary marker: position only, not a turn
                continue
            self.rr += 1
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
        if self.shuffle_buffer <= 1:
            return self._pull()
        while len(self.buffer) < self.shuffle_buffer:
            s = self._pull()
            if s is None:
                break
            self.buffer.append(s)
        if not self.buffer:
            return None
        i = int(self.rng.integers(len(self.buffer)))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

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
        return EncodedBatch([s.key for s in samples], [s.label for s in samples], [s.jpeg for s in samples],
                            self.state())
