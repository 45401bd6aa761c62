"""Ranged reads ahead of the tar parser: several blocks of the current shard in flight, and the next shard's first
blocks requested before the current one ends.

A shard is read as consecutive byte ranges of `block_bytes` (fs.cat_file(path, start, end): one ranged GET on S3) by
a small thread pool, at most `concurrency` ranges in flight per reader, handed to the parser in order. One request at a
time waits ~25 ms for its first byte on S3, about 50 MB/s for 4 MB blocks; `concurrency` requests overlap those
waits. Memory per reader: at most `concurrency` blocks. Each range is retried on transient errors with exponential
backoff (RetryPolicy), so a dropped connection costs one block's request, not the shard; a missing or forbidden object
is not retried. A range that keeps failing raises in the parser's thread at that point of the shard.
"""

from __future__ import annotations

import collections
import io
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import fsspec

from pipeline.counters import Counters

# Errors that retrying cannot fix. TypeError: bad storage_options. ValueError: an invalid URL or path.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TypeError, ValueError)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 4
    backoff_s: float = 0.5  # first retry delay; doubles on each retry


def with_retries(call: Callable[[], bytes | int], policy: RetryPolicy, counters: Counters) -> bytes | int:
    """call() until it succeeds; transient errors are retried `policy.retries` times with doubling delays (each
    counted as read_retries), permanent ones (PERMANENT_ERRORS) and the last transient one are raised."""
    for attempt in range(policy.retries + 1):
        try:
            return call()
        except PERMANENT_ERRORS:
            raise
        except Exception:  # network and storage errors: s3fs, aiohttp and botocore raise many types
            if attempt == policy.retries:
                raise
            counters.add("read_retries")
            time.sleep(policy.backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class _Shard:
    """One shard's ranges: its size (a HEAD request, itself in the pool) and the futures of the ranges requested."""

    def __init__(self, fetcher: "BlockFetcher", url: str):
        self.url = url
        self.fs, self.path = fsspec.core.url_to_fs(url, **fetcher.storage_options)
        self.fetcher = fetcher
        self.size: Future = fetcher.pool.submit(with_retries, lambda: self.fs.size(self.path), fetcher.policy,
                                                fetcher.counters)
        self.next_start = 0
        self.blocks: collections.deque[Future] = collections.deque()

    def all_requested(self) -> bool:
        return self.size.done() and self.size.exception() is None and self.next_start >= self.size.result()

    def request(self) -> bool:
        """Ask for the next range; False when the whole shard has been asked for. Waits for the size."""
        size = self.size.result()  # raises the HEAD's error (missing object) here, in the parser's thread
        if self.next_start >= size:
            return False
        start, end = self.next_start, min(size, self.next_start + self.fetcher.block_bytes)
        self.blocks.append(self.fetcher.pool.submit(with_retries, lambda: self._read(start, end), self.fetcher.policy,
                                                    self.fetcher.counters))
        self.next_start = end
        return True

    def _read(self, start: int, end: int) -> bytes:
        data = self.fs.cat_file(self.path, start=start, end=end)
        if len(data) != end - start:  # a connection cut mid-body can come back as a short body, not an error
            raise ConnectionError(f"{self.url}: short read at {start}: {len(data)} of {end - start} bytes")
        return data

    def cancel(self) -> None:
        for f in self.blocks:
            f.cancel()


class ShardFile(io.RawIOBase):
    """The bytes of one shard in order, as a read-only stream; keeps `concurrency` ranges in flight, and once this
    shard's last range is requested, spends the spare requests on the next shard (BlockFetcher.open's next_url)."""

    def __init__(self, fetcher: "BlockFetcher", shard: _Shard, next_url: str | None):
        super().__init__()
        self.fetcher, self.shard, self.next_url = fetcher, shard, next_url
        self.buf, self.pos = b"", 0
        self._top_up()

    def _top_up(self) -> None:
        while len(self.shard.blocks) < self.fetcher.concurrency and self.shard.request():
            pass
        if self.next_url is not None and self.shard.all_requested():
            self.fetcher.prefetch(self.next_url, self.fetcher.concurrency - len(self.shard.blocks))

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all the rest for n < 0); b"" at the end of the shard."""
        out = []
        while n != 0:
            if self.pos == len(self.buf):
                if not self.shard.blocks:
                    break
                self.buf, self.pos = self.shard.blocks.popleft().result(), 0
                self._top_up()
                continue
            take = len(self.buf) - self.pos if n < 0 else min(n, len(self.buf) - self.pos)
            out.append(self.buf[self.pos:self.pos + take])
            self.pos += take
            n -= take if n > 0 else 0
        return b"".join(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.shard.cancel()  # abandoned early (an error, or the reader stopping): drop what is still in flight
        super().close()


class BlockFetcher:
    """The ranged reads of one reader (one shard at a time, plus the next one's head start)."""

    def __init__(self, storage_options: dict, block_bytes: int, concurrency: int, policy: RetryPolicy,
                 counters: Counters):
        self.storage_options, self.block_bytes, self.concurrency = storage_options, block_bytes, max(1, concurrency)
        self.policy, self.counters = policy, counters
        self.pool = ThreadPoolExecutor(self.concurrency + 1, thread_name_prefix="block-fetch")  # +1: HEADs
        self._ahead: _Shard | None = None  # the next shard, opened early by prefetch()

    def prefetch(self, url: str, budget: int) -> None:
        """Start `url`: its size, and up to `budget` of its first ranges (once; then open() takes it over)."""
        if self._ahead is None or self._ahead.url != url:
            if self._ahead is not None:
                self._ahead.cancel()
            self._ahead = _Shard(self, url)
        if self._ahead.size.done():  # never wait here: the parser thread must go on with the current shard
            while len(self._ahead.blocks) < budget and self._ahead.size.exception() is None and self._ahead.request():
                pass

    def open(self, url: str, next_url: str | None = None) -> ShardFile:
        shard = self._ahead if self._ahead is not None and self._ahead.url == url else _Shard(self, url)
        if self._ahead is not None and self._ahead is not shard:
            self._ahead.cancel()
        self._ahead = None
        return ShardFile(self, shard, next_url)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
