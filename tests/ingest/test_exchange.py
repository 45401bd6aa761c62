"""The shuffle's files (exchange.py) on the loopback S3 server, through a proxy that counts the requests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.ingest import exchange
from tests.ingest.faults import FaultServer

SCHEMA = pa.schema([("x", pa.int64())])


@pytest.mark.parametrize("rows, parts, known", [(50, 7, True), (50, 7, False), (40_000, 9_000, True),
                                                 (40_000, 9_000, False)])
def test_a_part_is_read_in_two_requests_and_another_cut_is_refused(s3_server, s3_bucket, rows, parts, known):
    """A reader of one part made a HEAD and three GETs (~13M requests a phase at 300M images under one prefix); now
    a suffix GET from its offset entry to the end (no HEAD) and the part's own GET; none for an empty part. Without
    the part count, a 64 KB suffix: past 8,190 parts the table is longer, one more GET. A part number past the
    file's count, or a count other than the reader's, is an error, not an empty part (it meant a shuffle of another
    cut: samples lost silently)."""
    rng = np.random.default_rng(0)
    part = rng.integers(0, parts, rows)
    table = pa.table({"x": np.arange(rows)}, schema=SCHEMA)
    bucket = s3_bucket.removeprefix("s3://")
    with FaultServer(upstream=s3_server.endpoint_url) as proxy:
        so = {"client_kwargs": {"endpoint_url": proxy.url}}
        url = f"{s3_bucket}/records/g-000000.parts"
        exchange.write_parts(url, table, part, parts, so)
        for p in sorted({0, parts // 2, parts - 1, int(part[0])}):
            before = proxy.served
            got = exchange.read_part(url, p, SCHEMA, so, parts if known else 0)
            assert got.column("x").to_pylist() == np.flatnonzero(part == p).tolist()
            longer = not known and 8 * (parts + 2 - p) > exchange._TAIL
            assert proxy.served - before == 1 + longer + bool((part == p).any()), (p, proxy.requests)
        with pytest.raises(ValueError, match="another cut"):
            exchange.read_part(url, parts, SCHEMA, so)
        with pytest.raises(ValueError, match="another cut"):
            exchange.read_part(url, 0, SCHEMA, so, parts + 1)
    assert proxy.requests.get(f"/{bucket}/records/g-000000.parts")


def test_a_store_without_suffix_ranges_asks_the_size_first(tmp_path, monkeypatch):
    """adlfs passes a negative start on as an offset, sftp's files have no size (review s16c): stores other than S3,
    GCS, local and memory get the size, then positive ranges."""
    url = str(tmp_path / "g.parts")
    part = np.arange(30) % 5
    exchange.write_parts(url, pa.table({"x": np.arange(30)}, schema=SCHEMA), part, 5, {})
    monkeypatch.setattr(exchange, "_SUFFIX_RANGES", set())
    for p in range(5):
        assert exchange.read_part(url, p, SCHEMA, {}, 5).column("x").to_pylist() == list(range(p, 30, 5))
