"""A text list of URLs is read in blocks (a line cut between two is joined) and written in parts as it is read, so
its size is not bounded by a task's memory; web URLs are kept as written (fsspec would cut one at "::"), schemes
case-insensitive; a line no filesystem takes is a reject of its own, not the end of the listing."""

from __future__ import annotations

from pipeline.ingest import key_ranges, sources
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.engine import run_ingest
from tests.ingest.faults import FaultServer
from tests.ingest.helpers import verdicts
from tests.ingest.test_faults import _jpeg


def test_a_url_list_is_streamed_and_odd_lines_are_rejects_not_failures(tmp_path, monkeypatch):
    files = {"/img/0.jpg": _jpeg(0), "/img/a::b.jpg": _jpeg(1), "/img/2.jpg": _jpeg(2), "/img/3.jpg": _jpeg(3)}
    with FaultServer(files) as web:
        port = web.url.rsplit(":", 1)[1]
        lines = ["# a comment", f"{web.url}/img/0.jpg", f"{web.url}/img/a::b.jpg", "",
                 f"HTTP://127.0.0.1:{port}/img/2.jpg", "gopher://example.com/x.jpg", f"  {web.url}/img/3.jpg  \r"]
        (tmp_path / "urls.txt").write_text("\n".join(lines))  # no newline at the end
        monkeypatch.setattr(sources, "LIST_BLOCK", 7)  # every line cut across blocks
        monkeypatch.setattr(key_ranges, "LIST_CAP", 2)  # three parts of at most 2 rows
        report = run_ingest(IngestConfig(sources=(str(tmp_path / "urls.txt"),), output=str(tmp_path / "out"),
                                         workers=1, quiet=True, download_threads=2))
    assert verdicts(tmp_path / "out") == {
        f"{web.url}/img/0.jpg": "keep", f"{web.url}/img/a::b.jpg": "keep", f"http://127.0.0.1:{port}/img/2.jpg": "keep",
        "gopher://example.com/x.jpg": "unreadable", f"{web.url}/img/3.jpg": "keep"}
    assert report["kept"] == 4


def test_cr_line_ends_a_bom_and_a_list_whose_server_ignores_ranges(tmp_path, monkeypatch):
    files = {f"/img/{i}.jpg": _jpeg(i) for i in range(3)}
    with FaultServer(files) as web:
        urls = [f"{web.url}/img/{i}.jpg" for i in range(3)]
        text = ("\ufeff" + "\r".join(urls) + "\r").encode()  # old Mac line ends, and a byte-order mark
        web.files["/list.txt"] = text  # served whole whatever the range asked
        (tmp_path / "cr.txt").write_bytes(text)
        monkeypatch.setattr(sources, "LIST_BLOCK", 7)
        for source, out in ((str(tmp_path / "cr.txt"), "local"), (f"{web.url}/list.txt", "web")):
            report = run_ingest(IngestConfig(sources=(source,), output=str(tmp_path / out), workers=1, quiet=True,
                                             download_threads=2))
            assert report["kept"] == 3 and verdicts(tmp_path / out) == {u: "keep" for u in urls}, source
