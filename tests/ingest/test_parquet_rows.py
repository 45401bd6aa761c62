"""A parquet source with row groups far larger than a unit (pyarrow before 15 wrote up to 64Mi rows a group by
default; a group of images is large in bytes): each unit decodes its rows batch by batch, stopping at its last, and
gets exactly the rows, identities and values that decoding the whole group gives."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ingest import readers
from pipeline.ingest.readers import ReadOptions, read_parquet
from pipeline.ingest.retry import RetryPolicy

_CUTS = [(0, 300), (300, 777), (777, 1000)]


def _units(path) -> list[list[tuple[str, bytes, dict | None]]]:
    opts = ReadOptions(1 << 20, None, None, {}, RetryPolicy(1, 0.01), 1, 1.0, keep_columns=("when",))
    return [[(item.source, item.data, item.meta) for _, item in read_parquet(str(path), opts, lo, hi)]
            for lo, hi in _CUTS]


def _table(rows: range, ident: bool) -> pa.Table:
    columns = {"image": [b"img %d" % i for i in rows],
               "when": pa.array([i * 1_000_001 for i in rows], pa.timestamp("ns"))}
    return pa.table({**columns, "id": [f"i{i}" for i in rows]} if ident else columns)


# Batches of 64 rows pulled: in one group of 1,000, each unit stops at the batch holding its last row (5, 13 and 16,
# not 16 each); with groups of 150 + 700 + 150 where only the 700 streams, its rows [0, 150), [150, 627) and
# [627, 700) take 3, 10 and 11 batches (each unit decodes the group from its start).
@pytest.mark.parametrize("groups, ident, by_bytes, pulls", [
    ([1000], True, False, 5 + 13 + 16),  # one group, identities from the id column
    ([150, 700, 150], False, False, 3 + 10 + 11),  # groups of mixed sizes, identities by row number across them
    ([1000], False, True, 5 + 13 + 16),  # large in bytes, not in rows: batches sized by bytes
])
def test_units_of_large_row_groups_stream_exactly_their_rows(tmp_path, monkeypatch, groups, ident, by_bytes,
                                                              pulls):
    path = tmp_path / "groups.parquet"
    with pq.ParquetWriter(path, _table(range(1), ident).schema) as writer:
        first = 0
        for n in groups:
            writer.write_table(_table(range(first, first + n), ident), row_group_size=n)
            first += n
    assert [pq.ParquetFile(path).metadata.row_group(g).num_rows for g in range(len(groups))] == groups
    whole = _units(path)

    pulled = []
    original = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    if by_bytes:
        size = pq.ParquetFile(path).metadata.row_group(0).total_byte_size
        monkeypatch.setattr(readers, "_WHOLE_GROUP_BYTES", size // 2)
        monkeypatch.setattr(readers, "_BATCH_BYTES", size * 64 // 1000 + 1)  # 64 rows a batch
    else:
        monkeypatch.setattr(readers, "_WHOLE_GROUP_ROWS", 200)
        monkeypatch.setattr(readers, "_BATCH_ROWS", 64)
    streamed = _units(path)
    assert streamed == whole
    expected = [f"{path}#id=i{i}" if ident else f"{path}#row={i}" for i in range(1000)]
    assert [s for u in streamed for s, _, _ in u] == expected
    assert streamed[1][0][1] == b"img 300" and streamed[2][-1][2] == {"when": "1970-01-01T00:00:00.999000"}
    assert len(pulled) == pulls and set(pulled) <= {64, 1000 % 64, 700 % 64}
