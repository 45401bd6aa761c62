"""The shuffle's files (exchange.py) on the loopback S3 server, through a proxy that counts the requests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.ingest import exchange
from pipeline.ingest.atomic import url_to_fs
from tests.ingest.faults import FaultServer

SCHEMA = pa.schema([("x", pa.int64())])


@pytest.mark.parametrize("rows, parts", [(50, 7), (40_000, 9_000)])
def test_a_part_is_read_in_two_requests_and_another_cut_is_refused(s3_server, s3_bucket, rows, parts):
    """A reader of one part read a HEAD and three GETs (~13M requests a phase at 300M images under one prefix);
    now a suffix GET (the offset table) and the part's own: one for a file shorter than the suffix. Past 8,190
    parts the table is longer than the suffix: one more GET. A part number past the file's count is an error, not
    an empty part (it meant a shuffle of another cut: samples lost silently)."""
    rng = np.random.default_rng(0)
    part = rng.integers(0, parts, rows)
    table = pa.table({"x": np.arange(rows)}, schema=SCHEMA)
    bucket = s3_bucket.removeprefix("s3://")
    with FaultServer(upstream=s3_server.endpoint_url) as proxy:
        so = {"client_kwargs": {"endpoint_url": proxy.url}}
        url = f"{s3_bucket}/records/g-000000.parts"
        exchange.write_parts(url, table, part, parts, so)
        fs, path = url_to_fs(url, {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}})
        size = fs.size(path)  # asked of the server itself, not through the counting proxy
        for p in sorted({0, parts // 2, parts - 1, int(part[0])}):
            before = proxy.served
            got = exchange.read_part(url, p, SCHEMA, so)
            assert got.column("x").to_pylist() == np.flatnonzero(part == p).tolist()
            table_beyond_tail = 8 * (parts + 2 - p) > exchange._TAIL
            data_request = (part == p).any() and size >= exchange._TAIL
            assert proxy.served - before == 1 + table_beyond_tail + data_request, (p, size, proxy.requests)
        with pytest.raises(ValueError, match="another cut"):
            exchange.read_part(url, parts, SCHEMA, so)
    assert proxy.requests.get(f"/{bucket}/records/g-000000.parts")
