"""Streaming tar samples out of object storage: one shard at a time, never the whole file, retried on faults.

A shard is read through an fsspec file with a readahead cache (one `read_block_bytes` block per reader in memory) and
parsed incrementally by tarfile's stream mode 'r|', so memory stays bounded whatever the shard size, and no shell
pipe or local copy is involved. On a transient error the shard is reopened and the samples already delivered are
skipped (the sample offset is the resume point); after `retries` failures the rest of the shard is skipped, logged
with its URL, and counted. A sample that fails validation is skipped and counted; the stream goes on.
"""

from __future__ import annotations

import logging
import os
import tarfile
import time
from dataclasses import dataclass
from typing import Iterator

import fsspec

from pipeline.counters import Counters
from pipeline.validate import Size, inspect_jpeg

log = logging.getLogger(__name__)

_IMAGE_EXTS = ("jpg", "jpeg")
# Errors that retrying cannot fix: the shard is skipped at once.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, TypeError)  # TypeError: bad storage_options


@dataclass(frozen=True)
class RawSample:
    """One tar sample. offset = its index among the shard's samples (all of them, valid or not)."""

    key: str
    files: dict[str, bytes]  # extension (lower case, no dot) -> bytes
    offset: int


@dataclass(frozen=True)
class Sample:
    """A validated sample, ready to decode. label = -1 when the shard has no .cls for it. size = (width, height) as
    decoded, read from the JPEG header (None only when validation is off and the header does not parse)."""

    key: str
    jpeg: bytes
    label: int
    size: Size | None = None


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the base name, the rest is the extension."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar(url: str, storage_options: dict, block_bytes: int) -> Iterator[RawSample]:
    """Samples of one tar in file order; members of a sample are adjacent, as webdataset writers put them."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    key, files, offset = None, {}, 0
    with fs.open(path, "rb", block_size=block_bytes, cache_type="readahead") as f:
        with tarfile.open(fileobj=f, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if key is not None and k != key:
                    yield RawSample(key, files, offset)
                    files, offset = {}, offset + 1
                key = k
                files[ext] = tf.extractfile(member).read()
    if key is not None:
        yield RawSample(key, files, offset)


def to_sample(raw: RawSample, validate: str) -> Sample | str:
    """A Sample, or the skip reason."""
    image = next((raw.files[e] for e in _IMAGE_EXTS if e in raw.files), None)
    if image is None:
        return "no_image"
    reason, size = inspect_jpeg(image, validate)
    if reason is not None:
        return reason
    label = -1
    if "cls" in raw.files:
        try:
            label = int(raw.files["cls"].decode("ascii").strip())
        except ValueError:
            label = -1  # an unreadable label is not a reason to lose the image for pre-training
    return Sample(os.path.basename(raw.key), image, label, size)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 4
    backoff_s: float = 0.5


def stream_shard(url: str, start: int, storage_options: dict, block_bytes: int, policy: RetryPolicy,
                 counters: Counters, validate: str) -> Iterator[tuple[int, Sample | str]]:
    """(offset after this sample, Sample or skip reason) for samples start, start+1, ... of one shard.

    Resumable: `start` skips already-consumed samples (read and dropped: tar streams cannot seek without an index).
    Raises nothing: a shard that keeps failing ends early with a warning and shards_failed += 1."""
    next_offset, attempt = start, 0
    while True:
        try:
            for raw in iter_tar(url, storage_options, block_bytes):
                if raw.offset < next_offset:
                    continue
                next_offset = raw.offset + 1
                attempt = 0  # progress resets the retry budget: a long shard may see several unrelated faults
                yield next_offset, to_sample(raw, validate)
            counters.add("shards_done")
            return
        except _PERMANENT as e:
            log.warning("shard %s skipped: %s", url, e)
            counters.add("shards_failed")
            return
        except Exception as e:  # network/storage/tar errors: s3fs, aiohttp and botocore raise many types
            attempt += 1
            if attempt > policy.retries:
                log.warning("shard %s skipped after %d retries at sample %d: %r", url, policy.retries, next_offset, e)
                counters.add("shards_failed")
                return
            counters.add("read_retries")
            time.sleep(policy.backoff_s * 2 ** (attempt - 1))
