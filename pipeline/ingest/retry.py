"""Transient faults (connection resets, timeouts, S3 5xx and SlowDown, HTTP 5xx/429) retried with backoff.

What is transient is decided by the exception's type, never by the data: a fault of the network or of the store
may go away on the next attempt, a corrupt byte will not. Deterministic faults (a missing file, a 403, an archive
or parquet file that does not parse, an image that does not decode) are not retried: they become rejects.
A transient fault that outlasts every attempt raises TransientFailure; the unit it happened in is then quarantined
(not staged, reported, retried by a rerun) rather than rejected, so a bad minute of the network loses no data.
"""

from __future__ import annotations

import errno
import http.client
import random
import re
import socket
import time
import urllib.error
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")

# OSError subclasses that say something about the object, not the connection: retrying cannot help.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EINVAL}


class TransientFailure(Exception):
    """A transient fault that persisted through every attempt; `reason` names it for the quarantine list."""

    def __init__(self, what: str, attempts: int, error: BaseException, objects: tuple[str, ...] = ()):
        super().__init__(f"{what}: {attempts} attempts, last {type(error).__name__}: {error}"[:500])
        self.reason = f"{type(error).__name__}: {error}"[:300]
        # The objects (loose files) that outlasted their retries, when the fault is theirs and not the unit's:
        # --give-up-quarantined gives up exactly these if they fail again in a later run (engine.py).
        self.objects = objects


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per read, the first included
    base_delay_s: float = 0.5  # first backoff; doubles per attempt, with full jitter, capped at max_delay_s
    max_delay_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))


def is_timeout(error: BaseException) -> bool:
    """A connect or read that timed out (urllib wraps a connect timeout in URLError)."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    return isinstance(error, (TimeoutError, socket.timeout))


def is_unanswered(error: BaseException) -> bool:
    """No answer, as opposed to a refusal: a resolver that could not answer for now (EAI_AGAIN: ours failing, or a
    dead domain's lame servers) or a network we cannot reach (ENETUNREACH). Transient, so that our DNS or network
    failing is seen as an outage; like a timeout, a web URL gets two tries of it (fetch.WEB_TIMEOUT_ATTEMPTS)."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return (isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_AGAIN) or \
        (isinstance(reason, OSError) and not isinstance(reason, socket.gaierror) and reason.errno == errno.ENETUNREACH)


def http_status(error: BaseException) -> int | None:
    """The HTTP status an exception carries (urllib's HTTPError, aiohttp's ClientResponseError), or None."""
    for name in ("code", "status"):
        value = getattr(error, name, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def is_transient(error: BaseException) -> bool:
    status = http_status(error)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(error, TransientFailure):
        return False  # already retried where it happened: retrying around it again would multiply the attempts
    if isinstance(error, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(error, (TimeoutError, socket.timeout, ConnectionError, http.client.IncompleteRead,
                          http.client.RemoteDisconnected)):
        return True
    if isinstance(error, urllib.error.URLError):
        tunnel = _TUNNEL.match(str(error.reason))
        if tunnel:  # our proxy's answer to an https CONNECT: its status, as a server's (review s13b)
            status = int(tunnel.group(1))
            return status >= 500 or status in (408, 429)
        # A name that does not exist and a refused connection are how dead links look: permanent for that URL (the
        # outage guard counts refusals through a proxy: readers._guard_fetches). No answer at all (below) is not: it
        # is how our own resolver or network failing looks too.
        return isinstance(error.reason, (TimeoutError, socket.timeout, ConnectionResetError)) or is_unanswered(error)
    if isinstance(error, OSError):
        # s3fs maps 5xx / SlowDown to OSError(EBUSY / EREMOTEIO) and unknown service errors to a bare OSError.
        return error.errno not in _PERMANENT_ERRNOS
    return _is_client_library_transient(error)


# http.client's error when a proxy refuses an https tunnel: "Tunnel connection failed: 503 Service Unavailable".
_TUNNEL = re.compile(r"Tunnel connection failed: (\d{3})\b")


def _is_client_library_transient(error: BaseException) -> bool:
    """aiohttp / botocore connection-level errors, matched by module so neither library must be importable."""
    module = type(error).__module__ or ""
    if module.startswith("aiohttp"):
        return True  # ClientResponseError was handled by its status above; the rest are connection faults
    if module.startswith("botocore"):
        return any(n in type(error).__name__ for n in ("Connection", "Timeout", "HTTPClientError", "ReadTimeout"))
    return False


def retry(fn: Callable[[], T], policy: RetryPolicy, what: str,
          attempts_for: Callable[[BaseException], int] | None = None) -> T:
    """fn() with up to policy.attempts tries on transient faults (fewer for a fault that attempts_for(fault) gives
    fewer); a permanent fault is raised at once."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, never swallowed
            if not is_transient(e):
                raise
            limit = policy.attempts if attempts_for is None else min(policy.attempts, attempts_for(e))
            if attempt >= limit - 1:
                raise TransientFailure(what, attempt + 1, e) from e
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Retried:
    """A phase's task function, the whole task retried on a transient fault. Every task writes its outputs whole
    (temp name + rename, or one upload) before its done mark, so running it again is safe. Map, reduce, resolve and
    shard make most of a run's requests after staging (at 300M images ~3.3M part reads each for reduce and resolve,
    from ~1,280 tasks under one prefix: where S3 answers SlowDown), and had no retry but s3fs's own (~2 s of
    backoff): one SlowDown failed the task, and the run stopped after its phase (review s16a)."""

    fn: Callable
    policy: RetryPolicy
    phase: str

    def __call__(self, task):
        return retry(lambda: self.fn(task), self.policy, f"{self.phase} task")
