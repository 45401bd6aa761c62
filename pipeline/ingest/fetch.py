"""Fetch many files or URLs with a pool of threads, in order, with a bounded read-ahead and retries.

Downloading is latency-bound, not CPU-bound: img2dataset runs 16-64 threads per process for the same reason. Here
`threads` requests are in flight while the caller cleans the images already fetched, and at most 2 x threads
results wait in memory. Results come back in input order, so the output does not depend on which request finishes
first.

Outcome of one fetch: bytes, or a reject (reason, detail) for a deterministic fault: a missing file, an HTTP 4xx,
a file over max_bytes. A transient fault (reset, timeout, 5xx, 429, SlowDown) is retried with backoff; if it
persists, a web URL gets the reject "download_failed" (a dead web server is the web's normal state, not ours),
while an object of a store or a local file comes back `lost`: its unit is then quarantined, naming it, and a rerun
retries it (readers.py). With `give_up` (the objects that had failed in an earlier run, rerun under
--give-up-quarantined) such an object that fails again gets the reject "quarantined" instead: only that object
is given up, not the unit's other inputs, nor an object failing for the first time.
"""

from __future__ import annotations

import http.client
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from pipeline.ingest.atomic import url_to_fs
from pipeline.ingest.retry import RetryPolicy, TransientFailure, http_status, retry

HTTP_TIMEOUT_S = 20.0
_USER_AGENT = "canvit-ingest/0.1 (+tools/shard.py)"


@dataclass(frozen=True)
class Fetched:
    url: str
    data: bytes | None
    reject: tuple[str, str] | None = None  # (reason, detail) when data is None
    transient: bool = False  # a fault that outlasted every retry (a web reject, a given-up or a lost object)
    lost: bool = False  # a store object or local file that outlasted its retries: its unit must not be staged
    error: BaseException | None = field(default=None, compare=False)  # a lost object's last error


def is_web(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def fetch_all(urls: Iterable[str], max_bytes: int, storage_options: dict, policy: RetryPolicy,
              threads: int, give_up: frozenset[str] = frozenset()) -> Iterator[Fetched]:
    """Fetched for every URL, in order (a non-web URL that kept failing: lost, or the reject "quarantined" if it is
    in give_up)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        window: deque = deque()
        for url in urls:
            window.append(pool.submit(fetch_one, url, max_bytes, storage_options, policy, give_up))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def fetch_one(url: str, max_bytes: int, storage_options: dict, policy: RetryPolicy,
              give_up: frozenset[str] = frozenset()) -> Fetched:
    try:
        if is_web(url):
            data = retry(lambda: _http_get(url, max_bytes), policy, f"GET {url}")
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
    except Exception as e:  # noqa: BLE001 - permanent by classification: missing, forbidden, 404, bad URL
        status = http_status(e)
        reason = f"http_{status}" if status is not None else "unreadable"
        return Fetched(url, None, (reason, f"{type(e).__name__}: {e}"[:300]))
    return Fetched(url, data)


class _TooLarge(Exception):
    pass


def _http_get(url: str, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
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
    fs, path = url_to_fs(url, storage_options)
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise _TooLarge(f"{size} bytes")
    return fs.cat_file(path)
