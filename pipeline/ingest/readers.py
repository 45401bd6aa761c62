"""Read the raw inputs of one unit as a stream of (position in the unit, RawItem); bad content never raises.

Loose files and URLs are fetched by a pool of threads (fetch.py) and come in the order their fetches finish, so a
host that never answers holds up no other input; everything else comes in input order. Archives are read as streams
(tar: `r|*`, one pass; zip: through the seekable fsspec file, member by member); nothing is extracted to disk and
member names are only used as identities, so `../x` or `/etc/x` members cannot write anywhere. Members are grouped
by WebDataset key (the path up to the first dot of the basename; consecutive members): each image member is one
input, and the group's .txt (caption), .json (source metadata) and .cls (label) members travel with it, which is how
img2dataset, LAION and DataComp dumps carry captions. A group with no image is one "no_image" reject.

Parquet files carry either image bytes (a binary column) or URLs to download (a url column and no image column:
the LAION / DataComp metadata layout), each row with an optional id, caption and label, and the columns named by
--keep-columns (LAION's NSFW, similarity, LICENSE, ...), which go into the sample's JSON under "source_meta" as
img2dataset's --save_additional_columns does (null where a file lacks one: dumps drift in schema).

What is a reject and what is a fault: content that does not parse (a corrupt archive or parquet file) is a reject,
deterministic, and a rerun gives the same; an I/O error is a fault of the store or the network, and propagates
(after the fetch layer's retries) so the unit is retried whole, then quarantined.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import posixpath
import tarfile
import zipfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import url_to_fs
from pipeline.ingest.fetch import Fetched, fetch_all, fetch_one, is_web
from pipeline.ingest.opt_out import DIRECTIVES
from pipeline.ingest.retry import RetryPolicy, TransientFailure

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm")
_IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "image_bytes", "bytes", "data")
_URL_COLUMNS = ("url", "image_url", "img_url", "URL")
_ID_COLUMNS = ("id", "key", "uid", "image_id")
_CAPTION_COLUMNS = ("caption", "text", "txt", "TEXT")
_LABEL_COLUMNS = ("label", "cls", "class", "target")
# Content errors of a container: the bytes are what they are, a rerun reads the same.
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, pa.ArrowInvalid, KeyError, ValueError)


@dataclass(frozen=True)
class RawItem:
    source: str  # stable identity: URL, "ARCHIVE::MEMBER" or "PARQUET#id=..."/"PARQUET#row=N"
    data: bytes | None  # None when `reject` is set
    label: int = -1  # -1 = unlabelled
    caption: str | None = None
    reject: tuple[str, str] | None = None  # (reason, detail)
    meta: dict | None = field(default=None, compare=False)  # a WebDataset sample's .json, carried into the output


@dataclass(frozen=True)
class ReadOptions:
    max_bytes: int
    image_column: str | None
    label_column: str | None
    storage_options: dict
    policy: RetryPolicy
    threads: int  # concurrent fetches of loose files / URLs per task
    http_timeout_s: float  # a web URL's timeout per attempt
    opt_outs: frozenset[str] = frozenset(DIRECTIVES)  # X-Robots-Tag directives that make a web image a reject
    keep_columns: tuple[str, ...] = ()  # parquet columns carried into each sample's JSON (source_meta)
    hash_check: tuple[str, str] | None = None  # (parquet column, hashlib algorithm) the bytes must match
    # A --give-up-quarantined run's unit that failed whole before: an outage the window rule sees is confirmed by
    # canaries first (_guard_fetches), so that a run of dead links is not given up with the unit's live URLs.
    confirm_outages: bool = False
    # Loose files (URLs) that failed their retries in an earlier run as well: if they fail again they are the
    # reject "quarantined" instead of failing the unit (--give-up-quarantined, engine.py).
    give_up: frozenset[str] = frozenset()


Item = tuple[int, RawItem]  # (position in the unit's input order, the input)


def read_files(urls: list[str], labels: list[int], opts: ReadOptions) -> Iterator[Item]:
    """Loose files or URLs (a listed folder or a text list), fetched ahead by threads, as they arrive."""
    return _fetched(urls, opts, lambda i, f: RawItem(f.url, f.data, labels[i], reject=f.reject))


def _fetched(urls: list[str], opts: ReadOptions, item_of: Callable[[int, Fetched], RawItem]) -> Iterator[Item]:
    """item_of(position, fetched) for every URL as its fetch finishes, through _guard_fetches."""
    fetched = fetch_all(urls, opts.max_bytes, opts.storage_options, opts.policy, opts.threads, opts.give_up,
                        opts.http_timeout_s, opts.opt_outs)
    try:
        yield from _guard_fetches((((i, item_of(i, f)), f) for i, f in fetched), opts.policy.attempts, len(urls),
                                  lambda canaries: _failing_again(canaries, opts), opts.confirm_outages)
    finally:
        fetched.close()  # a unit stopped early (an outage) drops its queued fetches now, not when collected


def _failing_again(urls: list[str], opts: ReadOptions) -> int:
    """How many of `urls` (each fetched fine earlier in the unit) fail now, fetched at once with every retry. No
    opt-out is honoured: a canary asks whether its host answers, not whether its image may be kept."""
    with ThreadPoolExecutor(len(urls)) as pool:
        return sum(f.data is None for f in pool.map(
            lambda url: fetch_one(url, opts.max_bytes, opts.storage_options, opts.policy, frozenset(),
                                  opts.http_timeout_s, frozenset()), urls))


def read_archive(url: str, opts: ReadOptions) -> Iterator[Item]:
    reader = _zip_members if url.lower().endswith(".zip") else _tar_members
    count = 0
    try:
        for count, item in enumerate(_group_samples(url, reader(url, opts)), 1):
            yield count - 1, item
    except _CORRUPT as e:  # a corrupt archive ends its stream; what was read so far stays
        yield count, RawItem(f"{url}::", None, reject=("corrupt_archive", f"{type(e).__name__}: {e}"))


def read_parquet(url: str, opts: ReadOptions, lo: int = -1, hi: int = -1) -> Iterator[Item]:
    """Rows [lo, hi) of a parquet file (-1, -1: all): a unit is a run of rows, so one big file spreads over tasks."""
    fs, path = url_to_fs(url, opts.storage_options)
    end = 0  # after every row passed on so far
    try:
        with fs.open(path, "rb") as f:
            for i, item in _parquet_rows(url, pq.ParquetFile(f), opts, lo, hi):
                end = max(end, i + 1)
                yield i, item
    except _CORRUPT as e:
        yield end, RawItem(f"{url}#", None, reject=("corrupt_parquet", f"{type(e).__name__}: {e}"))


def _guard_fetches(items: Iterable[tuple[Item, Fetched]], attempts: int, count: int,
                   recheck: Callable[[list[str]], int] | None = None, confirm: bool = False) -> Iterator[Item]:
    """Pass the `count` fetched items through until one is lost (a store object or local file that outlasted its
    retries). Then the unit will not be staged: nothing more is passed on (nothing more cleaned), but the rest of the
    unit is still fetched, so that the TransientFailure raised at the end names every file of the unit that failed,
    and --give-up-quarantined gives up exactly those if they fail again in a later run.
    If most of the last OUTAGE_WINDOW fetches to finish failed transiently (web or store: checked every 64 and at the
    end), the fault is ours or the store's (network, a proxy, an outage), not the objects': raise at once, naming
    none, so the unit is retried whole (and only given up whole, if a later run fails it whole again). Unless those
    failures are web URLs of fewer than OUTAGE_HOSTS hosts: a host that fails or throttles (a dump sorted by domain
    puts hundreds of its URLs together) is that host's fault, and its URLs become rejects, not the whole unit's
    quarantine (review s11b). The window, not the whole unit: an outage halfway through a 10,000-URL unit would
    otherwise be seen only after 5,000 more failures, each a permanent download_failed reject of a URL that was fine
    (review s11); what the unit passed on before the outage was seen goes with the attempt (the unit is quarantined,
    and a rerun stages it whole). An outage that starts in a unit's last ~128 fetches is too few failures for that
    window, so at the end its web URLs are also judged in input order, an outage so found confirmed by fetching
    canaries again (`recheck`, _check_late_outage); only one in its last ~12 inputs is not seen, and those become
    rejects.
    With `confirm` (a --give-up-quarantined run's unit that failed whole before), the window rule's outage is
    confirmed the same way when every failure in the window is a web URL's: URLs of OUTAGE_CANARIES distinct hosts
    that answered last (at least OUTAGE_CANARIES // 2 of them) are fetched again, and if most answer, the failures
    are dead links (a dump sorted by URL can put 128 of them, of 8 hosts, together: an outage to the window rule in
    every run), their URLs rejects rather than the unit's 10,000 given up whole; that verdict holds until the window
    has turned over (OUTAGE_WINDOW more fetches), so a long dead run costs a recheck per 256 fetches, not per 64.
    The canaries may be hosts an outage spared, so a partial outage's URLs become rejects too: what that run was
    asked to do with what fails; without canaries that answer, the unit fails whole and is given up whole, as
    before. A store object failing in the window is never cleared by web canaries."""
    # The last fetches to finish: None if it did not fail transiently, else its web host ("" a store object).
    recent: deque[str | None] = deque(maxlen=OUTAGE_WINDOW)
    failing: dict[int, str] = {}  # position in input order -> host, of every web URL that failed so
    fine: dict[int, str] = {}  # position in input order -> URL, of every web URL fetched fine (the canaries' pool)
    seen = 0
    cleared = -OUTAGE_WINDOW  # `seen` when canaries last answered (confirm): no recheck until the window turns over
    buffered: list[Item] = []
    lost: list[Fetched] = []

    def check() -> None:
        nonlocal cleared
        if not _is_outage(recent):
            return
        if confirm and recheck is not None and seen - cleared < OUTAGE_WINDOW:
            return
        if confirm and recheck is not None and _canaries_answer(recent, fine, recheck):
            cleared = seen
            return
        raise _outage(sum(host is not None for host in recent), len(recent), "fetches")

    for item, fetched in items:
        seen += 1
        host = _failing_host(fetched)
        recent.append(host)
        if host:
            failing[item[0]] = host
        elif fetched.data is not None and is_web(fetched.url):
            fine[item[0]] = fetched.url
        if fetched.lost:
            lost.append(fetched)
            buffered.clear()
        elif not lost:
            buffered.append(item)
        if seen % 64 == 0:
            check()
            yield from buffered
            buffered.clear()
    check()
    if seen != count or any(not 0 <= i < count for i in (*failing, *fine)):
        raise AssertionError(f"{seen} fetches, positions outside 0-{count - 1}, of {count} inputs")
    _check_late_outage(failing, fine, count, recheck)
    if lost:
        more = f" and {len(lost) - 1} other file(s)" if len(lost) > 1 else ""
        raise TransientFailure(f"read {lost[0].url}{more}", attempts, lost[-1].error or ConnectionError(),
                               objects=tuple(f.url for f in lost))  # not most of the last fetches: the guard above
    yield from buffered


OUTAGE_WINDOW = 256  # the last fetches to finish that _guard_fetches looks at for an outage
OUTAGE_HOSTS = 8  # web hosts that must be failing for most failures of web URLs to be an outage
# At a unit's end, the fewest last inputs whose failing (more than 3/4 of them) may be an outage. Dead hosts alone
# do that too, at a unit's end, and again in every rerun (review s13 simulated 4e-4 to 8e-3 a unit where 20-30% of
# the hosts are dead and a host's URLs come together): the canaries tell them apart.
OUTAGE_TAIL = 16
OUTAGE_CANARIES = 8  # URLs of distinct hosts fetched fine before the tail, fetched again to confirm a late outage


def _failing_host(fetched: Fetched) -> str | None:
    """The web host of a fetch that failed transiently ("" a store object lost), or None. A web URL's refused
    connection counts when it went through a proxy of ours (every host refusing at once is that proxy down); a given-
    up store object failing again (the "quarantined" reject) never does: its unit chose to go on without it."""
    if is_web(fetched.url):
        return (urlsplit(fetched.url).hostname or "?") if fetched.transient or fetched.refused else None
    return "" if fetched.lost else None


def _is_outage(recent: deque[str | None]) -> bool:
    """Most of the last fetches failed transiently, not web URLs of a few hosts."""
    failures = [host for host in recent if host is not None]
    return len(recent) >= 8 and len(failures) * 2 > len(recent) and _not_a_few_hosts(failures)


def _canaries_answer(recent: deque[str | None], fine: dict[int, str], recheck: Callable[[list[str]], int]) -> bool:
    """Whether most of the URLs of the OUTAGE_CANARIES distinct hosts that answered last (fine is in the order
    fetches finished) answer again; False when a store object is among the window's failures, or fewer than half
    that many hosts answered before (one canary would decide alone)."""
    if "" in recent:
        return False
    canaries = _canaries(reversed(fine.values()))
    return len(canaries) >= OUTAGE_CANARIES // 2 and recheck(canaries) * 2 <= len(canaries)


def _canaries(urls: Iterable[str]) -> list[str]:
    """The first URL of each of the first OUTAGE_CANARIES distinct hosts among `urls`."""
    canaries: dict[str, str] = {}  # host -> URL
    for url in urls:
        canaries.setdefault(urlsplit(url).hostname or "?", url)
        if len(canaries) == OUTAGE_CANARIES:
            break
    return list(canaries.values())


def _check_late_outage(failing: dict[int, str], fine: dict[int, str], count: int,
                       recheck: Callable[[list[str]], int] | None) -> None:
    """At a unit's end: more than 3/4 of its last n >= OUTAGE_TAIL inputs (n up to OUTAGE_WINDOW) are web URLs that
    failed transiently, not from a few hosts, and most canaries fail when fetched again. Fetches start in input order
    and an outage fails every one that starts after it began, so in input order it is a run at the end, however its
    failures finished among the rest; in the order fetches finish it is not: URLs whose hosts hang finish last
    whatever their place, and would look like one. Dead hosts at the end look like one too, run after run (review
    s13), hence the canaries: the URLs of up to OUTAGE_CANARIES distinct hosts fetched fine last before that run, in
    input order, so from before an outage began (the hosts that answered since are the ones it spared: review s13b).
    No canaries (nothing before the run answered): not an outage here; the window rule has judged that unit. Store
    objects are not judged here: a lost one is named."""
    tail: list[str] = []
    late = None  # (failed, n) of the longest such run
    for n, position in enumerate(range(count - 1, max(count - OUTAGE_WINDOW, 0) - 1, -1), 1):
        if position in failing:
            tail.append(failing[position])
        if n >= OUTAGE_TAIL and len(tail) * 4 > n * 3 and _not_a_few_hosts(tail):
            late = (len(tail), n)
    if late is None:
        return
    canaries = _canaries(fine[p] for p in range(count - late[1] - 1, -1, -1) if p in fine)
    if canaries and (recheck is None or recheck(canaries) * 2 > len(canaries)):
        raise _outage(*late, "inputs")


def _not_a_few_hosts(failures: list[str]) -> bool:
    """False when most failures are web URLs of fewer than OUTAGE_HOSTS hosts: theirs, not ours."""
    web = [host for host in failures if host]
    return not (web and len(web) * 2 > len(failures) and len(set(web)) < OUTAGE_HOSTS)


def _outage(failed: int, seen: int, what: str) -> TransientFailure:
    return TransientFailure(f"fetches ({failed} of the last {seen} {what} failed)", seen,
                            ConnectionError(f"{failed} of the last {seen} {what} failed transiently"))


def _tar_members(url: str, opts: ReadOptions) -> Iterator[tuple[str, bytes | None, tuple[str, str] | None]]:
    fs, path = url_to_fs(url, opts.storage_options)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isdir():
                continue
            if not member.isfile():
                yield member.name, None, ("not_a_regular_file", f"tar type {member.type!r}")
            elif member.size > opts.max_bytes:
                yield member.name, None, ("too_large_file", f"{member.size} bytes")
            else:
                yield member.name, tar.extractfile(member).read(), None


def _zip_members(url: str, opts: ReadOptions) -> Iterator[tuple[str, bytes | None, tuple[str, str] | None]]:
    fs, path = url_to_fs(url, opts.storage_options)
    with fs.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            if info.file_size > opts.max_bytes:
                yield info.filename, None, ("too_large_file", f"{info.file_size} bytes")
                continue
            try:
                with archive.open(info) as member:
                    data = member.read(opts.max_bytes + 1)  # the declared size can lie: bound what a bomb inflates to
            except (RuntimeError, NotImplementedError, *_CORRUPT) as e:  # encrypted, bad CRC, unknown compression
                yield info.filename, None, ("unreadable", f"{type(e).__name__}: {e}")
                continue
            if len(data) > opts.max_bytes:
                yield info.filename, None, ("too_large_file", "inflates past max_bytes")
            else:
                yield info.filename, data, None


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: 'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg')."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower() if dot else ""


def _group_samples(url: str, members: Iterator[tuple[str, bytes | None, tuple[str, str] | None]]
                   ) -> Iterator[RawItem]:
    group: list[tuple[str, str, bytes | None, tuple[str, str] | None]] = []
    key = None
    try:
        for name, data, reject in members:
            k, ext = _split_key(name)
            if group and k != key:
                yield from _sample_items(url, key, group)
                group = []
            key = k
            group.append((name, ext, data, reject))
    except _CORRUPT:
        if group:  # the members read before the corruption are kept
            yield from _sample_items(url, key, group)
        raise
    if group:
        yield from _sample_items(url, key, group)


def _sample_items(url: str, key: str, group: list) -> Iterator[RawItem]:
    images = [(n, d, r) for n, ext, d, r in group if ext.rsplit(".", 1)[-1] in IMAGE_EXTS]
    sides = {ext: d for _n, ext, d, r in group if r is None and ext.rsplit(".", 1)[-1] not in IMAGE_EXTS}
    if not images:
        if len(group) == 1 and group[0][3] is not None:  # a lone bad member keeps its own reason
            yield RawItem(f"{url}::{group[0][0]}", None, reject=group[0][3])
        else:
            members = ", ".join(e for _, e, _, _ in group)
            yield RawItem(f"{url}::{key}", None, reject=("no_image", f"members: {members}"))
        return
    caption, meta, label = _side_members(sides)
    for name, data, reject in images:
        yield RawItem(f"{url}::{name}", data, label, caption, reject, meta)


def _side_members(sides: dict[str, bytes | None]) -> tuple[str | None, dict | None, int]:
    meta = None
    if sides.get("json") is not None:
        try:
            meta = json.loads(sides["json"])
        except ValueError:
            meta = {"unparsed": sides["json"].decode("utf-8", errors="replace")[:10000]}
        if not isinstance(meta, dict):
            meta = {"value": meta}
    caption = sides["txt"].decode("utf-8", errors="replace") if sides.get("txt") is not None else None
    if caption is None and meta is not None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    label = _int_or(sides.get("cls"), -1)
    return caption, meta, label


def _int_or(value, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value.decode().strip() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, UnicodeDecodeError):
        return default


def _pick(names: list[str], explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        if explicit not in names:
            raise KeyError(f"column {explicit!r} not in {names}")
        return explicit
    lower = {n.lower(): n for n in names}
    return next((lower[c.lower()] for c in candidates if c.lower() in lower), None)


def holds_urls(schema: pa.Schema) -> bool:
    """Whether a parquet file's rows are URLs to download, as _parquet_rows reads it without --image-column. The
    listing uses it to cut the file into units of web_unit_size rows; it reads no row, so a url column of store
    paths (s3://...) counts too, and neither --image-column naming a non-binary column nor a binary digest column
    (--verify-hash, --keep-columns: not the image, _parquet_rows) is seen: either only changes the unit size, never
    what is read."""
    names = schema.names
    return (_pick(names, None, _IMAGE_COLUMNS) or _first_binary(schema)) is None and \
        _pick(names, None, _URL_COLUMNS) is not None


def _parquet_rows(url: str, pf: pq.ParquetFile, opts: ReadOptions, lo: int, hi: int) -> Iterator[Item]:
    schema = pf.schema_arrow
    names = schema.names
    named = (*opts.keep_columns, *(opts.hash_check or ())[:1])
    image = _pick(names, opts.image_column, _IMAGE_COLUMNS) or _first_binary(schema, frozenset(named))
    link = None if image is not None else _pick(names, None, _URL_COLUMNS)
    if image is None and link is None:
        raise KeyError(f"no image-bytes or url column among {names}; pass --image-column")
    ident, caption = _pick(names, None, _ID_COLUMNS), _pick(names, None, _CAPTION_COLUMNS)
    label = _pick(names, opts.label_column, _LABEL_COLUMNS)
    kept = [c for c in named if c in names]
    columns = list(dict.fromkeys(c for c in (image or link, ident, caption, label, *kept) if c is not None))
    records = _records(url, pf, columns, ident, lo, hi)
    if image is not None:
        for i, (source, rec) in enumerate(records):
            value = rec[image]
            if isinstance(value, dict):  # Hugging Face image struct {"bytes": ..., "path": ...}
                value = value.get("bytes")
            yield i, _verified(RawItem(source, value if isinstance(value, bytes) else b"", _int_or(rec.get(label), -1),
                                       _text(rec, caption), meta=_kept_meta(rec, opts.keep_columns) or None),
                               rec, opts.hash_check)
        return
    yield from _download_rows(records, link, caption, label, opts)


def _download_rows(records, link: str, caption: str | None, label: str | None, opts: ReadOptions
                   ) -> Iterator[Item]:
    """url + caption rows: the images are fetched by threads, as they arrive; each URL's outcome is kept or a
    reject."""
    rows = list(records)  # the unit's rows of the file: ~100 bytes a row, plus the kept columns
    urls = [str(rec[link] or "") for _, rec in rows]
    yield from _fetched(urls, opts, lambda i, f: _verified(RawItem(
        rows[i][0], f.data, _int_or(rows[i][1].get(label), -1), _text(rows[i][1], caption), f.reject,
        {**_kept_meta(rows[i][1], opts.keep_columns), "url": f.url}), rows[i][1], opts.hash_check))


def _verified(item: RawItem, rec: dict, check: tuple[str, str] | None) -> RawItem:
    """The reject "hash_mismatch" for bytes whose digest is not the row's (DataComp's sha256 column: what a URL
    serves now may be another image, or a host's "image removed" placeholder); a row with no hash is not checked."""
    expected = rec.get(check[0]) if check is not None and item.data else None
    if not expected:  # also no bytes: a failed download or an empty cell keeps its own reject
        return item
    expected = (expected.hex() if isinstance(expected, bytes) else str(expected)).strip().lower()
    digest = hashlib.new(check[1], item.data).hexdigest()
    if digest == expected:
        return item
    return replace(item, data=None, reject=("hash_mismatch", f"{check[1]} {digest}, the row's {check[0]} {expected}"))


def _kept_meta(rec: dict, columns: tuple[str, ...]) -> dict:
    """The kept columns of a row as JSON values (null where the file has no such column)."""
    return {c: _json_value(rec.get(c)) for c in columns}


def _json_value(value):
    """A parquet value as strict JSON can hold it: NaN and infinities null (Python's json would write NaN, which
    other readers refuse), timestamps and decimals as text, bytes as base64."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)  # Decimal, timedelta, ...


def _records(url: str, pf: pq.ParquetFile, columns: list[str], ident: str | None, lo: int, hi: int
             ) -> Iterator[tuple[str, dict]]:
    """(identity, row) for rows [lo, hi) of the file, reading only the row groups that hold them."""
    lo, hi = (0, pf.metadata.num_rows) if lo < 0 else (lo, hi)
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n > lo and first < hi:
            for start, table in _group_rows(pf, g, columns, max(lo, first) - first, min(hi, first + n) - first):
                for row, rec in enumerate(_to_microseconds(table).to_pylist(), first + start):
                    yield (f"{url}#id={rec[ident]}" if ident else f"{url}#row={row}"), rec
        first += n


# A row group of more rows or bytes than these is decoded batch by batch rather than whole. pyarrow wrote groups of up
# to 64Mi rows by default before version 15 (a metadata file of that time can be one group), and a unit of 10,000
# URLs decoding the whole group held ~1.1 GB per 4M URLs and captions (measured), past a stage task's 1.5 GB.
_WHOLE_GROUP_ROWS = 1 << 16
_WHOLE_GROUP_BYTES = 256 << 20  # the group's uncompressed size, all columns (its footer's)
_BATCH_ROWS = 4096
_BATCH_BYTES = 32 << 20  # a batch of image bytes: fewer rows


def _group_rows(pf: pq.ParquetFile, g: int, columns: list[str], a: int, b: int) -> Iterator[tuple[int, pa.Table]]:
    """Rows [a, b) of row group g, as tables each with the position of its first row in the group. A large group is
    decoded in batches up to row b and no further: in memory, its compressed column chunks (pyarrow reads them
    whole: ~0.23 GB for the 4M URLs and captions above) and one batch. Images barely compress, so a group of image
    bytes is in memory whole either way (once, not twice)."""
    meta = pf.metadata.row_group(g)
    n, size = meta.num_rows, meta.total_byte_size
    if n <= _WHOLE_GROUP_ROWS and size <= _WHOLE_GROUP_BYTES:
        yield a, pf.read_row_group(g, columns=columns).slice(a, b - a)
        return
    rows = max(1, min(_BATCH_ROWS, n * _BATCH_BYTES // max(size, 1)))
    pos = 0
    for batch in pf.iter_batches(batch_size=rows, row_groups=[g], columns=columns, use_threads=False):
        start, end = max(a, pos), min(b, pos + batch.num_rows)
        if start < end:
            yield start, pa.Table.from_batches([batch.slice(start - pos, end - start)])
        pos += batch.num_rows
        if pos >= b:
            return


def _text(rec: dict, column: str | None) -> str | None:
    return None if column is None or rec.get(column) is None else str(rec[column])


def _to_microseconds(table: pa.Table) -> pa.Table:
    """Nanosecond timestamps, durations and times cut to microseconds: Python's datetime has no nanoseconds, and
    pyarrow's to_pylist refuses such a value rather than round it (without pandas), which would make the file a
    corrupt_parquet reject."""
    for i, fld in enumerate(table.schema):
        t = fld.type
        if (pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_time64(t)) and t.unit == "ns":
            us = pa.timestamp("us", t.tz) if pa.types.is_timestamp(t) else \
                pa.duration("us") if pa.types.is_duration(t) else pa.time64("us")
            table = table.set_column(i, fld.name, table.column(i).cast(us, safe=False))
    return table


def _first_binary(schema, exclude: frozenset[str] = frozenset()) -> str | None:
    """The first column that can hold image bytes, other than `exclude` (a --verify-hash or kept column of binary
    digests is not the image)."""
    for fld in schema:
        if fld.name in exclude:
            continue
        if pa.types.is_binary(fld.type) or pa.types.is_large_binary(fld.type):
            return fld.name
        if pa.types.is_struct(fld.type) and fld.type.get_field_index("bytes") >= 0:
            return fld.name
    return None
