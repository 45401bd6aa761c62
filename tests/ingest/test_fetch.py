"""fetch_all against a real loopback HTTP server: a URL that hangs through its retries holds up only the caller, not
the fetches behind it; a caller that stops early (an outage) does not wait for the fetches still queued."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.ingest import fetch
from pipeline.ingest.readers import ReadOptions, read_files
from pipeline.ingest.retry import RetryPolicy, TransientFailure
from tests.ingest.faults import FaultServer


def test_a_hanging_url_does_not_hold_up_the_fetches_behind_it():
    files = {f"/img/{i}.jpg": bytes([i]) * 100 for i in range(100)}
    with FaultServer(files, slow_s=1.0) as web:
        web.fail("/img/0.jpg", ["slow", "slow"])  # times out twice: its whole retry chain, ~0.6 s
        urls = [f"{web.url}/img/{i}.jpg" for i in range(100)]
        got = fetch.fetch_all(urls, 1 << 20, {}, RetryPolicy(attempts=2, base_delay_s=0.01), threads=4,
                              http_timeout_s=0.3)
        first = next(got)
        with web.lock:
            served_meanwhile = sum(n for path, n in web.requests.items() if path != "/img/0.jpg")
        rest = list(got)
    assert first.reject is not None and first.reject[0] == "download_failed" and web.requests["/img/0.jpg"] == 2
    # While the caller waited for the first URL, the other 3 threads fetched the 99 behind it (LOOKAHEAD ahead):
    # with 2 x threads ahead, only 8 would have been.
    assert served_meanwhile == 99
    assert [f.data for f in rest] == [files[f"/img/{i}.jpg"] for i in range(1, 100)]


def test_a_unit_stopped_by_an_outage_drops_its_queued_fetches():
    """300 URLs that all fail (503): the outage check stops the unit after 64; the fetches queued ahead of it are
    dropped, only the ones running finish their retries (before, a look-ahead of 256 would have run them all)."""
    with FaultServer({}) as web:
        for i in range(300):
            web.fail(f"/img/{i}.jpg", ["503"] * 10)
        opts = ReadOptions(1 << 20, None, None, {}, RetryPolicy(attempts=3, base_delay_s=0.05), 4, 1.0)
        with pytest.raises(TransientFailure, match="failed transiently"):
            list(read_files([f"{web.url}/img/{i}.jpg" for i in range(300)], [-1] * 300, opts))
        with web.lock:
            at_stop = sum(web.requests.values())
        time.sleep(0.5)
        with web.lock:
            later = sum(web.requests.values())
    assert threading.active_count() < 20  # the pool's threads are gone
    assert later == at_stop  # nothing ran on after the stop
    assert at_stop < 300 * 3 / 2  # far from every queued URL's 3 attempts


def test_a_web_url_that_times_out_is_tried_twice_other_transient_faults_get_every_retry():
    files = {"/slow.jpg": b"s" * 10, "/busy.jpg": b"b" * 10, "/reset.jpg": b"r" * 10}
    with FaultServer(files, slow_s=0.6) as web:
        web.fail("/slow.jpg", ["slow"] * 5)
        web.fail("/busy.jpg", ["503"] * 3)
        web.fail("/reset.jpg", ["reset"] * 3)
        got = list(fetch.fetch_all([f"{web.url}/slow.jpg", f"{web.url}/busy.jpg", f"{web.url}/reset.jpg"], 1 << 20,
                                   {}, RetryPolicy(attempts=5, base_delay_s=0.01), threads=3, http_timeout_s=0.2))
    assert got[0].reject is not None and got[0].reject[0] == "download_failed" and web.requests["/slow.jpg"] == 2
    assert got[1].data == files["/busy.jpg"] and web.requests["/busy.jpg"] == 4
    assert got[2].data == files["/reset.jpg"] and web.requests["/reset.jpg"] == 4
