"""Fetch many files or URLs with a pool of threads, in the order they finish, with a bounded read-ahead and retries.

Downloading is latency-bound, not CPU-bound: img2dataset runs 256 threads per process by default for the same
reason. Here `threads` requests are in flight while the caller cleans the images already fetched, up to LOOKAHEAD
results queued and at most WINDOW_BYTES of them in memory. Results come back in the order the fetches finish, each
with its position: the caller puts them back in input order (stage.py), so the output does not depend on which
request finishes first, and a dead host costs one thread its timeouts, not the caller its CPU.

Outcome of one fetch: bytes, or a reject (reason, detail) for a deterministic fault: a missing file, an HTTP 4xx, a
file over max_bytes, a web image whose server opted it out (X-Robots-Tag, opt_out.py). A transient fault (reset,
timeout, 5xx, 429, SlowDown) is retried with backoff (a web URL that timed out, once only: WEB_TIMEOUT_ATTEMPTS); if
it persists, a web URL gets the reject "download_failed" (a dead web server is the web's normal state, not ours),
while an object of a store or a local file comes back `lost`: its unit is then quarantined, naming it, and a rerun
retries it (readers.py). With `give_up` (the objects that had failed in an earlier run, rerun under
--give-up-quarantined) such an object that fails again gets the reject "quarantined" instead: only that object is
given up, not the unit's other inputs, nor an object failing for the first time.
"""

from __future__ import annotations

import http.client
import queue
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from pipeline.ingest.atomic import url_to_fs
from pipeline.ingest.opt_out import DIRECTIVES, USER_AGENT, opted_out
from pipeline.ingest.retry import RetryPolicy, TransientFailure, http_status, is_timeout, is_unanswered, retry

HTTP_TIMEOUT_S = 10.0  # a web URL's timeout per attempt unless configured (--http-timeout): img2dataset's default


@dataclass(frozen=True)
class Fetched:
    url: str
    data: bytes | None
    reject: tuple[str, str] | None = None  # (reason, detail) when data is None
    transient: bool = False  # a fault that outlasted every retry (a web reject, a given-up or a lost object)
    # A web URL's connection refused by a proxy of ours: a permanent reject (not retried: without a proxy, a dead host
    # refusing for ever), but counted by the outage guard like a transient fault: every host refusing at once is
    # that proxy down. Without a proxy a refusal is the host's own, and not counted.
    refused: bool = False
    lost: bool = False  # a store object or local file that outlasted its retries: its unit must not be staged
    error: BaseException | None = field(default=None, compare=False)  # a lost object's last error


def is_web(url: str) -> bool:
    # Schemes are case-insensitive (RFC 3986); the lower-case test first: this runs twice per line of a URL list.
    return url.startswith(WEB_SCHEMES) or url[:8].lower().startswith(WEB_SCHEMES)


WEB_SCHEMES = ("http://", "https://")


def fetch_all(urls: Iterable[str], max_bytes: int, storage_options: dict, policy: RetryPolicy,
              threads: int, give_up: frozenset[str] = frozenset(), http_timeout_s: float = HTTP_TIMEOUT_S,
              opt_outs: frozenset[str] = frozenset(DIRECTIVES)) -> Iterator[tuple[int, Fetched]]:
    """(position in `urls`, Fetched) for every URL, in the order the fetches finish (a non-web URL that kept
    failing: lost, or the reject "quarantined" if it is in give_up). Up to LOOKAHEAD fetches are queued and not yet
    taken, and they start while the bytes fetched and not yet taken stay under WINDOW_BYTES (_Gate).

    Completion order, not input order: a URL that hangs through its retries (a host that accepts and never answers,
    ~1-3% of a web dump; two timeouts and a backoff, ~20 s at the default timeout) holds one thread and one place of
    the look-ahead, and the caller cleans what the other threads fetch meanwhile. In input order the caller waited
    for it with the CPU idle (bench/ingest_stragglers.py). The caller puts its results back in input order."""
    gate = _Gate()
    pool = ThreadPoolExecutor(max_workers=threads)
    finished: queue.SimpleQueue = queue.SimpleQueue()
    pending = 0

    def take() -> tuple[int, Fetched]:
        nonlocal pending
        index, fetched = finished.get().result()  # re-raises a bug in the fetch itself
        pending -= 1
        gate.taken(len(fetched.data or b""))
        return index, fetched

    try:
        for index, url in enumerate(urls):
            if pending >= max(LOOKAHEAD, 2 * threads):
                yield take()
            future = pool.submit(_gated, gate, index, url, max_bytes, storage_options, policy, give_up,
                                 http_timeout_s, opt_outs)
            future.add_done_callback(finished.put)
            pending += 1
        while pending:
            yield take()
    finally:
        gate.stop()  # fetches waiting at the gate return at once
        pool.shutdown(wait=True, cancel_futures=True)


LOOKAHEAD = 256  # fetches queued and not yet taken by the caller (those that hang hold a place each)
WINDOW_BYTES = 128 << 20  # fetched bytes not yet taken by the caller above which no new fetch starts


class _Gate:
    """A fetch starts only while the fetched-not-taken bytes are under WINDOW_BYTES: in memory, at most WINDOW_BYTES
    plus what the running fetches are receiving (threads x an image, ~64 MB at 128 threads; max_bytes each at
    worst), plus what the caller took and holds (readers._guard_fetches: up to 64 items). (No deadlock: bytes over
    the window are fetches that finished, which the caller can take.)
    An outage is the caller's to see (readers._guard_fetches): it stops taking, and closing this generator stops
    every fetch that has not started."""

    def __init__(self) -> None:
        self.bytes = 0
        self.stopped = False
        self.cond = threading.Condition()

    def admit(self) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.stopped or self.bytes < WINDOW_BYTES)
            return not self.stopped

    def fetched(self, fetched: Fetched) -> None:
        with self.cond:
            self.bytes += len(fetched.data or b"")

    def taken(self, n: int) -> None:
        with self.cond:
            self.bytes -= n
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def _gated(gate: _Gate, index: int, url: str, *args) -> tuple[int, Fetched]:
    if not gate.admit():
        return index, Fetched(url, None)  # the caller has stopped: never passed on
    fetched = fetch_one(url, *args)
    gate.fetched(fetched)
    return index, fetched


def fetch_one(url: str, max_bytes: int, storage_options: dict, policy: RetryPolicy,
              give_up: frozenset[str] = frozenset(), http_timeout_s: float = HTTP_TIMEOUT_S,
              opt_outs: frozenset[str] = frozenset(DIRECTIVES)) -> Fetched:
    """`opt_outs`: the X-Robots-Tag directives that make a web image the reject "opted_out" (opt_out.py)."""
    try:
        if is_web(url):
            data = retry(lambda: _http_get(url, max_bytes, http_timeout_s, opt_outs), policy, f"GET {url}",
                         _web_attempts)
        else:
            data = retry(lambda: _fs_get(url, max_bytes, storage_options), policy, f"read {url}")
    except TransientFailure as e:
        if is_web(url):
            return Fetched(url, None, ("download_failed", e.reason), transient=True)
        lost = url not in give_up
        return Fetched(url, None, ("quarantined", e.reason), transient=True, lost=lost,
                       error=(e.__cause__ or e) if lost else None)
    except _TooLarge as e:
        return Fetched(url, None, ("too_large_file", str(e)))
    except _OptedOut as e:
        return Fetched(url, None, ("opted_out", str(e)[:300]))
    except Exception as e:  # noqa: BLE001 - permanent by classification: missing, forbidden, 404, bad URL
        status = http_status(e)
        reason = f"http_{status}" if status is not None else "unreadable"
        return Fetched(url, None, (reason, f"{type(e).__name__}: {e}"[:300]), refused=is_web(url) and _refused(e, url))
    return Fetched(url, data)


# Tries of a web URL whose request timed out: a host silent for a whole timeout is almost always a dead one (img2dataset
# does not retry at all), and each try holds a download thread for the timeout. Resets, 5xx and 429 get --retries.
WEB_TIMEOUT_ATTEMPTS = 2


def _web_attempts(error: BaseException) -> int:
    return WEB_TIMEOUT_ATTEMPTS if is_timeout(error) or is_unanswered(error) else 1 << 30


def _refused(error: BaseException, url: str) -> bool:
    """A refused connection to a proxy that urllib took from the environment (http_proxy, https_proxy, no_proxy)."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if not isinstance(reason, ConnectionRefusedError):
        return False
    parts = urlsplit(url)
    return parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")


class _TooLarge(Exception):
    pass


class _OptedOut(Exception):
    pass


def _http_get(url: str, max_bytes: int, timeout: float, opt_outs: frozenset[str]) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        # Before the body: an opted-out image costs its headers only (a redirect's: those of its last response).
        refusal = opted_out(response.headers.get_all("X-Robots-Tag") or [], opt_outs)
        if refusal is not None:
            raise _OptedOut(f"X-Robots-Tag: {refusal}")
        data = response.read(max_bytes + 1)
        expected = response.headers.get("Content-Length")
    if len(data) > max_bytes:
        raise _TooLarge(f"more than {max_bytes} bytes")
    # read(n) returns what arrived before a dropped connection without complaint: a cut body must be retried,
    # not decoded as a truncated image (which would be a permanent reject).
    if expected is not None and expected.isdigit() and len(data) < int(expected):
        raise http.client.IncompleteRead(data, int(expected) - len(data))
    return data


def _fs_get(url: str, max_bytes: int, storage_options: dict) -> bytes:
    """One request: a ranged read of at most max_bytes + 1 bytes, more being too large. Asking the size first, as this
    did, cost a HEAD per file, and s3fs's whole-object cat_file asks it again itself (to split large objects): three
    requests per loose file, 600M more at 300M loose files, against the store's per-prefix request rate and bill. A
    zero-byte object answers a range with 416 (S3's InvalidRange): only then is its size asked."""
    fs, path = url_to_fs(url, storage_options)
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an empty object's unsatisfiable range
        if not _unsatisfiable_range(e) or fs.size(path) != 0:
            raise
        return b""
    if len(data) > max_bytes:
        raise _TooLarge(f"more than {max_bytes} bytes")
    return data


def _unsatisfiable_range(error: BaseException) -> bool:
    while error is not None:
        if http_status(error) == 416 or "InvalidRange" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
