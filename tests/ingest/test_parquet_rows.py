"""A parquet source with a row group far larger than a unit (pyarrow before 15 wrote up to 64Mi rows a group by
default): each unit decodes its rows batch by batch, stopping at its last, and gets exactly the rows, identities and
values that decoding the whole group gives."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest import readers
from pipeline.ingest.readers import ReadOptions, read_parquet
from pipeline.ingest.retry import RetryPolicy

_CUTS = [(0, 300), (300, 777), (777, 1000)]


def _units(path) -> list[list[tuple[str, bytes, dict | None]]]:
    opts = ReadOptions(1 << 20, None, None, {}, RetryPolicy(1, 0.01), 1, 1.0, keep_columns=("when",))
    return [[(item.source, item.data, item.meta) for _, item in read_parquet(str(path), opts, lo, hi)]
            for lo, hi in _CUTS]


def test_units_of_one_large_row_group_stream_exactly_their_rows(tmp_path, monkeypatch):
    n = 1000
    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"image": [b"img %d" % i for i in range(n)], "id": [f"i{i}" for i in range(n)],
                             "when": pa.array([i * 1_000_001 for i in range(n)], pa.timestamp("ns"))}),
                   path, row_group_size=n)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    whole = _units(path)

    pulled = []
    original = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    monkeypatch.setattr(readers, "_WHOLE_GROUP_ROWS", 100)
    monkeypatch.setattr(readers, "_BATCH_ROWS", 64)
    streamed = _units(path)
    assert streamed == whole
    assert [len(u) for u in streamed] == [300, 477, 223]
    assert [s for u in streamed for s, _, _ in u] == [f"{path}#id=i{i}" for i in range(n)]
    assert streamed[1][0][1] == b"img 300" and streamed[2][-1][2] == {"when": "1970-01-01T00:00:00.999000"}
    # Each unit stopped at the batch holding its last row: 5, 13 and 16 batches of 64, not 16 each.
    assert len(pulled) == 5 + 13 + 16
