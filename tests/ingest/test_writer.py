"""write_shard: a complete tar + DALI index, readable by tarfile, webdataset and DALI, on disk and on S3."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.ingest.writer import write_shard


def _jpeg(colour: tuple[int, int, int], size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _samples(n: int) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"key{i:04d}", {"jpg": _jpeg((10 * i, 200, 30)), "json": b'{"i": %d}' % i, "cls": str(i % 3).encode()})
        for i in range(n)
    ]


def test_tar_matches_dali_reference_index(tmp_path):
    write_shard(str(tmp_path / "shard-000000.tar"), _samples(7))
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.idx", "shard-000000.tar"]
    reference = tmp_path / "ref.idx"
    wds2idx = os.path.join(os.path.dirname(os.sys.executable), "wds2idx")
    subprocess.run([wds2idx, str(tmp_path / "shard-000000.tar"), str(reference)], check=True, capture_output=True)
    assert (tmp_path / "shard-000000.idx").read_text() == reference.read_text()


def test_tarfile_and_webdataset_read_back(tmp_path):
    import webdataset as wds

    samples = _samples(5)
    url = str(tmp_path / "shard-000000.tar")
    info = write_shard(url, samples)
    assert info.keys == tuple(k for k, _ in samples)
    with tarfile.open(url) as tar:
        assert tar.getnames()[:3] == ["key0000.jpg", "key0000.json", "key0000.cls"]
        assert tar.extractfile("key0003.jpg").read() == samples[3][1]["jpg"]
    got = list(wds.WebDataset(url, shardshuffle=False))
    assert tuple(s["__key__"] for s in got) == info.keys
    assert got[2]["jpg"] == samples[2][1]["jpg"] and got[2]["cls"] == b"2"


def test_same_samples_same_bytes(tmp_path):
    write_shard(str(tmp_path / "a.tar"), _samples(3))
    write_shard(str(tmp_path / "b.tar"), _samples(3))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_bytes_equal_tarfile_reference(tmp_path):
    """The hand-written members and end of archive are exactly what TarFile.addfile and close() produce."""
    samples = _samples(3)
    write_shard(str(tmp_path / "ours.tar"), samples, write_index=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours.tar").read_bytes() == buf.getvalue()


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield from _samples(2)
        raise RuntimeError("source died mid-shard")

    with pytest.raises(RuntimeError):
        write_shard(str(tmp_path / "shard-000000.tar"), broken())
    assert os.listdir(tmp_path) == []


def test_rejects_keys_with_dots(tmp_path):
    with pytest.raises(ValueError):
        write_shard(str(tmp_path / "s.tar"), [("a.b", {"jpg": b"x"})])


def test_s3_upload_is_one_object(s3_bucket):
    url = f"{s3_bucket}/ds/shard-000000.tar"
    samples = _samples(4)
    info = write_shard(url, samples)
    fs = fsspec.filesystem("s3")
    assert sorted(fs.ls(f"{s3_bucket}/ds")) == [u.removeprefix("s3://") for u in (info.index_url, url)]
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        names = [m.name for m in tar]
    assert names[0] == "key0000.jpg" and len(names) == 12


def _dali_read(tar: str, idx: str, n: int) -> list[tuple[np.ndarray, bytes]]:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[tar], index_paths=[idx], ext=["jpg", "cls"], missing_component_behavior="error")
        return jpg, cls

    p = pipe()
    p.build()
    jpgs, classes = p.run()
    return [(np.array(jpgs.at(i)), np.array(classes.at(i)).tobytes()) for i in range(n)]


def test_dali_reads_shard_with_index(tmp_path):
    samples = _samples(6)
    info = write_shard(str(tmp_path / "shard-000000.tar"), samples)
    got = _dali_read(info.url, info.index_url, 6)
    for (_key, parts), (jpg, cls) in zip(samples, got):
        assert jpg.tobytes() == parts["jpg"]
        assert cls == parts["cls"]


def test_member_headers_are_tarfiles():
    from pipeline.ingest.writer import _header, _tarfile_header

    for name, size in [("k.jpg", 0), ("0123456789abcdef0123.json", 123_456), ("a" * 96 + ".cls", 8**11 - 1)]:
        assert _header(name, size) == _tarfile_header(name, size)


def test_a_stage_tar_in_cleaning_order_is_read_in_a_few_ranged_requests(s3_server, s3_bucket):
    """A stage tar holds its unit's samples in the order they were cleaned (for fetched inputs, the order their
    fetches finished: each up to ~100 places off here); the shard phase takes them in input order. Through a file's
    read-ahead block (1 MiB here, s3fs's 50 MiB in production) every backward seek fetched a new block: hundreds of
    GETs for this 12 MB tar (review s11 measured 25x a tar's bytes). Read by windows of rows, sorted and merged: a
    few ranged GETs, every sample's bytes right."""
    import random

    from pipeline.ingest.assemble import ShardTask, _samples
    from pipeline.ingest.layout import Layout
    from tests.ingest.faults import FaultServer

    rng = random.Random(0)
    n = 600
    order = sorted(range(n), key=lambda i: i + rng.uniform(0, 100))
    payload = {i: rng.randbytes(rng.randint(10_000, 30_000)) for i in range(n)}
    layout = Layout(f"{s3_bucket}/out")
    with FaultServer(upstream=s3_server.endpoint_url) as proxy:
        write = {"client_kwargs": {"endpoint_url": proxy.url}}
        so = {**write, "default_block_size": 1 << 20}  # reads only: S3 parts are at least 5 MiB
        written = []

        def samples():
            for i in order:
                written.append(i)
                yield f"{i:020x}", {"jpg": payload[i]}

        info = write_shard(layout.stage_tar(0), samples(), write, write_index=False, unique_keys=False)
        members = {i: [{"ext": c.ext, "offset": c.offset, "size": c.size} for c in comps]
                   for i, comps in zip(written, info.components)}
        rows = [{"unit": 0, "key": f"{i:020x}", "members": members[i]} for i in range(n)]
        path = "/" + layout.stage_tar(0).removeprefix("s3://")
        before = proxy.requests.get(path, 0)
        got = list(_samples(rows, ShardTask(0, (), layout, so)))
        reads = proxy.requests[path] - before
    assert [key for key, _ in got] == [row["key"] for row in rows]
    assert all(parts == {"jpg": payload[int(key, 16)]} for key, parts in got)
    assert reads <= 3 * 2  # 3 windows of 256 rows, each one or two merged ranges


def test_an_object_store_write_streams_and_a_failed_one_leaves_nothing(s3_bucket, monkeypatch):
    """Streamed to S3 block by block (nothing spooled to local disk: a 10,000-URL unit's stage tar is ~1 GB): 12 MB
    in 5 MiB parts is a multipart upload under way before close, and appears whole at close. A write that fails
    after two parts leaves no object and no open upload; one whose abort fails too (the same network fault, or no
    s3:AbortMultipartUpload right) raises its own error and still leaves no object: garbage collection must not
    complete the upload (review s11b)."""
    import gc

    import s3fs

    from pipeline.ingest.atomic import atomic_writer

    so = {"default_block_size": 5 << 20}
    fs = fsspec.filesystem("s3", **so)
    bucket = s3_bucket.removeprefix("s3://")

    def uploads() -> list:
        return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])

    data = os.urandom(12 << 20)
    with atomic_writer(f"{s3_bucket}/ok.bin", so) as f:
        f.write(data)
        assert f.tell() == len(data) and len(uploads()) == 1 and not fs.exists(f"{s3_bucket}/ok.bin")
    assert fs.cat_file(f"{s3_bucket}/ok.bin") == data and uploads() == []
    with pytest.raises(RuntimeError, match="cleaning failed"):
        with atomic_writer(f"{s3_bucket}/bad.bin", so) as f:
            f.write(data)
            raise RuntimeError("cleaning failed")
    assert uploads() == []

    def abort_fails(*args, **kwargs):
        raise ConnectionError("reset during the abort")

    monkeypatch.setattr(s3fs.S3FileSystem, "abort_mpu", abort_fails)
    with pytest.raises(RuntimeError, match="cleaning failed"):
        with atomic_writer(f"{s3_bucket}/worse.bin", so) as f:
            f.write(data)
            raise RuntimeError("cleaning failed")
    del f
    gc.collect()
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/bad.bin") and not fs.exists(f"{s3_bucket}/worse.bin")
    assert len(uploads()) == 1  # the one whose abort failed: invisible, for the lifecycle rule


@pytest.mark.parametrize("store", ["local", "s3"])
def test_put_if_absent_keeps_the_first_object_even_when_the_check_raced(store, tmp_path, s3_bucket, monkeypatch):
    """A stage table, once published, is never replaced by a late attempt of its unit (review s16d). The exclusive
    create is the store's (link(2); S3's If-None-Match), not the existence check before it: with that check made
    to miss the object, as when two writers race, the second write still finds it and leaves it."""
    from pipeline.ingest.atomic import put_bytes_if_absent, url_to_fs

    url = str(tmp_path / "stage/unit-0.parquet") if store == "local" else f"{s3_bucket}/stage/unit-0.parquet"
    assert put_bytes_if_absent(url, b"first", None)
    assert not put_bytes_if_absent(url, b"second", None)
    fs = url_to_fs(url)[0]  # the cached instance put_bytes_if_absent uses: fsspec mirrors sync methods onto it
    monkeypatch.setattr(fs, "exists", lambda path, **kw: False)
    assert not put_bytes_if_absent(url, b"third", None)
    with fsspec.open(url, "rb") as f:
        assert f.read() == b"first"
    if store == "local":
        assert os.listdir(tmp_path / "stage") == ["unit-0.parquet"]  # no temporary left


@pytest.mark.parametrize("code, status, published", [("PreconditionFailed", 412, False), ("NotImplemented", 501, True)])
def test_put_if_absent_on_s3_compatible_stores_that_answer_otherwise(code, status, published, s3_bucket, monkeypatch):
    """A store whose 412 names no If-None-Match condition (s3fs then raises OSError(EINVAL), not FileExistsError)
    lost the race: not a permanent fault of the unit. One without conditional writes (501) gets the checked write,
    said once, and later writes skip the condition."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from pipeline.ingest import atomic

    def refuse(path, data, **kwargs):
        assert kwargs == {"mode": "create"}
        raise translate_boto_error(ClientError({"Error": {"Code": code, "Message": "as the store says"},
                                                "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"))

    monkeypatch.setattr(atomic, "_NO_CONDITIONAL_PUT", [])
    url = f"{s3_bucket}/stage/unit-0.parquet"
    monkeypatch.setattr(atomic.url_to_fs(url)[0], "pipe_file", refuse)  # the cached instance, as above
    assert atomic.put_bytes_if_absent(url, b"first", None) is published
    assert fsspec.filesystem("s3").exists(url) is published
    assert atomic._NO_CONDITIONAL_PUT == ([] if not published else [code])
    if published:
        assert not atomic.put_bytes_if_absent(url, b"second", None)  # the check before the write finds it
