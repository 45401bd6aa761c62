"""The samples of an input shard, in order, with where each member's bytes lie: from DALI's index beside the tar
(`shard-000000.idx`, written by the ingest's writer) when there is one, else from the tar headers.

Positions in this list are the `position` part of a sample's ordinal (records.py), and the byte ranges let the
curated shards be written by ranged reads of exactly the selected samples.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

from pipeline.curate.storage import exists, get_bytes, url_to_fs


@dataclass(frozen=True)
class SampleMembers:
    """One sample: its key and its tar members as (ext, data offset, size), in tar order."""

    key: str
    members: tuple[tuple[str, int, int], ...]


def index_url(shard_url: str) -> str:
    return re.sub(r"\.tar$", "", shard_url) + ".idx"


def list_samples(shard_url: str, storage_options: dict) -> list[SampleMembers]:
    """Every sample of the shard in tar order (the order the loader streams it in)."""
    idx = index_url(shard_url)
    if exists(idx, storage_options):
        return parse_index(get_bytes(idx, storage_options).decode())
    return _scan_tar(shard_url, storage_options)


def parse_index(text: str) -> list[SampleMembers]:
    """DALI webdataset index v1.2: a header line, then per sample `ext offset size name` repeated per member."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1.2"):
        raise ValueError(f"not a DALI v1.2 webdataset index: {lines[:1]}")
    samples = []
    for line in lines[1:]:
        fields = line.split()
        members = tuple((fields[i], int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4))
        samples.append(SampleMembers(fields[3].split(".", 1)[0], members))
    return samples


def _scan_tar(shard_url: str, storage_options: dict) -> list[SampleMembers]:
    fs, path = url_to_fs(shard_url, storage_options)
    samples: list[SampleMembers] = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            member = (ext, info.offset_data, info.size)
            if samples and samples[-1].key == key:
                samples[-1] = SampleMembers(key, samples[-1].members + (member,))
            else:
                samples.append(SampleMembers(key, (member,)))
    return samples


def read_members(shard_url: str, samples: list[SampleMembers], storage_options: dict
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of `samples` (in the order given, best in tar order: reads then go forward)."""
    fs, path = url_to_fs(shard_url, storage_options)
    with fs.open(path, "rb") as f:
        for s in samples:
            parts = {}
            for ext, offset, size in s.members:
                f.seek(offset)
                parts[ext] = f.read(size)
            yield s.key, parts
