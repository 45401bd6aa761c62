"""--keep-columns: a parquet source's other columns (LAION's NSFW, similarity, LICENSE) travel into each sample's
JSON under source_meta, as strict JSON; null where a file lacks one; a column the first parquet source lacks (a
typo) is refused before anything is staged, and the corrected command then runs on the same output."""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ingest.config import IngestConfig
from pipeline.ingest.engine import run_ingest
from pipeline.ingest.readers import ReadOptions, read_parquet
from pipeline.ingest.retry import RetryPolicy
from pipeline.ingest.sources import IngestError
from tests.ingest.faults import FaultServer
from tests.ingest.test_faults import _jpeg, _samples_by_source
from tools import shard


def _strict(raw: bytes) -> dict:
    def refuse(name):
        raise AssertionError(f"{name} in a sample's JSON")
    return json.loads(raw, parse_constant=refuse)


def test_kept_parquet_columns_travel_into_each_samples_json(tmp_path):
    files = {f"/img/{i}.jpg": _jpeg(i) for i in range(3)}
    when = pa.array([datetime.datetime(2022, 1, 1), None, datetime.datetime(2023, 5, 6, 7, 8, 9)], pa.timestamp("us"))
    with FaultServer(files) as web:
        urls = [f"{web.url}/img/{i}.jpg" for i in range(3)]
        pq.write_table(pa.table({"url": urls, "caption": ["a", "b", "c"], "id": ["r0", "r1", "r2"],
                                 "NSFW": ["UNLIKELY", "NSFW", "UNSURE"], "similarity": [0.31, float("nan"), 0.29],
                                 "LICENSE": [None, "cc-by", "?"], "when": when}), tmp_path / "laion.parquet")
        # A later file without LICENSE (schema drift): null there, not an error.
        pq.write_table(pa.table({"image": [_jpeg(7)], "id": ["b0"], "NSFW": ["UNLIKELY"], "similarity": [0.5],
                                 "when": when[:1]}), tmp_path / "z_bytes.parquet")
        (tmp_path / "urls.txt").write_text(urls[0] + "\n")

        def cfg(sources, columns) -> IngestConfig:
            return IngestConfig(sources=tuple(str(tmp_path / s) for s in sources), output=str(tmp_path / "out"),
                                workers=1, quiet=True, download_threads=4, keep_columns=columns)

        with pytest.raises(IngestError, match=r"--keep-columns nsfw: not a column of \S*laion.parquet, .*NSFW"):
            run_ingest(cfg(["laion.parquet", "z_bytes.parquet"], ("nsfw", "similarity")))
        with pytest.raises(IngestError, match="--keep-columns: parquet columns, but no source is a parquet file"):
            run_ingest(cfg(["urls.txt"], ("NSFW",)))
        report = run_ingest(cfg(["laion.parquet", "z_bytes.parquet"], shard.parse_args(
            ["x", "--output", "y", "--keep-columns", "NSFW, similarity,LICENSE,when"]).keep_columns))
    assert report["kept"] == 4
    samples = _samples_by_source(tmp_path / "out")
    laion, other = f"file://{tmp_path / 'laion.parquet'}", f"file://{tmp_path / 'z_bytes.parquet'}"
    meta = {s: _strict(p["json"]).get("source_meta") for s, p in samples.items()}
    assert meta[f"{laion}#id=r0"] == {"NSFW": "UNLIKELY", "similarity": 0.31, "LICENSE": None,
                                      "when": "2022-01-01T00:00:00", "url": urls[0]}
    assert meta[f"{laion}#id=r1"] == {"NSFW": "NSFW", "similarity": None, "LICENSE": "cc-by", "when": None,
                                      "url": urls[1]}
    assert meta[f"{laion}#id=r2"]["when"] == "2023-05-06T07:08:09"
    assert meta[f"{other}#id=b0"] == {"NSFW": "UNLIKELY", "similarity": 0.5, "LICENSE": None,
                                      "when": "2022-01-01T00:00:00"}
    assert samples[f"{laion}#id=r1"]["txt"] == b"b"


def test_keep_columns_must_be_distinct_names():
    assert shard.parse_args(["x", "--output", "y"]).keep_columns == ()
    with pytest.raises(ValueError, match="distinct"):
        IngestConfig(sources=("x",), output="y", keep_columns=("NSFW", "NSFW"))


def test_verify_hash_rejects_bytes_that_are_not_the_rows(tmp_path):
    """DataComp's sha256 column: a URL that now serves other bytes (another image, a host's "removed" placeholder)
    is the reject hash_mismatch; a row without a hash is not checked; an image-bytes parquet is checked too."""
    files = {f"/img/{i}.jpg": _jpeg(i) for i in range(4)}
    files["/img/3.jpg"] = _jpeg(30)  # the server's bytes changed since the row was written
    sha = [hashlib.sha256(_jpeg(i)).hexdigest() for i in range(4)]
    with FaultServer(files) as web:
        urls = [f"{web.url}/img/{i}.jpg" for i in range(4)]
        pq.write_table(pa.table({"url": urls, "id": ["r0", "r1", "r2", "r3"],
                                 "sha256": [sha[0], sha[1].upper(), None, sha[3]]}), tmp_path / "datacomp.parquet")
        pq.write_table(pa.table({"image": [_jpeg(5), _jpeg(6)], "id": ["b0", "b1"],
                                 "md5": [hashlib.md5(_jpeg(5)).digest(), hashlib.md5(b"other").digest()]}),
                       tmp_path / "bytes.parquet")

        def run(source: str, out: str, check: str) -> dict:
            return run_ingest(IngestConfig(sources=(str(tmp_path / source),), output=str(tmp_path / out), workers=1,
                                           quiet=True, download_threads=4, verify_hash=check))

        report = run("datacomp.parquet", "out", "sha256")
        with pytest.raises(IngestError, match="--verify-hash sha256: not a column of .*bytes.parquet"):
            run("bytes.parquet", "bad", "sha256")
        bytes_report = run("bytes.parquet", "bytes", "md5:MD5")
    assert report["rejected_by_reason"] == {"hash_mismatch": 1} and report["kept"] == 3
    source = f"file://{tmp_path / 'datacomp.parquet'}"
    rows = {r["source"]: r for r in pq.read_table(tmp_path / "out/rejects.parquet").to_pylist()}
    assert rows[f"{source}#id=r3"]["detail"] == \
        f"sha256 {hashlib.sha256(_jpeg(30)).hexdigest()}, the row's sha256 {sha[3]}"
    assert bytes_report["rejected_by_reason"] == {"hash_mismatch": 1} and bytes_report["kept"] == 1
    assert shard.parse_args(["x", "--output", "y", "--verify-hash", "h:md5"]).hash_check() == ("h", "md5")
    for bad in ("sha256:crc32", "h:shake_128", ":md5"):  # shake_: its hexdigest needs a length
        with pytest.raises(ValueError, match="the algorithm one of"):
            IngestConfig(sources=("x",), output="y", verify_hash=bad)
    # Spellings of one check are one fingerprint: a rerun with either resumes the output.
    assert IngestConfig(sources=("x",), output="y", verify_hash="sha256").fingerprint() == \
        IngestConfig(sources=("x",), output="y", verify_hash="sha256:SHA256").fingerprint()


def test_a_binary_digest_column_is_not_taken_for_the_image_and_a_number_is_not_a_digest(tmp_path):
    """A URL parquet whose sha256 is stored as bytes is still a URL parquet (the digest column is not the image
    column), and its digests are compared; LAION's int64 "hash" is refused as a digest before staging. A corrupt
    first parquet file does not hide a typo: the next one that reads is checked."""
    files = {f"/img/{i}.jpg": _jpeg(i) for i in range(2)}
    with FaultServer(files) as web:
        urls = [f"{web.url}/img/{i}.jpg" for i in range(2)]
        pq.write_table(pa.table({"url": urls, "digest": [hashlib.sha256(_jpeg(0)).digest(), b"\0" * 32],
                                 "hash": [1, 2]}), tmp_path / "b.parquet")
        (tmp_path / "a_corrupt.parquet").write_bytes(b"PAR1 not really")

        def run(out: str, **kw) -> dict:
            return run_ingest(IngestConfig(sources=(str(tmp_path / "a_corrupt.parquet"), str(tmp_path / "b.parquet")),
                                           output=str(tmp_path / out), workers=1, quiet=True, **kw))

        with pytest.raises(IngestError, match=r"--verify-hash hash: \S*b.parquet holds int64 there, not a digest"):
            run("out", verify_hash="hash")
        with pytest.raises(IngestError, match=r"--keep-columns Hash: not a column of \S*b.parquet"):
            run("out", keep_columns=("Hash",))
        report = run("out", verify_hash="digest")
    assert report["kept"] == 1
    assert report["rejected_by_reason"] == {"hash_mismatch": 1, "corrupt_parquet": 1}


@pytest.mark.parametrize("array, expected", [
    (pa.array([1_500], pa.timestamp("ns")), "1970-01-01T00:00:00.000001"),  # cut to microseconds
    (pa.array([0], pa.timestamp("ns", tz="UTC")), "1970-01-01T00:00:00+00:00"),
    (pa.array([3_000], pa.duration("ns")), "0:00:00.000003"),
    (pa.array([0], pa.time64("ns")), "00:00:00"),
    (pa.array([19_000], pa.date32()), "2022-01-08"),
    (pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2)), "1.50"),
    (pa.array([[1.0, float("inf")]], pa.list_(pa.float64())), [1.0, None]),
    (pa.array([{"a": float("nan"), "b": "x"}]), {"a": None, "b": "x"}),
    (pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64())), [["k", 1]]),
    (pa.array([b"\x00\xff"], pa.binary()), "AP8="),
    (pa.array(["t"], pa.large_string()), "t"),
    (pa.array([1.5], pa.float16()), 1.5),
])
def test_kept_values_of_every_parquet_type_are_strict_json(tmp_path, array, expected):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image": [_jpeg(0)], "v": array}), path)
    opts = ReadOptions(1 << 20, None, None, {}, RetryPolicy(1, 0.01), 1, 1.0, keep_columns=("v",))
    [(_, item)] = list(read_parquet(str(path), opts))
    assert item.data == _jpeg(0) and item.reject is None
    assert _strict(json.dumps(item.meta).encode()) == {"v": expected}
