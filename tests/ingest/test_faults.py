"""Transient faults are retried and lose nothing; a unit that keeps failing is quarantined (the run goes on without
it, and a rerun retries it, or --give-up-quarantined finalizes without it, its inputs in rejects); only
deterministic content faults become rejects. Also the web-dump sources: url + caption parquet (downloaded by
threads) and WebDataset tars (txt / json / cls carried into the output sample).

The faults come from a loopback server (faults.py) in front of real clients: urllib for web URLs, s3fs and
botocore for the moto S3 server. Runs are in-process with 1 worker and a short backoff, to stay cheap.
"""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs
from PIL import Image

from pipeline.ingest import fetch
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.engine import run_ingest
from pipeline.ingest.readers import RawItem, _guard_fetches
from pipeline.ingest.retry import TransientFailure
from tests.ingest.faults import FaultServer
from tools import shard
from tests.ingest.helpers import check_readable, shard_contents, verdicts


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((96 + i, 80)).save(buf, "JPEG")
    return buf.getvalue()


def _cfg(sources, out, **kw) -> IngestConfig:
    return IngestConfig(sources=tuple(str(s) for s in sources), output=str(out), workers=1, quiet=True, retries=3,
                        retry_base_s=0.01, **kw)


def _samples_by_source(out) -> dict[str, dict[str, bytes]]:
    return {json.loads(p["json"])["source"]: p for p in shard_contents(out).values()}


def test_url_caption_parquet_and_url_list_through_web_faults(tmp_path):
    files = {f"/img/{i}.jpg": _jpeg(i) for i in range(12)}
    with FaultServer(files, slow_s=1.5) as web:
        urls = [f"{web.url}/img/{i}.jpg" for i in range(10)] + [f"{web.url}/img/missing.jpg", f"{web.url}/img/dead.jpg"]
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(12)],
                                 "id": [f"r{i}" for i in range(12)]}), tmp_path / "laion.parquet", row_group_size=4)
        (tmp_path / "more.txt").write_text(f"{web.url}/img/10.jpg\n{web.url}/img/11.jpg\n")
        for path, faults in {"/img/0.jpg": ["503", "503"], "/img/1.jpg": ["reset", "reset"], "/img/2.jpg": ["cut"],
                             "/img/3.jpg": ["slow"], "/img/10.jpg": ["reset"], "/img/dead.jpg": ["503"] * 100}.items():
            web.fail(path, faults)
        report = run_ingest(_cfg([tmp_path / "laion.parquet", tmp_path / "more.txt"], tmp_path / "out",
                                 download_threads=4, unit_size=1, web_unit_size=5, keep_staging=True,
                                 http_timeout_s=1.0))
        assert web.requests["/img/0.jpg"] == 3 and web.requests["/img/dead.jpg"] == 3  # retried, then given up
        assert web.requests["/img/3.jpg"] == 2  # timed out at --http-timeout, then fetched
    got = verdicts(tmp_path / "out")
    rejected = {s: v for s, v in got.items() if v != "keep"}
    parquet = str(tmp_path / "laion.parquet")
    assert rejected == {f"file://{parquet}#id=r10": "http_404", f"file://{parquet}#id=r11": "download_failed"}
    assert report["kept"] == 12
    # The parquet file of URLs was cut into units of 5 of its rows (web_unit_size, across its row groups of 4), the
    # list of URLs is a fourth unit (unit_size=1 would have cut either into more, taken for image rows or files).
    assert len(list((tmp_path / "out/_ingest/stage").glob("*.parquet"))) == 4
    samples = _samples_by_source(tmp_path / "out")
    first = samples[f"file://{parquet}#id=r0"]
    assert first["txt"] == b"caption 0" and json.loads(first["json"])["source_meta"]["url"] == urls[0]
    assert samples[f"{web.url}/img/10.jpg"]["jpg"] == files["/img/10.jpg"]  # a JPEG within limits is copied


def test_a_unit_cleans_urls_as_they_arrive_yet_keeps_input_order(tmp_path):
    """A URL parquet whose first row times out once: the unit cleans the rows behind it meanwhile (they lie before
    it in the stage tar), yet its stage table is in input order, and the output is byte for byte that of a run where
    nothing was slow. Of two rows with one identity (id r0, another URL), the first listed is kept although the
    second was cleaned and staged first. A tar holding a.jpg twice (images P, then Q) and b.jpg (Q): the second
    a.jpg is the duplicate_source, and b.jpg is kept (left to dedup, the second a.jpg took b.jpg's pixel hash and
    then went itself: Q was lost, review s11)."""
    files = {f"/img/{i}.jpg": _jpeg(i) for i in range(6)}
    parquet, archive = tmp_path / "laion.parquet", tmp_path / "dump.tar"
    archive.write_bytes(_wds_tar([("a", {"jpg": _jpeg(10)}), ("a", {"jpg": _jpeg(11)}), ("b", {"jpg": _jpeg(11)})]))
    with FaultServer(files, slow_s=1.5) as web:
        urls = [f"{web.url}/img/{i}.jpg" for i in range(6)]
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(6)],
                                 "id": ["r0", "r1", "r2", "r0", "r4", "r5"]}), parquet)
        run_ingest(_cfg([parquet, archive], tmp_path / "steady", keep_staging=True, http_timeout_s=1.0))
        web.fail("/img/0.jpg", ["slow"])
        report = run_ingest(_cfg([parquet, archive], tmp_path / "out", keep_staging=True, http_timeout_s=1.0))
    out, source = tmp_path / "out", f"file://{parquet}#id="
    assert web.requests["/img/0.jpg"] == 3  # the steady run's, then a timeout and its retry
    stage = pq.read_table(out / "_ingest/stage/unit-00000000.parquet").to_pylist()
    assert [r["source"] for r in stage] == [source + i for i in ("r0", "r1", "r2", "r0", "r4", "r5")]
    offsets = [r["members"][0]["offset"] for r in stage if r["members"]]
    assert offsets[0] == max(offsets)  # staged last: the others were cleaned while it waited for its retry
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert [(r["source"], r["reason"]) for r in rejects] == [(source + "r0", "duplicate_source"),
                                                              (f"file://{archive}::a.jpg", "duplicate_source")]
    assert report["kept"] == 7
    samples = _samples_by_source(out)
    assert samples[source + "r0"]["txt"] == b"c0" and json.loads(samples[source + "r0"]["json"])["source_meta"][
        "url"] == urls[0]
    tar = f"file://{archive}::"
    assert samples[tar + "a.jpg"]["jpg"] == _jpeg(10) and samples[tar + "b.jpg"]["jpg"] == _jpeg(11)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == \
        {p.name: p.read_bytes() for p in (tmp_path / "steady").glob("shard-*")}


def _wds_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_s3_faults_retried_quarantined_then_rerun_loses_nothing(s3_server, s3_bucket, tmp_path, monkeypatch):
    """Also: the same outage with --give-up-quarantined (the CLI, in-process), with img10 failing as well and an
    archive that keeps failing: the first run gives nothing up (exit 3: the fault may pass) and names both files;
    in the second, img11 fails too, for the first time: nothing is given up yet (exit 3); the third gives a final
    output, exit status 4, without the three loose files that failed twice (their unit's other file kept) and
    without the archive (its unit given up whole), all in rejects; a rerun changes nothing."""
    # Our retries, not the client's: s3fs and botocore retry a failed request once at most here.
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    raw = fsspec.filesystem("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for i in range(12):
        raw.pipe(f"{bucket}/dump/img{i:02d}.jpg", _jpeg(i))
    wds = [("00000/000000000", {"jpg": _jpeg(20), "txt": b"a red thing", "json": b'{"url": "http://x/0", "w": 1}',
                                "cls": b"3"}),
           ("00000/000000001", {"jpg": _jpeg(21), "txt": "un chat \u00e9".encode()}),
           ("00000/000000002", {"txt": b"a caption whose image failed to download"}),
           ("00000/000000003", {"png": _encode_png(22), "json": b"not json"})]
    raw.pipe(f"{bucket}/web/part-0.tar", _wds_tar(wds))
    raw.pipe(f"{bucket}/web/part-1.tar", _wds_tar([("k0", {"jpg": _jpeg(23)}), ("k1", {"jpg": _jpeg(24)})])[:3000])
    with FaultServer(upstream=s3_server.endpoint_url) as proxy:
        so = {"client_kwargs": {"endpoint_url": proxy.url},
              "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
        sources = [f"{s3_bucket}/dump", f"{s3_bucket}/web/*.tar"]
        cfg = _cfg(sources, tmp_path / "out", unit_size=4, storage_options=so)
        proxy.fail(f"/{bucket}/dump/img01.jpg", ["503"] * 3)  # outlasts the client's retry, not ours
        proxy.fail(f"/{bucket}/web/part-0.tar", ["reset"] * 3)  # the archive is re-read from the start
        proxy.fail(f"/{bucket}/dump/img09.jpg", ["503"] * 1000)  # an outage: unit 2 cannot be read
        partial = run_ingest(cfg)  # unit 2 (img08-img11) cannot be read: the run goes on without it
        assert [q["unit"] for q in partial["quarantined"]] == [2] and "img09" in partial["quarantined"][0]["reason"]
        assert partial["kept"] == 12 - 4 + 3 + 1 and not any("img09" in s for s in verdicts(tmp_path / "out"))
        staged = {p.name for p in (tmp_path / "out/_ingest/stage").glob("*.parquet")}  # kept for the rerun
        assert staged == {f"unit-{u:08d}.parquet" for u in (0, 1, 3, 4)}
        proxy.fail(f"/{bucket}/web/part-1.tar", ["reset"] * 1000)  # unit 4, one archive, can no longer be read
        proxy.fail(f"/{bucket}/dump/img10.jpg", ["503"] * 1000)  # a second file of unit 2
        _give_up_while_unit_2_fails(sources, so, tmp_path / "final", verdicts(tmp_path / "out"), proxy, bucket)
        proxy.clear()
        report = run_ingest(cfg)  # the rerun stages unit 2 and redoes dedup, resolve and shards with it
        assert report["quarantined"] == [] and [p.name for p in (tmp_path / "out/_ingest").iterdir()] == [
            "config.json"]
    got = verdicts(tmp_path / "out")
    rejected = {s.removeprefix(f"{s3_bucket}/web/"): v for s, v in got.items() if v != "keep"}
    assert rejected == {"part-0.tar::00000/000000002": "no_image", "part-1.tar::": "corrupt_archive"}
    assert report["kept"] == 12 + 3 + 1  # every loose file, three WebDataset images, what preceded the corruption
    samples = _samples_by_source(tmp_path / "out")
    first = samples[f"{s3_bucket}/web/part-0.tar::00000/000000000.jpg"]
    meta = json.loads(first["json"])
    assert (first["txt"], first["cls"], meta["caption"], meta["source_meta"]) == (
        b"a red thing", b"3", "a red thing", {"url": "http://x/0", "w": 1})
    assert samples[f"{s3_bucket}/web/part-0.tar::00000/000000001.jpg"]["txt"] == "un chat \u00e9".encode()
    assert json.loads(samples[f"{s3_bucket}/web/part-0.tar::00000/000000003.png"]["json"])["source_meta"] == {
        "unparsed": "not json"}
    check_readable(tmp_path / "out")


def _give_up_while_unit_2_fails(sources: list[str], so: dict, out, partial: dict[str, str], proxy, bucket) -> None:
    argv = [*sources, "--output", str(out), "--unit-size", "4", "--workers", "1", "--retries", "3", "--quiet",
            "--storage-options", json.dumps(so), "--give-up-quarantined"]
    assert shard.main(argv) == 3  # quarantined for the first time: not given up (the fault may pass), not final
    assert not list((out / "rejects.parquet").glob("quarantined*"))
    named = {u: [url.rsplit("/", 1)[1] for url in urls]
             for u, urls in json.loads((out / "_ingest/quarantined.json").read_text()).items()}
    assert named == {"2": ["img09.jpg", "img10.jpg"], "4": []}  # every file unit 2 failed on; unit 4 whole
    proxy.fail(f"/{bucket}/dump/img11.jpg", ["503"] * 1000)  # another file of unit 2 fails, for the first time
    assert shard.main(argv) == 3  # img11 failed once only: nothing is given up, not even img09 or the archive
    named = {u: [url.rsplit("/", 1)[1] for url in urls]
             for u, urls in json.loads((out / "_ingest/quarantined.json").read_text()).items()}
    assert named == {"2": ["img09.jpg", "img10.jpg", "img11.jpg"], "4": []}
    assert shard.main(argv) == 4  # all failed again: given up, final
    report = json.loads((out / "report.json").read_text())
    # Unit 2 staged without img09, img10 and img11; unit 4 (the archive) given up whole.
    assert report["gave_up_quarantined"] and [q["unit"] for q in report["quarantined"]] == [4]
    got = verdicts(out)
    given_up = sorted(s.rsplit("/", 1)[1] for s, v in got.items() if v == "quarantined")
    assert given_up == ["img09.jpg", "img10.jpg", "img11.jpg", "part-1.tar"]
    assert report["rejected_by_reason"]["quarantined"] == 4
    salvaged = [s for s in got if s.endswith("img08.jpg")]
    assert len(salvaged) == 1 and got[salvaged[0]] == "keep"
    # the units given up whole, written by a give-up task (a part per chunk of units), not by the driver
    assert [p.name for p in (out / "rejects.parquet").glob("quarantined*")] == ["quarantined-000000.parquet"]
    whole = pq.read_table(out / "rejects.parquet/quarantined-000000.parquet").to_pylist()
    assert [r["source"].rsplit("/", 1)[1] for r in whole] == ["part-1.tar"] and "part-1.tar" in whole[0]["detail"]
    files = [r for r in pq.read_table(out / "rejects.parquet").to_pylist() if "/dump/" in r["source"]]
    # each file's own last error: the proxy's 503 SlowDown (s3fs reports it as EBUSY with S3's message)
    assert len(files) == 3 and all("reduce your request rate" in r["detail"] for r in files), files
    others = {s: v for s, v in partial.items() if "part-1.tar" not in s}  # as the run that left unit 2 out
    assert {s: v for s, v in got.items() if v != "quarantined" and s not in salvaged} == others
    assert report["kept"] + report["rejected"] + report["duplicates"] == report["inputs"] == len(others) + 4 + 1
    assert (out / "shards.parquet").exists() and [p.name for p in (out / "_ingest").iterdir()] == ["config.json"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert shard.main(argv) == 4  # final: the rerun is a no-op
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before


def test_exit_status_says_whether_the_output_is_final_and_what_it_lacks():
    def report(quarantined: int, gave_up: bool, given_up: int) -> dict:
        return {"quarantined": [{"unit": u, "reason": "TransientFailure: ..."} for u in range(quarantined)],
                "gave_up_quarantined": gave_up, "rejected_by_reason": {"quarantined": given_up} if given_up else {}}

    assert shard.exit_status(report(0, False, 0)) == (0, "")
    code, message = shard.exit_status(report(2, False, 0))  # left out until a rerun stages them
    assert code == 3 and "2 unit(s) quarantined" in message and "unit 1:" in message
    code, message = shard.exit_status(report(1, False, 3))  # a unit failed anew beside files given up in it
    assert code == 3 and "3 input(s) that had failed in an earlier run too were given up" in message
    code, message = shard.exit_status(report(0, False, 2))  # files given up, every unit staged
    assert code == 4 and message.startswith("shard.py: 2 input(s) given up") and "whole" not in message
    code, message = shard.exit_status(report(1, True, 5))  # files and a whole unit given up
    assert code == 4 and "every input of 1 unit(s) that failed whole in both" in message
    assert shard.exit_status({"rejected_by_reason": {}}) == (0, "")  # a report from before quarantine existed


def _encode_png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(i))).save(buf, "PNG")
    return buf.getvalue()


def _fetches(n: int, lost: set[int], consumed: list[int]):
    """n fetches of a unit as the readers see them, the `lost` ones having outlasted their retries."""
    for i in range(n):
        consumed.append(i)
        f = fetch.Fetched(f"s3://b/{i}.jpg", None if i in lost else b"x", ("quarantined", "503") if i in lost else None,
                          transient=i in lost, lost=i in lost, error=ConnectionError("503") if i in lost else None)
        yield (i, RawItem(f.url, f.data, reject=f.reject)), f


def test_a_unit_names_every_file_it_lost_and_an_outage_stops_it_early():
    """A quarter of 300 files lost (77, more than 64): every one is named, and after the first loss nothing more is
    passed on to be cleaned (the unit will not be staged). Every fetch failing is an outage: the unit stops after 64
    fetches, naming no file (it is retried, or given up, whole)."""
    consumed, passed = [], []
    lost = set(range(70, 300, 3))
    with pytest.raises(TransientFailure) as failure:
        passed.extend(item.source for _, item in _guard_fetches(_fetches(300, lost, consumed), 3, 300))
    assert failure.value.objects == tuple(f"s3://b/{i}.jpg" for i in sorted(lost)) and len(consumed) == 300
    assert passed == [f"s3://b/{i}.jpg" for i in range(64)]  # the first 64, before the first loss (at 70)
    consumed.clear()
    with pytest.raises(TransientFailure) as failure:
        list(_guard_fetches(_fetches(300, set(range(300)), consumed), 3, 300))
    assert failure.value.objects == () and len(consumed) == 64


def _web_fetches(n: int, failing: set[int], last: set[int] = frozenset(), refused: bool = False, hosts: int = 9,
                 one_host: range = range(0)):
    """n fetches of web URLs of `hosts` hosts (the inputs in `one_host` all of host 0), the `failing` ones having
    failed transiently (or, with `refused`, refused by our proxy); the `last` ones finish after all others (hosts
    that hang)."""
    for i in [i for i in range(n) if i not in last] + sorted(last):
        url = f"http://host{0 if i in one_host else i % hosts}.example/{i}.jpg"
        bad = i in failing
        f = fetch.Fetched(url, None if bad else b"x", ("download_failed", "503") if bad else None,
                          transient=bad and not refused, refused=bad and refused)
        yield (i, RawItem(f.url, f.data, reject=f.reject)), f


def test_a_units_last_inputs_are_an_outage_only_when_most_of_them_fail_and_the_canaries_fail_again():
    """The input-order rule at a unit's end: 13 of its last 17 failing (9 hosts) is an outage if the canaries (8
    URLs of other hosts fetched fine before that run) fail again; 12 is not one; nor is the same tail when the
    canaries answer (dead links, review s13), nor hosts that hang scattered over the unit (every 16th) though they
    finish last; refusals by our proxy count like transient faults. A partial outage (85% of 40 hosts from input
    900) is seen: the canaries come from before it, not from the hosts it spared, which still answer (review s13b).
    Store files lost at the end are named one by one, as anywhere else, not an outage naming none (review s13:
    --give-up-quarantined then gave up the whole unit)."""
    def run(fetches, n, recheck):
        return [item.source for _, item in _guard_fetches(fetches, 3, n, recheck)]

    down, up = (lambda canaries: len(canaries)), (lambda canaries: 0)
    thirteen = set(range(984, 1000)) - {985, 990, 995}
    with pytest.raises(TransientFailure, match="13 of the last 17 inputs failed"):
        run(_web_fetches(1000, thirteen), 1000, down)
    asked = []
    assert len(run(_web_fetches(1000, thirteen), 1000, lambda canaries: asked.append(canaries) or 0)) == 1000
    assert [int(url.rsplit("/", 1)[1][:-4]) for url in asked[0]] == list(range(982, 974, -1))  # before the run
    assert len(run(_web_fetches(1000, thirteen - {999}), 1000, down)) == 1000
    assert len(run(_web_fetches(1000, thirteen), 1000, lambda canaries: 4)) == 1000  # half failing: not most
    asked.clear()
    run(_web_fetches(1000, thirteen, one_host=range(900, 983)), 1000, lambda canaries: asked.append(canaries) or 0)
    assert len({url.split("/")[2] for url in asked[0]}) == 8  # one a host, however many of one came last
    hanging = set(range(7, 1000, 16))
    assert len(run(_web_fetches(1000, hanging, last=hanging), 1000, down)) == 1000
    with pytest.raises(TransientFailure, match="20 of the last 26 inputs failed"):
        run(_web_fetches(1000, set(range(980, 1000)), refused=True), 1000, down)
    assert len(run(_web_fetches(1000, set(range(980, 1000)), refused=True), 1000, up)) == 1000
    dead_hosts = {f"host{h}.example" for h in range(34)}  # 85% of 40: down from input 900, the other 6 up

    def partial(canaries):  # what fetching them again gives during that outage
        return sum(url.split("/")[2] in dead_hosts for url in canaries)

    with pytest.raises(TransientFailure, match="inputs failed"):
        run(_web_fetches(1000, {i for i in range(900, 1000) if i % 40 < 34}, hosts=40), 1000, partial)
    with pytest.raises(TransientFailure) as failure:
        run(_fetches(1000, set(range(984, 1000)), []), 1000, down)
    assert failure.value.objects == tuple(f"s3://b/{i}.jpg" for i in range(984, 1000))


def test_a_changed_listing_forgets_what_units_failed_on(tmp_path):
    """What each unit failed on is keyed by unit number: once the sources list differently (an interrupted run
    resumed after the bucket gained keys), those numbers name other inputs, and a unit's first failure must not count
    as its second. The plan check drops the record with the rest of the stale work."""
    from types import SimpleNamespace

    from pipeline.ingest.layout import Layout
    from pipeline.ingest.plan import Plan, _check_plan

    layout = Layout(str(tmp_path / "out"))
    run = SimpleNamespace(layout=layout, cfg=SimpleNamespace(storage_options={}))
    empty = np.zeros(0, np.int64)
    plan = Plan((), empty, empty.astype(np.int8), empty.astype(np.int32), empty, empty.astype(np.int32), empty,
                np.zeros((0, 2), np.int64), (), "listed-now")
    (tmp_path / "out/_ingest/plan").mkdir(parents=True)
    (tmp_path / "out/_ingest/plan/plan.json").write_text(json.dumps({"fingerprint": "listed-before"}))
    (tmp_path / "out/_ingest/quarantined.json").write_text(json.dumps({"1": []}))
    _check_plan(run, plan)
    assert not (tmp_path / "out/_ingest/quarantined.json").exists()
    assert json.loads((tmp_path / "out/_ingest/plan/plan.json").read_text())["fingerprint"] == "listed-now"


def test_dead_links_of_many_hosts_together_are_an_outage_until_a_give_up_run_asks_canaries(tmp_path):
    """A URL list whose middle is 200 dead links of 9 hosts (a dump sorted by URL puts them together): most of the
    last 256 fetches failing, of 8+ hosts, is an outage to the window rule, and the unit is quarantined, in every
    run. A --give-up-quarantined run confirms it with canaries (URLs of the hosts that answered last), which answer:
    the 200 are download_failed rejects and the other 200 are kept, not the unit's 400 given up whole."""
    from tests.ingest.test_fetch import _spread

    files = {f"/img/{i}.jpg": _jpeg(i % 200) for i in range(400)}  # those served distinct, none too wide
    with FaultServer(files) as web:
        urls = [_spread(web.url, f"/img/{i}.jpg", i) for i in range(400)]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        for i in range(100, 300):
            web.fail(f"/img/{i}.jpg", ["503"] * 1000)

        def run(**kw) -> dict:
            return run_ingest(_cfg([tmp_path / "urls.txt"], tmp_path / "out", download_threads=8, **kw))

        for _ in range(2):
            report = run()
            assert [q["unit"] for q in report["quarantined"]] == [0] and "outage" not in report["quarantined"][0]
            assert "of the last 256 fetches failed" in report["quarantined"][0]["reason"]
        final = run(give_up_quarantined=True)
    assert final["quarantined"] == [] and final["kept"] == 200
    assert final["rejected_by_reason"] == {"download_failed": 200}
    got = verdicts(tmp_path / "out")
    assert {u for u, v in got.items() if v == "keep"} == set(urls[:100] + urls[300:])


def test_a_web_outage_in_a_give_up_run_still_gives_the_unit_up_whole(tmp_path):
    """The canaries of a give-up run fail in a real outage (every request 503 once it starts): the window rule stops
    the unit early, and it is given up whole, its inputs 'quarantined' rejects, none a download_failed that would
    pass for a dead link."""
    from tests.ingest.test_fetch import _spread

    files = {f"/img/{i}.jpg": _jpeg(i % 200) for i in range(600)}
    with FaultServer(files) as web:
        urls = [_spread(web.url, f"/img/{i}.jpg", i) for i in range(600)]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        web.down_after = 100
        first = run_ingest(_cfg([tmp_path / "urls.txt"], tmp_path / "out", download_threads=8))
        assert [q["unit"] for q in first["quarantined"]] == [0]
        start = web.served
        web.down_after = start + 100  # 100 answer, the canaries among them, then the outage
        final = run_ingest(_cfg([tmp_path / "urls.txt"], tmp_path / "out", download_threads=8,
                                give_up_quarantined=True))
        # Stopped by the window rule once its canaries failed: ~100 + 3 tries of ~160 failing URLs, not 3 of 500.
        assert web.served - start < 1000
    assert final["gave_up_quarantined"] and final["kept"] == 0
    assert final["rejected_by_reason"] == {"quarantined": 600}


def test_a_confirmed_window_asks_canaries_once_per_window_only_of_web_failures_and_not_one_alone():
    """The give-up run's confirmed window rule (confirm=True): a dead run of 2,000 web URLs whose canaries answer
    costs a recheck per 256 fetches (8 of them), not per 64 (32); a store object failing among web URLs that answered
    is an outage at once, canaries or not (web hosts answering say nothing of the store); a unit whose answering
    URLs are of fewer than 4 hosts cannot have its outage cleared by them."""
    asked: list[list[str]] = []

    def answer(urls: list[str]) -> int:  # every canary answers
        asked.append(urls)
        return 0

    dead = set(range(100, 2100))
    got = list(_guard_fetches(_web_fetches(2200, dead), 3, 2200, answer, confirm=True))
    assert len(got) == 2200 and len(asked) == 8 and all(len(urls) == 8 for urls in asked)

    def mixed():
        yield from _web_fetches(100, set())
        for (i, _), f in _fetches(400, set(range(400)), []):
            yield (100 + i, RawItem(f.url, None, reject=f.reject)), f

    asked.clear()
    with pytest.raises(TransientFailure) as failure:
        list(_guard_fetches(mixed(), 3, 500, answer, confirm=True))
    assert failure.value.objects == () and asked == []
    with pytest.raises(TransientFailure, match="of the last 256 fetches failed"):  # answered: host 0 alone
        list(_guard_fetches(_web_fetches(600, set(range(100, 600)), one_host=range(100)), 3, 600, answer,
                            confirm=True))
    assert asked == []
