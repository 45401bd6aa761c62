"""The driver's side of listing (pipeline/ingest/sources.expand_sources) never lists a SOURCE itself: at 300M keys
one sequential listing of the prefix is ~300k requests and every key's entry in the driver's memory."""

from __future__ import annotations

import fsspec
import pytest
import s3fs

from pipeline.ingest.layout import Layout
from pipeline.ingest.sources import IngestError, expand_sources


def test_the_driver_checks_sources_without_listing_them(s3_bucket, monkeypatch, tmp_path):
    fs = fsspec.filesystem("s3")
    for i in range(3):
        fs.pipe(f"{s3_bucket}/dump/sub/{i}.jpg", b"x")
        fs.pipe(f"{s3_bucket}/dump/{i}.jpg", b"x")
    fs.pipe(f"{s3_bucket}/one.jpg", b"x")

    def no_listing(*args, **kwargs):
        raise AssertionError("the driver listed a prefix")

    monkeypatch.setattr(s3fs.S3FileSystem, "_lsdir", no_listing)
    fs.invalidate_cache()
    layout = Layout(str(tmp_path / "out"))
    tasks = expand_sources((f"{s3_bucket}/dump", s3_bucket, f"{s3_bucket}/one.jpg"), False, {}, layout)
    assert [t.mode for t in tasks] == ["top", "top", "entries"]
    assert tasks[0].path.endswith("/dump") and tasks[2].entries[0][1].endswith("/one.jpg")
    with pytest.raises(IngestError, match="does not exist"):
        expand_sources((f"{s3_bucket}/missing",), False, {}, layout)
