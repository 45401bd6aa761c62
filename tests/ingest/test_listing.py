"""Listing a big prefix by key ranges: with the per-task cap lowered to 7 keys, the same sources come back in many
parts over several rounds, and the plan (listing order, units, fingerprint) and the whole output equal those of
the unsplit listing. On the loopback S3 server (real s3fs, botocore and ListObjectsV2), in-process with 1 worker
(the lowered cap is a module constant, so it holds in this process only).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from pipeline.ingest import key_ranges
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.engine import run_ingest
from pipeline.ingest.retry import RetryPolicy
from pipeline.ingest.sources import IngestError
from tests.ingest.faults import FaultServer
from tests.ingest.helpers import Killed, kill_at, shard_contents, verdicts

CAP = 7


def _image(i: int) -> bytes:
    rng = np.random.default_rng(1000 + i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64)).save(buf, "JPEG")
    return buf.getvalue()


def _keys() -> dict[str, list[str]]:
    """Key names that make the cut points work: dense and sparse numbers, letters after the digits, a non-ASCII
    character, a loose file named like a sub-folder ("sub1.jpg" sorts before "sub1/"), nested sub-folders."""
    flat = [f"{i * i:06d}.jpg" for i in range(200)] + [f"z{j}_{chr(0xE9)}.jpg" for j in range(25)] + ["zz.png"]
    tree = ([f"{i:03d}.jpg" for i in range(0, 60, 3)] + ["sub1.jpg", "x.jpg"] +
            [f"sub1/{i:04d}.jpg" for i in range(40)] + [f"sub2/deeper/{c}.jpg" for c in "abcdefghijklmno"] +
            [f"sub10/{i}.jpg" for i in range(9)])
    return {"flat": flat, "tree": tree}


def _upload(bucket: str, tmp_path: Path) -> list[str]:
    """The S3 prefixes and a local folder; one image is stored twice (far apart), so dedup's winner is ordered."""
    paths = [f"{bucket}/{prefix}/{key}" for prefix, keys in _keys().items() for key in keys]
    fsspec.filesystem("s3").pipe({p: _image(3 if p.endswith("zz.png") else n) for n, p in enumerate(paths)})
    n = len(paths)
    local = tmp_path / "local"
    local.mkdir()
    for i in range(20):
        (local / f"{i:02d}.jpg").write_bytes(_image(n + i))
    return [f"s3://{bucket}/flat", f"s3://{bucket}/tree", str(local)]


def _run(sources: list[str], out: Path) -> dict:
    return run_ingest(IngestConfig(sources=tuple(sources), output=str(out), workers=1, unit_size=10,
                                   samples_per_shard=50, keep_staging=True, quiet=True))


def _plan(out: Path) -> tuple[dict, list[list[str]], dict[str, int]]:
    """plan.json, each unit's input URLs in order (read back through the saved parts), and each part's rows."""
    plan = json.loads((out / "_ingest/plan/plan.json").read_text())
    units = np.load(out / "_ingest/plan/units.npz")
    rows = {p: pq.read_table(p.removeprefix("file://"), columns=["url"]).column("url").to_pylist()
            for p in plan["parts"]}
    parts = plan["parts"]
    inputs = []
    for first, start, last, end in zip(units["part"], units["start"], units["last"], units["end"]):
        urls = [u for p in range(first, last + 1)
                for u in rows[parts[p]][start if p == first else 0:end if p == last else None]]
        inputs.append(urls)
    return plan, inputs, {Path(p).name: len(r) for p, r in rows.items()}


def test_split_listing_equals_unsplit_and_a_kill_during_listing_keeps_what_was_listed(s3_bucket, tmp_path,
                                                                                         monkeypatch):
    """Then the split listing is killed after 25 tasks (the kill hook's point, raising in-process); the rerun lists
    only the tasks that had no record of their own (one list_range call per S3 task) and gives the same plan and
    output."""
    sources = _upload(s3_bucket.removeprefix("s3://"), tmp_path)
    whole_report = _run(sources, tmp_path / "whole")
    monkeypatch.setattr(key_ranges, "LIST_CAP", CAP)
    from pipeline.ingest import plan as plan_module, sources as sources_module

    ranges_listed = []
    real_list_range = sources_module.list_range

    def counting(*args, **kwargs):
        ranges_listed.append(args[2:])
        return real_list_range(*args, **kwargs)

    monkeypatch.setattr(sources_module, "list_range", counting)
    split_report = _run(sources, tmp_path / "split")
    fresh = len(ranges_listed)
    assert not (tmp_path / "split/_ingest/done/list").exists()  # gone with the plan saved: a rerun lists again

    with monkeypatch.context() as m:
        m.setattr(plan_module, "maybe_kill", kill_at("list", 25))
        with pytest.raises(Killed):
            _run(sources, tmp_path / "killed")
    records = [p.name for p in (tmp_path / "killed/_ingest/done/list").iterdir()]
    s3_records = [n for n in records if not n.startswith("list-000002-")]  # source 2 is the local folder
    assert len(records) >= 25 and not (tmp_path / "killed/_ingest/plan/plan.json").exists()
    # A record made by another task under the same number (a parent listed again after the kill, cut elsewhere)
    # is not reused: that task lists again.
    other = tmp_path / "killed/_ingest/done/list" / s3_records[-1]
    other.write_text(json.dumps({**json.loads(other.read_text()), "task": "another listing"}))
    ranges_listed.clear()
    resumed_report = _run(sources, tmp_path / "killed")
    assert len(ranges_listed) == fresh - len(s3_records) + 1 < fresh - 20
    assert resumed_report["listing_fingerprint"] == split_report["listing_fingerprint"]
    assert _plan(tmp_path / "killed")[1] == _plan(tmp_path / "split")[1]
    assert shard_contents(tmp_path / "killed") == shard_contents(tmp_path / "split")

    whole, whole_units, whole_rows = _plan(tmp_path / "whole")
    split, split_units, split_rows = _plan(tmp_path / "split")
    assert len(whole["parts"]) == 6  # flat; tree's top, sub1, sub10, sub2; the local folder
    assert max(split_rows.values()) <= CAP and len(split["parts"]) > 60
    depth = max(name.count("_") for name in split_rows)  # list-TASK-SUB_R1_R2...: a range of round k has k-1 "_"
    assert depth >= 3, "listed in fewer than four rounds"
    assert split["fingerprint"] == whole["fingerprint"] == split_report["listing_fingerprint"]
    assert split_units == whole_units and len(whole_units) == split["units"]
    units = np.load(tmp_path / "split/_ingest/plan/units.npz")
    assert (units["last"] > units["part"]).any()  # units of 10 files run across parts of 7
    assert sum(split_rows.values()) == sum(whole_rows.values()) == sum(len(k) for k in _keys().values()) + 20
    assert split_report["kept"] == whole_report["kept"] == whole_report["inputs"] - 1
    assert verdicts(tmp_path / "split") == verdicts(tmp_path / "whole")
    assert shard_contents(tmp_path / "split") == shard_contents(tmp_path / "whole")


def test_range_listing_retries_transient_faults(s3_server, s3_bucket, monkeypatch):
    """Each page is retried on a 503 or a reset connection; the listing comes back whole and in order."""
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # our retries, not the client's
    bucket = s3_bucket.removeprefix("s3://")
    keys = [f"p/{i:03d}.jpg" for i in range(30)]
    for key in keys:
        fsspec.filesystem("s3").pipe(f"{bucket}/{key}", b"x")
    with FaultServer(upstream=s3_server.endpoint_url) as proxy:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.url},
                               config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}})
        proxy.fail(f"/{bucket}", ["503", "reset", "503"])
        listed = key_ranges.list_range(fs, bucket, "p/", False, "p/004.jpg", "p/020.jpg",
                                       RetryPolicy(4, 0.01), cap=CAP)
        # three faults, then one page of CAP keys and one probe (none after "p/0": no cut below "p/0")
        assert proxy.requests[f"/{bucket}"] == 3 + 1 + 1
    assert [key for key, _, _ in listed.objects] == keys[5:5 + CAP]
    assert listed.rest[0] == "p/011.jpg" and all(a < b for a, b in zip(listed.rest, listed.rest[1:]))
    assert listed.rest[-1] < "p/020.jpg"


class _Store:
    """ListObjectsV2 over in-memory keys (no Delimiter): pages of MaxKeys from StartAfter or the ContinuationToken
    (the last key sent). Faults of a store: `ignores_start_after` lists from the start; `shuffled` sends each page
    in another order (S3 Express One Zone directory buckets list out of key order)."""

    def __init__(self, keys: list[str], ignores_start_after: bool = False, shuffled: bool = False):
        self.keys, self.ignores_start_after, self.shuffled, self.requests = sorted(keys), ignores_start_after, \
            shuffled, 0

    def call_s3(self, method: str, Bucket: str, Prefix: str, MaxKeys: int, StartAfter: str = "",  # noqa: N803
                ContinuationToken: str | None = None) -> dict:
        self.requests += 1
        after = ContinuationToken or ("" if self.ignores_start_after else StartAfter)
        keys = [k for k in self.keys if k > after and k.startswith(Prefix)]
        page = keys[:MaxKeys]
        sent = page[::-1] if self.shuffled else page
        return {"Contents": [{"Key": k, "Size": 1, "ETag": "e"} for k in sent], "IsTruncated": len(keys) > MaxKeys,
                "NextContinuationToken": page[-1] if page else None}


def _list_by_rounds(store: _Store, prefix: str, cap: int) -> tuple[int, list[str]]:
    """What the driver does (sources.rest_tasks): each round lists its ranges, their rests are the next round's.
    The rounds, and every listed key in the order of the parts (the tree of splits)."""
    tasks, parts, rounds = [((), None, None)], [], 0
    while tasks:
        rounds, later = rounds + 1, []
        for branch, after, upto in tasks:
            got = key_ranges.list_range(store, "b", prefix, False, after, upto, RetryPolicy(1, 0), cap=cap)
            parts.append((branch, [key for key, _, _ in got.objects]))
            bounds = (*got.rest, upto)
            later += [(branch + (i,), a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]), 1)]
        tasks = later
    return rounds, [key for _, keys in sorted(parts) for key in keys]


def test_word_named_folders_split_in_few_rounds():
    """Sibling folders named by words, each bigger than the cap, under one walked prefix: the first task's keys
    vary only in digits, so cuts from its keys alone peel one folder off per round (50 folders: 51 rounds); the
    probes find the letters' level. Numbered keys keep their rounds and requests (no broad alphabet there)."""
    rng = np.random.default_rng(7)
    words = sorted({"".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(4, 10))) for _ in range(50)})
    keys = [f"train/{w}/{w}_{i:05d}.JPEG" for w in words for i in range(21)] + ["train/zz.txt", "trainz"]
    store = _Store(keys)
    rounds, listed = _list_by_rounds(store, "train/", 20)
    assert listed == sorted(keys)[:-1]  # every key once, in order ("trainz" is not under the prefix)
    # before the probes: 51 rounds, 2,301 requests; now 4 and 713 (each folder's task still cuts at the 8 digits
    # above its last counter digit, mostly empty ranges at this cap)
    assert rounds <= 5 and store.requests < 750, (rounds, store.requests)
    numbered = _Store([f"{i:05d}.jpg" for i in range(3000)])
    assert _list_by_rounds(numbered, "", 20) == (4, numbered.keys)
    assert numbered.requests <= 345, numbered.requests  # before: 316 (the probes add 25)


def test_range_listing_skips_keys_before_start_and_refuses_unordered_stores():
    """A store that ignores StartAfter costs pages, not duplicates. One that lists out of key order is sorted when
    one task lists the folder whole, and named with the cause once the folder needs ranges."""
    keys = [f"p/{i:03d}.jpg" for i in range(30)]
    listed = key_ranges.list_range(_Store(keys, ignores_start_after=True), "b", "p/", False, "p/004.jpg",
                                   "p/020.jpg", RetryPolicy(1, 0), cap=CAP)
    assert [key for key, _, _ in listed.objects] == keys[5:5 + CAP]
    whole = key_ranges.list_range(_Store(keys, shuffled=True), "b", "p/", False, None, None, RetryPolicy(1, 0), cap=30)
    assert not whole.rest and sorted(key for key, _, _ in whole.objects) == keys
    with pytest.raises(IngestError, match=r"s3://b/p/ is not listed in ascending key order \(S3 Express One Zone"
                                          r" directory buckets.*by another means"):
        key_ranges.list_range(_Store(keys, shuffled=True), "b", "p/", False, None, None, RetryPolicy(1, 0), cap=CAP)


def test_a_glob_is_listed_by_range_tasks_as_the_driver_would_expand_it(s3_bucket, tmp_path, monkeypatch):
    """`s3://b/glob/*.jpg` over a prefix is listed by range tasks (the cap lowered to 7: several rounds), never by
    the driver, and gives the inputs fs.glob matches: the folder's own .jpg keys, and a sub-folder named like one
    (`d.jpg/`) walked whole; not the .png, the .txt, nor a sub-folder that does not match. A glob with a literal
    stem (`01*.jpg`) lists only the keys under that stem. A glob that matches nothing fails the run naming it."""
    bucket = s3_bucket.removeprefix("s3://")
    keys = ([f"{i:03d}.jpg" for i in range(30)] + ["a.png", "notes.txt", "zz.jpg"] +
            [f"d.jpg/{i}.jpg" for i in range(3)] + [f"plain/{i}.jpg" for i in range(4)])
    fs = fsspec.filesystem("s3")
    fs.pipe({f"{bucket}/glob/{k}": _image(i) for i, k in enumerate(keys)})
    expected = {f"s3://{p}" for p in fs.glob(f"{bucket}/glob/*.jpg") if not p.endswith("d.jpg")}
    expected |= {f"s3://{p}" for p in fs.find(f"{bucket}/glob/d.jpg")}
    assert len(expected) == 30 + 1 + 3

    def no_listing(*args, **kwargs):
        raise AssertionError("the driver listed a prefix")

    from pipeline.ingest import sources

    real_expand = sources.expand_sources

    def expand_without_listing(*args, **kwargs):  # the driver's step alone, with listing forbidden
        with monkeypatch.context() as m:
            m.setattr(s3fs.S3FileSystem, "_lsdir", no_listing)
            m.setattr(s3fs.S3FileSystem, "_glob", no_listing)
            fs.invalidate_cache()
            return real_expand(*args, **kwargs)

    from pipeline.ingest import engine

    monkeypatch.setattr(engine, "expand_sources", expand_without_listing)
    monkeypatch.setattr(key_ranges, "LIST_CAP", CAP)
    report = _run([f"s3://{bucket}/glob/*.jpg"], tmp_path / "out")
    _, _, rows = _plan(tmp_path / "out")
    assert len(rows) > 5 and max(rows.values()) <= CAP  # listed in ranges
    assert set(verdicts(tmp_path / "out")) == expected and report["kept"] == len(expected)
    listed_prefixes = []

    def spy(fs_, bucket_, prefix, *args, **kwargs):
        listed_prefixes.append(prefix)
        return real_list_range(fs_, bucket_, prefix, *args, **kwargs)

    real_list_range = sources.list_range
    monkeypatch.setattr(sources, "list_range", spy)
    _run([f"s3://{bucket}/glob/01*.jpg"], tmp_path / "stem")
    assert set(listed_prefixes) == {"glob/01"}
    assert set(verdicts(tmp_path / "stem")) == {f"s3://{bucket}/glob/{i:03d}.jpg" for i in range(10, 20)}
    with pytest.raises(IngestError, match=r"glob/\*\.gif.*matched no files"):
        _run([f"s3://{bucket}/glob/*.gif"], tmp_path / "none")
    # Nothing was staged under the mistaken glob: the corrected command is not refused as "other arguments".
    assert not (tmp_path / "none/_ingest/config.json").exists()
    fs.pipe({f"{bucket}/glob/new.gif": _image(7)})  # the corrected bucket: the same command now finds it
    assert _run([f"s3://{bucket}/glob/*.gif"], tmp_path / "none")["kept"] == 1


def test_web_inputs_are_cut_into_longer_units():
    """Loose files and a parquet of image bytes at unit_size; web URLs (a text list's, a url parquet's rows) at
    web_unit_size, a run of each kind closed where the kind changes, and carried on across parts."""
    from pipeline.ingest.plan import cut_units
    from pipeline.ingest.sources import ListedPart

    parts = [(0, ListedPart("p0", 9, 0, (("file", 3, 0), ("web_parquet", 1, 9), ("web", 5, 0)))),
             (1, ListedPart("p1", 4, 0, (("web", 2, 0), ("parquet", 1, 5), ("file", 1, 0))))]
    assert cut_units(parts, 2, 4) == [
        (0, 0, 0, 0, 2, 0, 0), (0, 0, 2, 0, 3, 0, 0),  # 3 files: 2 + 1
        (2, 0, 3, 0, 4, 0, 4), (2, 0, 3, 0, 4, 4, 8), (2, 0, 3, 0, 4, 8, 9),  # 9 URL rows: 4 + 4 + 1
        (0, 0, 4, 0, 8, 0, 0), (0, 0, 8, 1, 2, 0, 0),  # 7 URLs over both parts: 4 + 3, until the parquet
        (2, 1, 2, 1, 3, 0, 2), (2, 1, 2, 1, 3, 2, 4), (2, 1, 2, 1, 3, 4, 5),  # 5 image rows: 2 + 2 + 1
        (0, 1, 3, 1, 4, 0, 0)]
