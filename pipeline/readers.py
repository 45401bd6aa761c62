"""One reader = the parsing thread of one loader worker process (worker.py), which owns a disjoint share of the
shards (see shards.ShardPlan).

The reader parses and validates samples (stream.py) while its BlockFetcher's threads read the shard's next byte
ranges and the next shard's first ones (prefetch.py). It pushes into a bounded queue, so memory is bounded by
`queue_size` samples plus `read_concurrency` blocks.

Position of a reader = (epoch, shard index in its list, sample offset in that shard): a pure description of how far
it got, from which a new reader resumes exactly (plan.train_shards / plan.eval_shards are deterministic). A shard that
ended early (a read that failed after its retries) is reported with the marker that follows it, as (epoch, shard
index, samples read); a reader given such cuts stops those shards at the same sample, so a resumed stream replays the
interrupted run's samples exactly even after the fault has gone.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from pipeline.counters import Counters
from pipeline.prefetch import BlockFetcher, RetryPolicy
from pipeline.shards import ShardPlan
from pipeline.stream import Cut, Sample, stream_shard

log = logging.getLogger(__name__)

Position = tuple[int, int, int]  # (epoch, shard index, sample offset)
ShardCut = tuple[int, int, int]  # (epoch, shard index, samples read before the fault): Cut.at of that shard


@dataclass(frozen=True)
class Item:
    """What a reader queue carries: a sample and the position just after it, or a position marker alone (shard end,
    with the shard's cut if it ended early), or end=True (eval: this reader has read all its shards), or an error to
    re-raise in the consumer."""

    pos: Position
    sample: Sample | None = None
    end: bool = False
    error: str | None = None
    cut: ShardCut | None = None


@dataclass(frozen=True)
class ReadSettings:
    storage_options: dict
    block_bytes: int
    concurrency: int  # ranged reads in flight
    policy: RetryPolicy
    validate: str
    queue_size: int = 64


class Reader(threading.Thread):
    def __init__(self, reader_id: int, plan: ShardPlan, train: bool, start: Position, settings: ReadSettings,
                 counters: Counters, cuts: dict[tuple[int, int], int] | None = None):
        super().__init__(name=f"shard-reader-{reader_id}", daemon=True)
        self.reader_id, self.plan, self.train, self.start_pos = reader_id, plan, train, start
        self.cuts = dict(cuts or {})  # (epoch, shard index) -> samples read: cuts of an earlier run, replayed
        self.settings, self.counters = settings, counters
        self.queue: queue.Queue[Item] = queue.Queue(maxsize=settings.queue_size)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def _put(self, item: Item) -> bool:
        """Blocking put that gives up when the reader is stopped; returns False then."""
        while not self._stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _shards(self, epoch: int) -> list[str]:
        return self.plan.train_shards(self.reader_id, epoch) if self.train else self.plan.eval_shards(self.reader_id)

    def run(self) -> None:
        s = self.settings
        fetcher = BlockFetcher(s.storage_options, s.block_bytes, s.concurrency, s.policy, self.counters)
        try:
            self._read(fetcher)
        except Exception as e:  # a bug must surface in the trainer, not leave it blocked on an empty queue
            log.exception("reader %d crashed", self.reader_id)
            self._put(Item(self.start_pos, error=f"reader {self.reader_id} crashed: {e!r}"))
        finally:
            fetcher.close()

    def _next_url(self, shards: list[str], shard_idx: int, epoch: int) -> str | None:
        """The shard read after shards[shard_idx]: the next in the list, or the next shard-epoch's first (train)."""
        if shard_idx + 1 < len(shards):
            return shards[shard_idx + 1]
        following = self._shards(epoch + 1) if self.train else []
        return following[0] if following else None

    def _read(self, fetcher: BlockFetcher) -> None:
        epoch, shard_idx, offset = self.start_pos
        s = self.settings
        while not self._stop_event.is_set():
            shards = self._shards(epoch)
            yielded_this_epoch = 0
            while shard_idx < len(shards):
                next_url = self._next_url(shards, shard_idx, epoch)
                cut = None
                for next_offset, got in stream_shard(fetcher, shards[shard_idx], next_url, offset, self.counters,
                                                     s.validate, self.cuts.get((epoch, shard_idx))):
                    if isinstance(got, Cut):
                        cut = (epoch, shard_idx, got.at)
                        continue
                    if isinstance(got, str):
                        self.counters.skip(got)
                        continue
                    self.counters.add(f"format_{got.fmt}")
                    yielded_this_epoch += 1
                    if not self._put(Item((epoch, shard_idx, next_offset), got)):
                        return
                shard_idx, offset = shard_idx + 1, 0
                if not self._put(Item((epoch, shard_idx, 0), cut=cut)):
                    return
            if not self.train:
                self._put(Item((epoch, shard_idx, 0), end=True))
                return
            if yielded_this_epoch == 0 and self.start_pos[1:] == (0, 0):
                # A whole shard-epoch without one sample: looping again would spin forever without data.
                self._put(Item((epoch, shard_idx, 0), error=f"reader {self.reader_id}: no readable sample in "
                               f"shard-epoch {epoch} ({len(shards)} shards; see shards_failed)"))
                return
            epoch, shard_idx, offset = epoch + 1, 0, 0
            self.start_pos = (epoch, 0, 0)
            if not self._put(Item((epoch, 0, 0))):
                return
