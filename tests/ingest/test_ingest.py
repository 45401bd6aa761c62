"""End to end: the nasty corpus through run_ingest / tools/shard.py, on local folders and the loopback S3 server."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tarfile
import sys

import fsspec
import pytest
from PIL import Image

from pipeline.ingest.config import WORK_FORMAT, IngestConfig
from pipeline.ingest.engine import run_ingest
from pipeline.ingest.sources import IngestError
from tests.ingest.corpus import KEEP, build_corpus
from tests.ingest.helpers import check_readable, shard_contents, verdicts


def _by_suffix(got: dict[str, str], expected: dict[str, str]) -> dict[str, str]:
    out = {}
    for suffix in expected:
        matches = [v for src, v in got.items() if src.endswith(suffix)]
        assert len(matches) == 1, f"{suffix}: {matches}"
        out[suffix] = matches[0]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, *build_corpus(root)


@pytest.fixture(scope="module")
def clean_run(corpus, tmp_path_factory):
    root, sources, expected = corpus
    out = tmp_path_factory.mktemp("out") / "ds"
    report = run_ingest(IngestConfig(sources=tuple(sources), output=str(out), workers=1, samples_per_shard=5, quiet=True))
    return out, report


def test_every_input_gets_its_expected_verdict(corpus, clean_run):
    _root, _sources, expected = corpus
    out, report = clean_run
    got = _by_suffix(verdicts(out), expected)
    want = {k: (KEEP if v == "keep_or_near" else v) for k, v in expected.items()}
    assert got == want
    assert report["inputs"] == len(expected)
    assert report["kept"] + report["rejected"] + report["duplicates"] == report["inputs"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == [
        "_ingest", "classes.json", "manifest.parquet", "rejects.parquet", "report.json", "shards.parquet"]
    assert [p.name for p in (out / "_ingest").iterdir()] == ["config.json"]


def test_kept_samples_decode_everywhere_and_carry_metadata(clean_run):
    out, report = clean_run
    samples = check_readable(out)
    assert len(samples) == report["kept"]
    metas = {json.loads(p["json"])["source"]: (json.loads(p["json"]), p) for p in samples.values()}
    rotated = next(m for s, m in metas.items() if s.endswith("rotated.jpg"))[0]
    assert (rotated["original_width"], rotated["original_height"], rotated["width"], rotated["height"]) == (640, 427, 427, 640)
    big = next(m for s, m in metas.items() if s.endswith("big_coffee.jpg"))[0]
    assert (big["width"], big["height"]) == (768, 512)
    parquet_meta, parquet_parts = next(v for s, v in metas.items() if s.endswith("#id=p1"))
    assert parquet_parts["cls"] == b"7" and parquet_meta["caption"] == "coffee upside down"
    assert all("cls" not in p for s, (m, p) in metas.items() if "parquet" not in s)
    escaped = [p for p in out.parent.rglob("*escape*")] + [p for p in out.rglob("*.jpg")]
    assert escaped == []


def test_source_jpeg_within_limits_is_copied_byte_for_byte(corpus, clean_run):
    root, _sources, _expected = corpus
    out, _report = clean_run
    original = (root / "dump/nested/astronaut.jpg").read_bytes()
    assert original in [p["jpg"] for p in shard_contents(out).values()]


def test_near_duplicates_dropped_with_dedup_near(corpus, tmp_path):
    """--dedup near, and the same verdicts and shards whatever the split into units, dedup groups and buckets."""
    _root, sources, expected = corpus
    run_ingest(IngestConfig(sources=tuple(sources), output=str(tmp_path / "near"), workers=1, dedup="near", quiet=True))
    got = _by_suffix(verdicts(tmp_path / "near"), expected)
    assert got["dump/chelsea_recompressed.jpg"] == "duplicate_near"
    assert got["dump/chelsea.png"] == KEEP
    report = run_ingest(IngestConfig(sources=tuple(sources), output=str(tmp_path / "split"), workers=1, dedup="near",
                                     unit_size=3, group_inputs=4, bucket_records=9, quiet=True))
    assert report["shards"] == 1 and len(list((tmp_path / "split/rejects.parquet").iterdir())) > 3  # many groups
    assert verdicts(tmp_path / "split") == verdicts(tmp_path / "near")
    assert shard_contents(tmp_path / "split") == shard_contents(tmp_path / "near")


def test_two_workers_give_identical_shards(corpus, clean_run, tmp_path):
    _root, sources, _expected = corpus
    out, _report = clean_run
    run_ingest(IngestConfig(sources=tuple(sources), output=str(tmp_path / "w2"), workers=2, samples_per_shard=5,
                            unit_size=4, group_inputs=6, bucket_records=5, quiet=True))
    assert shard_contents(tmp_path / "w2") == shard_contents(out)
    assert verdicts(tmp_path / "w2") == verdicts(out)


def test_rerun_is_noop_and_mismatched_arguments_are_refused(corpus, clean_run, tmp_path, monkeypatch):
    _root, sources, _expected = corpus
    out, report = clean_run
    cfg = IngestConfig(sources=tuple(sources), output=str(out), workers=1, samples_per_shard=5, quiet=True)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert run_ingest(cfg) == report
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(IngestError, match="different arguments"):
        run_ingest(dataclasses.replace(cfg, clean=type(cfg.clean)(quality=80)))
    with monkeypatch.context() as m:  # the same arguments under a version whose work files differ
        m.setattr("pipeline.ingest.config.WORK_FORMAT", WORK_FORMAT + 1)
        with pytest.raises(IngestError, match="other work formats"):
            run_ingest(cfg)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = run_ingest(dataclasses.replace(cfg, output=str(copy), overwrite=True, samples_per_shard=3))
    assert again["shards"] == -(-again["kept"] // 3) == len(list(copy.glob("shard-*.tar")))


def test_missing_source_and_unwritable_output_fail_before_work(corpus, tmp_path, s3_server):
    _root, sources, _expected = corpus
    with pytest.raises(IngestError, match="does-not-exist"):
        run_ingest(IngestConfig(sources=(*sources, str(tmp_path / "does-not-exist")), output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
    with pytest.raises(IngestError, match="s3://no-such-bucket"):
        run_ingest(IngestConfig(sources=tuple(sources), output="s3://no-such-bucket/ds", quiet=True))


def test_labels_from_folders(tmp_path):
    from skimage import data as skdata

    for cls, img in (("cats", skdata.chelsea()), ("mugs", skdata.coffee()), ("cats", skdata.astronaut())):
        (tmp_path / "tree" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "tree" / cls / f"{img.shape[0]}.png")
    report = run_ingest(IngestConfig(sources=(str(tmp_path / "tree"),), output=str(tmp_path / "o"), workers=1,
                                     labels_from_folders=True, quiet=True))
    assert report["classes"] == ["cats", "mugs"]
    assert json.loads((tmp_path / "o/classes.json").read_text()) == ["cats", "mugs"]
    labels = sorted(int(p["cls"]) for p in shard_contents(tmp_path / "o").values())
    assert labels == [0, 0, 1]


def test_cli_s3_to_s3_hides_credentials(corpus, s3_bucket, s3_server):
    root, _sources, expected = corpus
    fs = fsspec.filesystem("s3")
    fs.put(str(root / "dump"), f"{s3_bucket}/raw/dump", recursive=True)
    fs.put_file(str(root / "hostile.tar"), f"{s3_bucket}/raw/hostile.tar")
    env = {**os.environ, **s3_server.env}
    secret = json.dumps({"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"]})
    cmd = [sys.executable, "tools/shard.py", f"{s3_bucket}/raw/dump", f"{s3_bucket}/raw/hostile.tar",
           "--output", f"{s3_bucket}/ds", "--workers", "2", "--quiet", "--storage-options", secret]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_repo())
    assert proc.returncode == 0, proc.stderr
    assert env["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr
    report = json.loads(fs.cat_file(f"{s3_bucket}/ds/report.json"))
    assert report["config"]["storage_options"] == {"key": "***", "secret": "***"}
    assert env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(report)
    assert report["inputs"] == len([k for k in expected if "parquet" not in k and "zip" not in k])
    assert "inputs" in proc.stdout and "images/s" in proc.stdout
    names = fs.ls(f"{s3_bucket}/ds")
    assert any(n.endswith("shard-000000.idx") for n in names) and not any("stage" in n for n in names)


def test_list_tgz_and_s3_zip_sources(corpus, s3_bucket, tmp_path):
    """A text list (comments, blanks, a missing file), a .tgz and a .zip read from S3, in one run."""
    root, _sources, _expected = corpus
    listing = tmp_path / "images.txt"
    listing.write_text(f"# picked by hand\n{root}/dump/nested/astronaut.jpg\n\n{root}/dump/rotated.jpg\n"
                       f"{root}/dump/gone.jpg\n")
    with tarfile.open(tmp_path / "more.tgz", "w:gz") as tar:
        tar.add(root / "dump/nested/astronaut.jpg", "astro_again.jpg")  # same bytes as the list's first line
        tar.add(root / "dump/big_coffee.jpg", "coffee.jpg")
    fsspec.filesystem("s3").put_file(str(root / "archive.zip"), f"{s3_bucket}/archive.zip")
    out = tmp_path / "o"
    report = run_ingest(IngestConfig(sources=(str(listing), str(tmp_path / "more.tgz"), f"{s3_bucket}/archive.zip"),
                                     output=str(out), workers=1, quiet=True))
    expected = {"dump/nested/astronaut.jpg": KEEP, "dump/rotated.jpg": KEEP, "dump/gone.jpg": "unreadable",
                "more.tgz::astro_again.jpg": "duplicate_exact", "more.tgz::coffee.jpg": KEEP,
                f"{s3_bucket}/archive.zip::../zipped.png": KEEP,
                f"{s3_bucket}/archive.zip::folder/garbage.jpg": "undecodable"}
    assert _by_suffix(verdicts(out), expected) == expected
    assert report["inputs"] == len(expected) == report["kept"] + report["rejected"] + report["duplicates"]
    assert len(check_readable(out)) == 4


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
