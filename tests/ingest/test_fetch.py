"""fetch_all against a real loopback HTTP server: a URL that hangs through its retries holds up neither the fetches
behind it nor the caller (results come as they finish); a caller that stops early (an outage) does not wait for the
fetches still queued."""

from __future__ import annotations

import faulthandler
import threading
import time

import pytest

from pipeline.ingest import fetch
from pipeline.ingest.readers import ReadOptions, read_files
from pipeline.ingest.retry import RetryPolicy, TransientFailure
from tests.ingest.faults import FaultServer


# Names of 127.0.0.1, each a web host of its own to the fetch layer: URLs of many hosts on one loopback server.
_LOOPBACK = ("127.0.0.1", "localhost", "127.1", "127.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.00.00.01",
             "127.0.0.01")


def _spread(base: str, path: str, i: int) -> str:
    return f"http://{_LOOPBACK[i % len(_LOOPBACK)]}:{base.rsplit(':', 1)[1]}{path}"


def _images(web: FaultServer, n: int, one_host_from: int | None = None) -> list[str]:
    """/img/0.jpg .. of `web` as URLs of 9 hosts, those from `one_host_from` on of one host."""
    return [f"{web.url}/img/{i}.jpg" if one_host_from is not None and i >= one_host_from else
            _spread(web.url, f"/img/{i}.jpg", i) for i in range(n)]


def _fails_when_the_server_goes_down(files: dict[str, bytes], after: int, opts: ReadOptions, match: str) -> None:
    """A unit of every file, through a server that answers 503 to everything after `after` requests, fails whole."""
    with FaultServer(files) as web:
        web.down_after = after
        with pytest.raises(TransientFailure, match=match):
            list(read_files(_images(web, len(files)), [-1] * len(files), opts))


def _dead(web: FaultServer, paths: range) -> None:
    web.clear()
    for i in paths:
        web.fail(f"/img/{i}.jpg", ["503"] * 10)


@pytest.fixture(autouse=True)
def _watchdog():
    """A fetch_all that deadlocks (a byte-accounting slip) must fail the run with every thread's stack, not hang it."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_a_hanging_url_holds_up_nothing_results_come_as_they_finish():
    files = {f"/img/{i}.jpg": bytes([i]) * 100 for i in range(100)}
    with FaultServer(files, slow_s=3.0) as web:
        web.fail("/img/0.jpg", ["slow", "slow"])  # times out twice: its whole retry chain, ~2 s
        urls = [f"{web.url}/img/{i}.jpg" for i in range(100)]
        got = list(fetch.fetch_all(urls, 1 << 20, {}, RetryPolicy(attempts=2, base_delay_s=0.01), threads=4,
                                   http_timeout_s=1.0))
    # The 99 behind the hanging URL reach the caller while it hangs (in input order they waited for it, and the caller
    # cleaned nothing meanwhile); each result carries its position.
    assert sorted(i for i, _ in got[:99]) == list(range(1, 100)) and got[99][0] == 0
    first = got[99][1]
    assert first.reject is not None and first.reject[0] == "download_failed" and web.requests["/img/0.jpg"] == 2
    assert {i: f.data for i, f in got[:99]} == {i: files[f"/img/{i}.jpg"] for i in range(1, 100)}


def test_fetches_wait_to_start_while_the_caller_holds_a_window_of_bytes(monkeypatch):
    """The look-ahead is bounded by bytes too: no fetch starts while WINDOW_BYTES of results wait for the caller
    (before, only new submissions stopped, and the 256 queued all ran)."""
    monkeypatch.setattr(fetch, "WINDOW_BYTES", 1 << 20)
    files = {f"/img/{i}.jpg": bytes([i]) * (256 << 10) for i in range(100)}
    with FaultServer(files) as web:
        got = fetch.fetch_all([f"{web.url}/img/{i}.jpg" for i in range(100)], 1 << 20, {},
                              RetryPolicy(attempts=2, base_delay_s=0.01), threads=4, http_timeout_s=5.0)
        first = next(got)
        time.sleep(1.0)  # a caller busy cleaning: the fetches behind run until 1 MiB waits, then stop
        with web.lock:
            served = sum(web.requests.values())
        rest = list(got)
    assert served <= 1 + 4 + 4  # the one taken, 1 MiB of 256 KiB results, and the 4 that had started
    assert len(rest) == 99
    assert {i: f.data for i, f in [first, *rest]} == {i: files[f"/img/{i}.jpg"] for i in range(100)}


def test_a_unit_stopped_by_an_outage_drops_its_queued_fetches():
    """300 URLs of 9 hosts that all fail (503) behind one that hangs: results come as they finish, so the outage is
    seen after 64 of them, while the first URL still hangs; then no fetch starts any more and the queued ones are
    dropped (before: the unit ran all its fetches with their retries)."""
    with FaultServer({}, slow_s=3.0) as web:
        web.fail("/img/0.jpg", ["slow", "slow"])
        for i in range(1, 300):
            web.fail(f"/img/{i}.jpg", ["503"] * 10)
        opts = ReadOptions(1 << 20, None, None, {}, RetryPolicy(attempts=3, base_delay_s=0.05), 4, 1.0)
        with pytest.raises(TransientFailure, match="failed transiently"):
            list(read_files([_spread(web.url, f"/img/{i}.jpg", i) for i in range(300)], [-1] * 300, opts))
        with web.lock:
            at_stop = sum(web.requests.values())
        time.sleep(0.5)
        with web.lock:
            later = sum(web.requests.values())
    assert threading.active_count() < 20  # the pool's threads are gone
    assert later == at_stop  # nothing ran on after the stop
    assert at_stop <= 2 + (64 + 4) * 3  # the hanging URL's 2 tries, 64 failed fetches and those running, 3 tries each


def test_a_web_url_that_times_out_is_tried_twice_other_transient_faults_get_every_retry():
    files = {"/slow.jpg": b"s" * 10, "/busy.jpg": b"b" * 10, "/reset.jpg": b"r" * 10}
    with FaultServer(files, slow_s=0.6) as web:
        web.fail("/slow.jpg", ["slow"] * 5)
        web.fail("/busy.jpg", ["503"] * 3)
        web.fail("/reset.jpg", ["reset"] * 3)
        got = list(fetch.fetch_all([f"{web.url}/slow.jpg", f"{web.url}/busy.jpg", f"{web.url}/reset.jpg"], 1 << 20,
                                   {}, RetryPolicy(attempts=5, base_delay_s=0.01), threads=3, http_timeout_s=0.2))
    got = dict(got)
    assert got[0].reject is not None and got[0].reject[0] == "download_failed" and web.requests["/slow.jpg"] == 2
    assert got[1].data == files["/busy.jpg"] and web.requests["/busy.jpg"] == 4
    assert got[2].data == files["/reset.jpg"] and web.requests["/reset.jpg"] == 4


def test_an_outage_late_in_a_long_unit_is_seen_by_the_last_fetches():
    """300 URLs of 9 hosts served, then an outage (the server answers 503 to everything): the outage is judged on the
    last 256 fetches to finish, not the whole unit, so the unit fails (and is retried whole) instead of staging 200
    fine URLs as permanent rejects (review s11: over the whole unit, a 10,000-URL unit's outage halfway was seen only
    after 5,000 more failures). The same 200 failures from one host (a dump sorted by domain) are that host's: its
    URLs are rejects and the unit goes on (review s11b: it quarantined the whole unit)."""
    files = {f"/img/{i}.jpg": bytes([i % 256]) * 100 for i in range(500)}
    opts = ReadOptions(1 << 20, None, None, {}, RetryPolicy(attempts=2, base_delay_s=0.01), 8, 1.0)
    _fails_when_the_server_goes_down(files, 300, opts, "of the last 256 fetches failed")
    with FaultServer(files) as web:
        _dead(web, range(300, 500))
        items = dict(read_files(_images(web, 500, one_host_from=300), [-1] * 500, opts))
    assert sorted(items) == list(range(500))
    assert all(items[i].reject is None for i in range(300))
    assert all(items[i].reject is not None and items[i].reject[0] == "download_failed" for i in range(300, 500))


def test_a_name_that_does_not_exist_is_a_dead_link_a_resolver_that_cannot_answer_is_retried():
    """A dead domain (EAI_NONAME) or a refused connection is a permanent reject; a resolver failing for now
    (EAI_AGAIN: our DNS down) or an unreachable network is transient, so such an outage stops the unit instead of
    rejecting every URL of it (reviews s11, s11b). The errors are faked: what this machine's resolver and network
    answer depends on its setup."""
    import errno
    import socket
    import urllib.error

    from pipeline.ingest.retry import is_transient

    assert is_transient(urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name")))
    assert not is_transient(urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known")))
    assert is_transient(urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable")))
    assert not is_transient(urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")))
    # An https URL through our proxy: its answer to the CONNECT is a status like a server's (review s13b: a proxy
    # answering 503 made every https URL a permanent reject).
    assert is_transient(urllib.error.URLError(OSError("Tunnel connection failed: 503 Service Unavailable")))
    assert not is_transient(urllib.error.URLError(OSError("Tunnel connection failed: 403 Forbidden")))
    # Like a timeout, two tries of a web URL, not --retries (a dead domain's lame name servers answer EAI_AGAIN too).
    assert fetch._web_attempts(urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "x"))) == 2


def test_an_outage_in_a_units_last_inputs_is_seen_and_dead_links_there_are_not_one():
    """An outage in a unit's last ~30 inputs (the server answers 503 to everything after 270 requests) is ~30 of the
    last 256 fetches to finish, too few for that window: at the unit's end its URLs are judged in input order, and
    the canaries (URLs of 8 other hosts fetched fine before that run) fail too, so the unit fails and is retried
    whole instead of staging ~30 fine URLs as permanent rejects (the known limit before). A tail of 16 dead links of
    9 hosts while the server is up is theirs: the 8 canaries answer, and the 16 are rejects (review s13: without the
    canaries such a unit failed whole in every run). The same failures from one host are that host's."""
    files = {f"/img/{i}.jpg": bytes([i % 256]) * 100 for i in range(300)}
    opts = ReadOptions(1 << 20, None, None, {}, RetryPolicy(attempts=2, base_delay_s=0.01), 8, 1.0)
    _fails_when_the_server_goes_down(files, 270, opts, "of the last [0-9]+ inputs failed")
    with FaultServer(files) as web:
        _dead(web, range(284, 300))
        items = dict(read_files(_images(web, 300), [-1] * 300, opts))
        fetched_again = [i for i in range(284) if web.requests[f"/img/{i}.jpg"] == 2]
        _dead(web, range(284, 300))
        one_host = dict(read_files(_images(web, 300, one_host_from=284), [-1] * 300, opts))
    for got in (items, one_host):
        assert sorted(got) == list(range(300)) and all(got[i].reject is None for i in range(284))
        assert all(got[i].reject is not None and got[i].reject[0] == "download_failed" for i in range(284, 300))
    assert len(fetched_again) == 8 and len({i % len(_LOOPBACK) for i in fetched_again}) == 8  # one a host


def test_refused_connections_are_dead_links_unless_our_proxy_refuses(monkeypatch):
    """A refused connection is a dead link: a permanent reject, not retried, and without a proxy not counted by the
    outage rules (many hosts refusing is many dead hosts). Through a proxy of ours that is down, every URL is refused:
    that is an outage, so the unit fails and is retried whole instead of rejecting every URL of it (the known limit
    before)."""
    import urllib.request

    from tools.local_s3 import free_port

    dead = free_port()  # nothing listens: every connection is refused at once
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                 "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener reads the proxies once, when built
    opts = ReadOptions(1 << 20, None, None, {}, RetryPolicy(attempts=3, base_delay_s=0.01), 8, 1.0)
    urls = [f"http://{_LOOPBACK[i % len(_LOOPBACK)]}:{dead}/img/{i}.jpg" for i in range(100)]
    items = dict(read_files(urls, [-1] * 100, opts))
    assert len(items) == 100 and all(item.reject[0] == "unreadable" and "refused" in item.reject[1]
                                     for item in items.values())
    with FaultServer({f"/img/{i}.jpg": b"x" * 100 for i in range(100)}) as web:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead}")
        monkeypatch.setattr(urllib.request, "_opener", None)
        with pytest.raises(TransientFailure, match="64 of the last 64 fetches failed"):
            list(read_files([_spread(web.url, f"/img/{i}.jpg", i) for i in range(100)], [-1] * 100, opts))
        assert sum(web.requests.values()) == 0  # refused by the proxy, never reached


def test_a_loose_store_file_is_one_ranged_read(s3_server, s3_bucket):
    """A file on object storage costs one request, a GET of at most max_bytes + 1 bytes (before: a HEAD for the size,
    then s3fs's whole-object read asked the size again: three requests a file, 600M more at 300M loose files). A
    file over max_bytes is too large from the bytes read; a zero-byte object, which answers a range with 416, is
    read as empty (then its size is asked: two requests); a missing one is unreadable, not retried."""
    import fsspec

    bucket = s3_bucket.removeprefix("s3://")
    files = {"img.jpg": b"\xff\xd8" + bytes(range(256)) * 4, "big.jpg": bytes(5000), "empty.jpg": b""}
    raw = fsspec.filesystem("s3")
    for name, data in files.items():
        raw.pipe(f"{bucket}/{name}", data)
    policy = RetryPolicy(attempts=3, base_delay_s=0.01)
    with FaultServer(upstream=s3_server.endpoint_url) as proxy:
        so = {"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True,
              "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
        got = {name: fetch.fetch_one(f"{s3_bucket}/{name}", 4096, so, policy) for name in (*files, "gone.jpg")}
        assert got["img.jpg"].data == files["img.jpg"] and got["img.jpg"].reject is None
        assert got["big.jpg"].data is None and got["big.jpg"].reject == ("too_large_file", "more than 4096 bytes")
        assert got["empty.jpg"].data == b"" and got["empty.jpg"].reject is None
        assert got["gone.jpg"].data is None and got["gone.jpg"].reject[0] in ("unreadable", "http_404")
        assert {p.rsplit("/", 1)[1]: n for p, n in proxy.requests.items()} == {
            "img.jpg": 1, "big.jpg": 1, "empty.jpg": 2, "gone.jpg": 1}
