"""The columns every curation table carries, and the sample ordinal that orders them.

A sample's ordinal is its place in the input: (input shard index << 32) | position in that shard, so comparing
ordinals compares input order (the ingest writes samples in input order), and an ordinal says where its bytes are
without any lookup. Tables are Arrow: `ordinal` int64, `key` string, `label` int64 (-1 = none) and, where present,
`embedding` as a fixed-size list of float32 (an (N, D) matrix with zero-copy access).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_POSITION_BITS = 32


def make_ordinals(shard_index: int, positions: np.ndarray) -> np.ndarray:
    """(N,) positions in input shard `shard_index` -> (N,) int64 ordinals."""
    return (np.int64(shard_index) << _POSITION_BITS) | np.asarray(positions, dtype=np.int64)


def ordinal_shard(ordinals: np.ndarray) -> np.ndarray:
    """(N,) ordinals -> (N,) input shard indices."""
    return np.asarray(ordinals, dtype=np.int64) >> _POSITION_BITS


def ordinal_position(ordinals: np.ndarray) -> np.ndarray:
    """(N,) ordinals -> (N,) positions within their input shard."""
    return np.asarray(ordinals, dtype=np.int64) & ((1 << _POSITION_BITS) - 1)


def embedding_column(emb: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32 -> an Arrow column of N fixed-size lists of D floats."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def embedding_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """The (N, D) float32 matrix of a fixed-size-list column (a copy only when the column is chunked)."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of equal values in a sorted (N,) array: the members of each cluster."""
    if len(values) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return list(zip(starts.tolist(), np.r_[starts[1:], len(values)].tolist()))
