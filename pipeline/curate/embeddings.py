"""The embedding pass's output, as the curation stages read it.

    EMBED/part-000000.parquet   ordinal, key, label, embedding (D float32) of input shards [0, S): the samples the
                                loader delivered, sorted by ordinal; schema metadata "listed" = samples in those shards
    EMBED/parts.json            written once every part exists: the input shard URLs, S, the part URLs, D

A part covers a fixed run of input shards, not a rank's share, so the parts (and everything computed from them) are
the same whatever number of ranks wrote them, and a killed pass resumes at the parts that exist.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

import pyarrow.parquet as pq

from pipeline.curate.records import embedding_column
from pipeline.curate.storage import get_bytes, put_bytes, url_to_fs, write_table


@dataclass(frozen=True)
class EmbeddingSet:
    folder: str
    shards: tuple[str, ...]  # input shard URLs; an ordinal's shard index points into this
    shards_per_part: int
    dim: int
    listed: int  # samples in the input shards
    embedded: int  # samples the loader delivered (the rest were unreadable and are left out)

    @property
    def num_parts(self) -> int:
        return -(-len(self.shards) // self.shards_per_part)

    def part(self, index: int) -> str:
        return part_url(self.folder, index)

    def part_shards(self, index: int) -> tuple[str, ...]:
        return self.shards[index * self.shards_per_part:(index + 1) * self.shards_per_part]

    def part_of(self, shard_index: np.ndarray) -> np.ndarray:
        return np.asarray(shard_index) // self.shards_per_part

    def save(self, storage_options: dict) -> None:
        put_bytes(f"{self.folder}/parts.json", json.dumps(asdict(self), indent=1).encode(), storage_options)

    @staticmethod
    def load(folder: str, storage_options: dict) -> "EmbeddingSet":
        d = json.loads(get_bytes(f"{folder}/parts.json", storage_options))
        return EmbeddingSet(**(d | {"shards": tuple(d["shards"])}))


def part_url(folder: str, index: int) -> str:
    return f"{folder}/part-{index:06d}.parquet"


@dataclass(frozen=True)
class PartCounts:
    listed: int  # samples in the part's input shards
    embedded: int  # rows of the part
    dim: int


def part_counts(url: str, storage_options: dict) -> PartCounts:
    """From the part's parquet footer alone."""
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    schema = meta.schema.to_arrow_schema()
    return PartCounts(int(schema.metadata[b"listed"]), meta.num_rows, schema.field("embedding").type.list_size)


def write_part(url: str, ordinals: np.ndarray, keys: np.ndarray, labels: np.ndarray, emb: np.ndarray,
               listed: int, storage_options: dict) -> None:
    """One part: (N,) int64 ordinals (sorted), (N,) str keys, (N,) int64 labels, (N, D) float32 embeddings."""
    table = pa.table({"ordinal": pa.array(ordinals, pa.int64()), "key": pa.array(keys, pa.string()),
                      "label": pa.array(labels, pa.int64()), "embedding": embedding_column(emb)})
    write_table(url, table.replace_schema_metadata({"listed": str(listed)}), storage_options)
