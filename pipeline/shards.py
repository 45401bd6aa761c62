"""Shard lists and who reads what: URL resolution, dataset mixing, and the per-reader shard sequence.

A "reader" is one worker of one rank, R = world_size * workers readers, numbered by `reader_id`: rank-major in
training (r = rank * workers + worker), worker-major in evaluation (r = worker * world_size + rank), so that the
few validation shards are dealt to every rank before any rank gets a second one (64 shards on 64 ranks x 4 workers:
one per rank, not all on ranks 0-15 while 48 ranks idle).

Invariants (asserted in tests/pipeline/test_shards.py):
- eval: the R readers' shard lists partition the shard list (every shard read by exactly one reader, once).
- train: in every shard-epoch each reader gets the same number of shards, max(1, S // R); within a shard-epoch the
  readers' shards are disjoint whenever S >= R (with fewer shards than readers some shards repeat, so no reader idles;
  the S mod R shards left out of one shard-epoch are drawn in others, since each shard-epoch has its own permutation).
- train: the sequence is a pure function of (seed, epoch, reader), so a resumed run replays it exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import fsspec
import numpy as np

from pipeline.config import ShardSource

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
# tools/shard.py writes this beside manifest.parquet: one row per shard (shard file name, samples).
SHARD_INDEX = "shards.parquet"


def reader_id(rank: int, worker: int, workers: int, world_size: int, train: bool) -> int:
    """Which of the R = world_size * workers readers a rank's worker is (see the module docstring)."""
    return rank * workers + worker if train else worker * world_size + rank


def expand_braces(pattern: str) -> list[str]:
    """'s3://b/shard-{000000..000002}.tar' -> three URLs; zero padding follows the first bound. Nested ranges expand."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    out: list[str] = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :]))
    return out


def _protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def list_prefix(prefix: str, storage_options: dict) -> list[str]:
    """All *.tar directly under a prefix, sorted (shard names are zero-padded, so this is write order)."""
    fs, path = fsspec.core.url_to_fs(prefix.rstrip("/"), **storage_options)
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
    return [_protocol_prefix(prefix) + n if not n.startswith(_protocol_prefix(prefix)) else n for n in names]


def read_manifest(url: str, storage_options: dict) -> dict[str, int]:
    """A tools/shard.py output -> {shard URL: sample count}, sorted by URL.

    `url` names the shard index (shards.parquet: one row per shard, columns shard and samples), or the per-sample
    manifest.parquet beside it (then the index beside it is read instead: a few KB rather than a row per image),
    or an older per-sample manifest with no index beside it (its shard column counted by Arrow, not in Python).
    Shard names may be relative to the file's folder or full URLs."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    base = url.rsplit("/", 1)[0]
    index = path.rsplit("/", 1)[0] + "/" + SHARD_INDEX
    if not path.endswith("/" + SHARD_INDEX) and fs.exists(index):
        path = index
    if fs.isdir(path):  # a per-sample manifest written in parts, with no index beside it
        table = pq.read_table(path, columns=["shard"], filesystem=fs)
    else:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            table = pf.read(columns=[c for c in ("shard", "samples") if c in pf.schema_arrow.names])
    if "samples" in table.column_names:
        shards, samples = table.column("shard").to_pylist(), table.column("samples").to_pylist()
    else:
        counts = pc.value_counts(table.column("shard")).to_pylist()
        shards, samples = [c["values"] for c in counts], [c["counts"] for c in counts]
    out: dict[str, int] = {}
    for s, n in zip(shards, samples):
        full = s if "://" in s or s.startswith("/") else f"{base}/{s}"
        out[full] = out.get(full, 0) + int(n)
    return dict(sorted(out.items()))


def resolve(source: ShardSource, storage_options: dict) -> tuple[list[str], dict[str, int]]:
    """One source -> (shard URLs, known sample counts). Missing shards of a brace pattern are kept: the reader skips
    and counts them, so a typo in a range shows up in the counters rather than silently shrinking the data."""
    url = source.url
    if url.endswith(".parquet"):
        counts = read_manifest(url, storage_options)
        return list(counts), counts
    if _BRACE.search(url) or url.endswith(".tar"):
        return expand_braces(url), {}
    return list_prefix(url, storage_options), {}


@dataclass(frozen=True)
class ShardPlan:
    """The resolved datasets and the deterministic assignment of shards to readers."""

    datasets: tuple[tuple[str, ...], ...]  # shard URLs per dataset
    weights: tuple[float, ...]
    num_readers: int
    seed: int

    @property
    def all_shards(self) -> list[str]:
        return [s for d in self.datasets for s in d]

    def eval_shards(self, reader: int) -> list[str]:
        """Strided split of the sorted list: each shard exactly once across all readers."""
        return self.all_shards[reader :: self.num_readers]

    def epoch_length(self) -> int:
        """Shards per reader per shard-epoch: S // R (disjoint), at least 1 so every reader always has work."""
        return max(1, len(self.all_shards) // self.num_readers)

    def train_shards(self, reader: int, epoch: int) -> list[str]:
        """Reader's shards for one shard-epoch. The epoch's global sequence has R * epoch_length draws: datasets are
        interleaved by weight, each dataset walks through its own seeded permutation (restarting when exhausted, which
        is how small up-weighted datasets repeat), and reader r takes draws r, r + R, ..."""
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        total = self.num_readers * self.epoch_length()
        perms = [list(rng.permutation(len(d))) for d in self.datasets]
        cursors = [0] * len(self.datasets)
        p = np.asarray(self.weights, dtype=np.float64)
        p = p / p.sum()
        picks = rng.choice(len(self.datasets), size=total, p=p) if len(self.datasets) > 1 else np.zeros(total, int)
        seq: list[str] = []
        for d in picks:
            if cursors[d] == len(perms[d]):
                perms[d], cursors[d] = list(rng.permutation(len(self.datasets[d]))), 0
            seq.append(self.datasets[d][perms[d][cursors[d]]])
            cursors[d] += 1
        return seq[reader::self.num_readers]


def build_plan(sources: tuple[ShardSource, ...], num_readers: int, seed: int, storage_options: dict) -> tuple[ShardPlan, dict[str, int]]:
    """Resolve every source once; returns the plan and the sample counts the manifests gave (may be empty)."""
    datasets, weights, counts = [], [], {}
    for src in sources:
        urls, c = resolve(src, storage_options)
        assert urls, f"no shards found for {src.url}"
        assert src.weight > 0, src
        datasets.append(tuple(urls))
        weights.append(float(src.weight))
        counts.update(c)
    return ShardPlan(tuple(datasets), tuple(weights), num_readers, seed), counts
