"""A web server's X-Robots-Tag opt-out (noai, noimageai, noindex, noimageindex): the image becomes the reject
"opted_out", decided from the headers, for rules addressed to every agent or to ours; --opt-out-directives decides
which directives count, and a run under other directives does not resume the output."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.ingest.config import CleanConfig, IngestConfig
from pipeline.ingest.engine import run_ingest
from pipeline.ingest.opt_out import AGENT, DIRECTIVES, USER_AGENT, opted_out
from pipeline.ingest.sources import IngestError
from tests.ingest.faults import FaultServer
from tests.ingest.helpers import verdicts
from tests.ingest.test_faults import _jpeg
from tools import shard


@pytest.mark.parametrize("values, refused", [
    (["noai"], True),
    (["NoImageAI, nofollow"], True),  # directives are case-insensitive
    (["nofollow", "noimageindex"], True),  # any header line
    ([f"{AGENT}: noindex"], True),
    (["CanVit-Ingest: NoAI"], True),  # agents are case-insensitive too
    (["none"], True),  # Google's shorthand for noindex, nofollow
    (["all"], False),
    (["googlebot: nofollow, canvit-ingest: noai"], True),  # an agent's rules run to the next agent
    (["googlebot: noindex"], False),  # another agent's
    (["googlebot: noindex, noimageai"], False),  # still googlebot's
    (["max-image-preview:large, noindex"], True),  # a directive with a value is not an agent
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], False),
    (["noarchive, nofollow"], False),
    ([], False),
])
def test_x_robots_tag_rules(values, refused):
    assert (opted_out(values, frozenset(DIRECTIVES)) is not None) == refused
    assert opted_out(values, frozenset()) is None


def test_opted_out_urls_are_rejects_named_by_their_header_and_the_flag_decides(tmp_path):
    files = {f"/img/{i}.jpg": _jpeg(i) for i in range(6)}
    files["/img/1.jpg"] += b"\0" * 300_000  # over max_bytes: decided from the headers, it is not too_large_file
    headers = {1: ["noai"], 2: ["googlebot: noindex"], 3: [f"{AGENT}: noimageai"], 4: ["nofollow", "noimageindex"],
               5: ["noarchive"]}
    with FaultServer(files) as web:
        for i, values in headers.items():
            web.headers[f"/img/{i}.jpg"] = [("X-Robots-Tag", v) for v in values]
        urls = [f"{web.url}/img/{i}.jpg" for i in range(6)]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")

        def cfg(out: str, **kw) -> IngestConfig:
            return IngestConfig(sources=(str(tmp_path / "urls.txt"),), output=str(tmp_path / out), workers=1,
                                quiet=True, download_threads=4, clean=CleanConfig(max_bytes=200_000), **kw)

        report = run_ingest(cfg("out"))
        assert web.agents == {USER_AGENT}
        assert all(web.requests[f"/img/{i}.jpg"] == 1 for i in (1, 3, 4))  # deterministic: never retried
        assert report["kept"] == 3 and report["rejected_by_reason"] == {"opted_out": 3}
        assert verdicts(tmp_path / "out") == {urls[0]: "keep", urls[1]: "opted_out", urls[2]: "keep",
                                              urls[3]: "opted_out", urls[4]: "opted_out", urls[5]: "keep"}
        details = {r["source"]: r["detail"] for r in pq.read_table(tmp_path / "out/rejects.parquet").to_pylist()}
        assert details[urls[1]] == "X-Robots-Tag: noai" and details[urls[4]] == "X-Robots-Tag: noimageindex"

        # Other directives would keep other images: the output is not resumed under them.
        with pytest.raises(IngestError, match="--overwrite"):
            run_ingest(cfg("out", opt_out_directives=()))
        everything = run_ingest(cfg("all", opt_out_directives=()))
        assert everything["kept"] == 5 and everything["rejected_by_reason"] == {"too_large_file": 1}
        assert run_ingest(cfg("archive", opt_out_directives=shard.parse_args(
            ["x", "--output", "y", "--opt-out-directives", " NoArchive,noai"]).opt_out_directives))["kept"] == 4


def test_a_directive_that_could_never_match_is_refused():
    assert shard.parse_args(["x", "--output", "y", "--opt-out-directives", ""]).opt_out_directives == ()
    assert shard.parse_args(["x", "--output", "y"]).opt_out_directives == tuple(sorted(DIRECTIVES))
    with pytest.raises(ValueError, match="'no ai'"):
        IngestConfig(sources=("x",), output="y", opt_out_directives=("no ai",))


def test_an_output_begun_before_opt_outs_resumes_only_without_them():
    """The fingerprints the version before these flags (ecc4024) gave these configurations: with opt-outs off (what
    it did), this version gives the same, so a run it began resumes; with the default, another (refused)."""
    old = {("s3://raw/dump",): "cec24abc91f00b9b", ("urls.txt", "laion.parquet"): "8a56308269991f90"}
    for sources, fingerprint in old.items():
        kw = {"dedup": "near", "web_unit_size": 5000} if len(sources) == 2 else {}
        out = "/tmp/x" if len(sources) == 2 else "s3://data/v1"
        assert IngestConfig(sources=sources, output=out, opt_out_directives=(), **kw).fingerprint() == fingerprint
        assert IngestConfig(sources=sources, output=out, **kw).fingerprint() != fingerprint


def test_an_output_the_previous_version_finished_is_complete_one_it_left_is_refused_naming_the_way(tmp_path):
    """An output whose config.json and report.json carry the previous version's fingerprint (that of
    opt_out_directives=(), pinned above): finished, a rerun under the default is a no-op, not "different
    arguments"; left unfinished (no report), it is refused naming --opt-out-directives '', which resumes it."""
    (tmp_path / "dump").mkdir()
    for i in range(3):
        (tmp_path / "dump" / f"{i}.jpg").write_bytes(_jpeg(i))

    def cfg(**kw) -> IngestConfig:
        return IngestConfig(sources=(str(tmp_path / "dump"),), output=str(tmp_path / "out"), workers=1, quiet=True,
                            **kw)

    old = run_ingest(cfg(opt_out_directives=()))
    assert old["kept"] == 3 and old["fingerprint"] == cfg().fingerprint(before_opt_outs=True) != cfg().fingerprint()
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*")}
    assert run_ingest(cfg()) == old
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*")} == shards
    (tmp_path / "out" / "report.json").unlink()  # as if that version had been killed before the end
    with pytest.raises(IngestError, match="before X-Robots-Tag opt-outs .* --opt-out-directives ''"):
        run_ingest(cfg())
    assert run_ingest(cfg(opt_out_directives=()))["kept"] == 3
