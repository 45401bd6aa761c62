"""Phase 3: write one final shard from its samples' staged bytes.

Shard i holds kept samples [i*S, (i+1)*S) in input order, so its content is fixed by phase 2 alone; a shard that
already exists (from an interrupted run with the same fingerprint) has exactly that content and is skipped.
Each stage tar a shard touches is opened once and read forward, which object stores serve as ranged reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from pipeline.ingest.atomic import url_to_fs
from pipeline.ingest.layout import Layout
from pipeline.ingest.writer import write_shard


@dataclass(frozen=True)
class StagedSample:
    unit: int
    key: str
    members: tuple[tuple[str, int, int], ...]  # (ext, offset, size) in the unit's stage tar


@dataclass(frozen=True)
class ShardTask:
    index: int
    samples: tuple[StagedSample, ...]
    layout: Layout
    storage_options: dict


@dataclass(frozen=True)
class ShardResult:
    index: int
    samples: int
    num_bytes: int


def run_shard(task: ShardTask) -> ShardResult:
    info = write_shard(task.layout.shard(task.index), _read(task), task.storage_options)
    return ShardResult(task.index, info.num_samples, info.num_bytes)


def _read(task: ShardTask) -> Iterator[tuple[str, dict[str, bytes]]]:
    by_unit: dict[int, list[StagedSample]] = {}
    for s in task.samples:
        by_unit.setdefault(s.unit, []).append(s)
    for unit, samples in by_unit.items():  # units appear in input order (dicts keep insertion order)
        fs, path = url_to_fs(task.layout.stage_tar(unit), task.storage_options)
        with fs.open(path, "rb") as f:
            for s in samples:
                parts = {}
                for ext, offset, size in s.members:
                    f.seek(offset)
                    parts[ext] = f.read(size)
                yield s.key, parts
