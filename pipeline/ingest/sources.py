"""Phase 0, listing: SOURCE arguments -> listing parts (parquet, one row per file in input order), in parallel.

A SOURCE is a directory (walked recursively), a glob, a .tar/.tar.gz/.tgz/.zip archive, a .parquet file, or a text
list (.txt/.lst/.list/.urls) of image paths or URLs. Inside a directory or glob, archives and parquet files are
entries of their own kind and every other file is a loose image candidate (a non-image ends up in rejects).

Directories are listed by tasks: "top" lists a directory's own files and returns its sub-folders, then one "tree"
task per sub-folder lists it recursively. On S3 a task lists a key range and holds at most LIST_CAP keys: a big
prefix (300M loose keys in one flat folder) comes back as a part plus cut points for the rest, which the driver
lists in the next round (key_ranges.py), so no task and not the driver ever holds the prefix's keys. Elsewhere
(local folders, other stores) a folder is listed whole by one task, and written in parts of LIST_CAP rows.

Each part is sorted; part names sort in input order: (SOURCE, top-level files first, then sub-folders by name, then
each folder's key ranges in key order): that order is the input order "first occurrence wins" refers to. A run of
parts of one folder (a "segment") reads as one listing: plan.py cuts units across its parts, so units, output and
fingerprint do not depend on where the ranges were cut. Each part returns a digest of its rows (path, size, ETag or
mtime) that adds up over the parts of a segment; the plan's fingerprint is made from these, so a source that
changed since an interrupted run is noticed before any stale staged work is reused.

The driver only checks that each SOURCE exists (failing early, IngestError, naming it) and expands globs, except
on S3 a glob whose wildcards are all in its last component and whose matches are images, archives or parquet files
(`s3://b/raw/*.jpg`, `.../part-*.tar`): that one is listed by range tasks like its folder, each keeping the keys
(and walking the sub-folders) whose name matches, so a glob over a 300M-key prefix is not listed by the driver
either. If it matched nothing, planning says so (plan.py), as the driver does for the globs it expands.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
from dataclasses import dataclass, replace
from itertools import islice
from operator import itemgetter
from typing import Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import put_bytes, url_to_fs
from pipeline.ingest import key_ranges
from pipeline.ingest.fetch import WEB_SCHEMES, is_web
from pipeline.ingest.key_ranges import lister, list_range, range_listable
from pipeline.ingest.layout import Layout
from pipeline.ingest.readers import holds_urls
from pipeline.ingest.retry import RetryPolicy, TransientFailure, retry

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
PARQUET_SUFFIXES = (".parquet",)
LIST_SUFFIXES = (".txt", ".lst", ".list", ".urls")
PART_ROW_GROUP = 4096  # a stage task reads only the row groups of its unit

ENTRY_SCHEMA = pa.schema([("kind", pa.string()), ("url", pa.string()), ("cls", pa.string()),
                          ("size", pa.int64()), ("version", pa.string())])


class IngestError(Exception):
    """A problem found before any work starts (missing source, unwritable output, refused output prefix)."""


@dataclass(frozen=True)
class ListTask:
    """List one piece of the sources into parts. mode: "top" (a directory's own files; returns sub-folders), "tree"
    (a sub-folder, recursively), "list" (a text file of paths / URLs), "entries" (given entries)."""

    layout: Layout
    segment: tuple[int, int]  # (initial task, sub-folder: 0 = the task's own listing, j >= 1 its j-th sub-folder)
    mode: str
    path: str  # URL of the directory / sub-folder / list file
    label_root: str | None  # with --labels-from-folders: the SOURCE directory (class = first folder below it)
    storage_options: dict
    entries: tuple[tuple[str, str, int, str], ...] = ()  # "entries": (kind, url, size, version)
    after: str | None = None  # S3: the key range (after, upto] this task lists; None: open on that side
    upto: str | None = None
    branch: tuple[int, ...] = ()  # the range's place in the tree of splits (Layout.list_part)
    # "top" of a range-listed glob: only the files and sub-folders whose name (last component) matches it are kept
    pattern: str | None = None

    @property
    def source(self) -> str:
        """The SOURCE this task lists (for messages): the folder, or the glob."""
        return f"{self.path}/{self.pattern}" if self.pattern else self.path

    def part_url(self, extra: int = 0) -> str:
        """This task's part; extra >= 1: the extra parts of a listing longer than LIST_CAP (not range-listed)."""
        return self.layout.list_part(*self.segment, self.branch + ((extra,) if extra else ()))


@dataclass(frozen=True)
class ListedPart:
    url: str
    rows: int
    digest: int  # sum of the rows' hashes mod 2**256: a segment's sum is the same however it was cut into parts
    # The rows as runs: ("file", n, 0) for n consecutive loose files, ("web", n, 0) for n consecutive web URLs (of a
    # text list), ("archive", 1, 0), ("parquet", 1, rows of the file from its footer, -1 if unreadable), or
    # ("web_parquet", 1, rows) for a parquet of URLs to download. plan.py cuts units from them.
    runs: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class ListResult:
    parts: tuple[ListedPart, ...]  # in order
    classes: tuple[str, ...]
    subfolders: tuple[str, ...]  # "top" only: sub-folder URLs, sorted
    rest: tuple[str, ...]  # S3: what is left of the range, (rest[0], rest[1]], ..., (rest[-1], upto]; see rest_tasks


def kind_of(path: str) -> str:
    lower = path.lower()
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "file"


def expand_sources(sources: tuple[str, ...], labels_from_folders: bool, storage_options: dict, layout: Layout
                   ) -> list[ListTask]:
    """Driver side: one or more ListTasks per SOURCE, in SOURCE order."""
    tasks: list[ListTask] = []

    def add(mode: str, url: str, label_root: str | None = None, entries: tuple = (), pattern: str | None = None
            ) -> None:
        tasks.append(ListTask(layout, (len(tasks), 0), mode, url, label_root, storage_options, entries,
                              pattern=pattern))

    for source in sources:
        try:
            fs, path = url_to_fs(source, storage_options)
            folder, _, pattern = path.rstrip("/").rpartition("/")
            if _range_glob(fs, folder, pattern):
                try:
                    info = fs.info(folder)  # one HEAD and a one-key list, as for a folder SOURCE
                except FileNotFoundError:
                    info = {}
                if info.get("type") != "directory":
                    raise IngestError(f"SOURCE {source!r} matched no files (no folder {folder!r})")
                add("top", fs.unstrip_protocol(folder), pattern=pattern)
                continue
            if _WILDCARD.intersection(path):
                matches = fs.glob(path, detail=True)
                if not matches:
                    raise IngestError(f"SOURCE {source!r} matched no files")
                entries = []
                for p, info in sorted(matches.items()):
                    if info.get("type") == "directory":
                        add("top", fs.unstrip_protocol(p))
                    elif p.lower().endswith(LIST_SUFFIXES):
                        add("list", fs.unstrip_protocol(p))
                    else:
                        entries.append((kind_of(p), fs.unstrip_protocol(p), int(info.get("size") or 0), _version(info)))
                if entries:
                    add("entries", source, entries=tuple(entries))
                continue
            # info, never isdir: s3fs's isdir lists the whole prefix (every page, kept in its cache), which for a
            # prefix of 300M keys is ~300k sequential requests and hundreds of GB in the driver. info is one HEAD
            # and, for a folder, one list of at most one key.
            try:
                info = fs.info(path)
            except FileNotFoundError:
                raise IngestError(f"SOURCE {source!r} does not exist") from None
            url = fs.unstrip_protocol(path)
            if info.get("type") == "directory":
                add("top", url, url if labels_from_folders else None)
            elif path.lower().endswith(LIST_SUFFIXES):
                add("list", url)
            else:
                with fs.open(path, "rb") as f:  # a permission problem shows up now, not as a rejected input later
                    f.read(1)
                add("entries", source, entries=((kind_of(path), url, int(info.get("size") or 0), _version(info)),))
        except IngestError:
            raise
        except Exception as e:  # noqa: BLE001 - credentials, permissions, network: name the source, stop before work
            raise IngestError(f"SOURCE {source!r} cannot be read: {type(e).__name__}: {e}") from None
    return tasks


_WILDCARD = frozenset("*?[")


def _range_glob(fs, folder: str, pattern: str) -> bool:
    """A glob listed by range tasks: on S3, wildcards only in the last component, and what it matches cannot be a
    text list (a list is its own kind of SOURCE, read by its own task): the part after the pattern's last dot is a
    plain extension other than a list's (`*.jpg`, `part-*.tar`; not `*`, `img*` or `*.txt`)."""
    if not _WILDCARD.intersection(pattern) or _WILDCARD.intersection(folder) or not folder or not range_listable(fs):
        return False
    stem, dot, ext = pattern.rpartition(".")
    return bool(dot and stem and ext) and not _WILDCARD.intersection(ext) and f".{ext.lower()}" not in LIST_SUFFIXES


def _matches(pattern: str | None, key: str) -> bool:
    return pattern is None or fnmatch.fnmatchcase(posixpath.basename(key.rstrip("/")), pattern)


def _literal_stem(pattern: str | None) -> str:
    """What every name a glob matches starts with: the pattern up to its first wildcard ("" without a pattern)."""
    return "" if pattern is None else pattern[:next((i for i, c in enumerate(pattern) if c in _WILDCARD), len(pattern))]


def subfolder_tasks(top: ListTask, subfolders: list[str]) -> list[ListTask]:
    """The walks of a "top" task's sub-folders (sorted URLs), numbered from 1 (the top's own files are 0)."""
    return [ListTask(top.layout, (top.segment[0], j), "tree", url, top.label_root, top.storage_options)
            for j, url in enumerate(subfolders, 1)]


def rest_tasks(task: ListTask, result: ListResult) -> list[ListTask]:
    """The sub-ranges left by a range task that reached LIST_CAP: its children in the tree of splits."""
    bounds = (*result.rest, task.upto)
    return [replace(task, after=a, upto=b, branch=task.branch + (i,))
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]), 1)]


def run_listing(task: ListTask, policy: RetryPolicy) -> ListResult:
    """List the task's piece into parts, or, after a kill during listing, return what the task listed before it (its
    record in done/list, if made by the same task: a sub-range whose parent was listed again after the kill can
    have other bounds under the same number)."""
    record = task.layout.list_done(*task.segment, task.branch)
    identity = _task_identity(task)
    fs, path = url_to_fs(record, task.storage_options)
    try:
        saved = json.loads(retry(lambda: fs.cat_file(path), policy, f"read {record}"))
    except FileNotFoundError:
        saved = None
    if saved is not None and saved["task"] == identity:
        return ListResult(tuple(ListedPart(url, rows, int(digest, 16), tuple(map(tuple, runs)))
                                for url, rows, digest, runs in saved["parts"]),
                          tuple(saved["classes"]), tuple(saved["subfolders"]), tuple(saved["rest"]))
    if saved is not None:  # another listing's record: it goes before its parts are overwritten
        retry(lambda: fs.rm_file(path), policy, f"delete {record}")
    result = _list(task, policy)
    body = {"task": identity, "parts": [[p.url, p.rows, f"{p.digest:x}", p.runs] for p in result.parts],
            "classes": result.classes, "subfolders": result.subfolders, "rest": result.rest}
    put_bytes(record, json.dumps(body).encode(), task.storage_options)  # after its parts: the task is done
    return result


def _task_identity(task: ListTask) -> str:
    """What a listing task lists, as a digest: the same segment and branch numbers name another listing when the
    sources, a parent's cut points or the cap differ."""
    what = [task.mode, task.path, task.label_root, task.after, task.upto, task.pattern, key_ranges.LIST_CAP,
            [list(e) for e in task.entries]]
    return hashlib.sha256(json.dumps(what).encode("utf-8", "surrogatepass")).hexdigest()


def _list(task: ListTask, policy: RetryPolicy) -> ListResult:
    fs, path = url_to_fs(task.path, task.storage_options)
    subfolders: tuple[str, ...] = ()
    rest: tuple[str, ...] = ()
    # A listing made whole (a local folder, another store) is written in parts of LIST_CAP rows, a text list as it is
    # read; a range task holds at most LIST_CAP keys and writes them as one part. (Read at call time: a test may lower
    # it.)
    part_rows = key_ranges.LIST_CAP
    if task.mode == "list":  # streamed: a list of 300M URLs held whole is ~57 GB (bench/web_sources.py)
        lines = (("file", u, None, 0, "") for u in _read_list(fs, path, task.storage_options, policy))
        parts: list[ListedPart] = []
        while True:
            chunk = list(islice(lines, part_rows))
            if chunk or not parts:
                parts.append(_write_part(task, len(parts), chunk, len(parts) * part_rows, policy))
            if len(chunk) < part_rows:
                return ListResult(tuple(parts), (), (), ())
    if task.mode == "entries":
        rows = [(k, u, None, s, v) for k, u, s, v in task.entries]
    else:
        if range_listable(fs):
            bucket, key, _ = fs.split_path(path)
            # A glob lists only the keys that start with its literal stem (`part-00` of `part-00*.tar`), as s3fs's
            # own glob does: a few tars beside 300M images are one page, not the folder.
            listed = list_range(lister(fs), bucket, (f"{key.strip('/')}/" if key else "") + _literal_stem(task.pattern),
                                task.mode == "top", task.after, task.upto, policy)
            # A glob's cut points still come from every listed key (list_range's rest): only what is kept is filtered.
            infos = [(f"{bucket}/{k}", {"size": size, "ETag": etag}) for k, size, etag in listed.objects
                     if _matches(task.pattern, k)]
            subfolders = tuple(fs.unstrip_protocol(f"{bucket}/{p.rstrip('/')}") for p in listed.subfolders
                               if _matches(task.pattern, p))
            rest, part_rows = listed.rest, max(len(infos), 1)
        elif task.mode == "top":
            entries = retry(lambda: fs.ls(path, detail=True), policy, f"list {task.path}")
            infos = [(i["name"], i) for i in entries if i.get("type") != "directory"]
            subfolders = tuple(fs.unstrip_protocol(i["name"]) for i in entries if i.get("type") == "directory")
        else:
            infos = list(retry(lambda: fs.find(path, detail=True), policy, f"list {task.path}").items())
        root = url_to_fs(task.label_root, task.storage_options)[1].rstrip("/") if task.label_root else None
        rows = [(kind_of(p), fs.unstrip_protocol(p), _class(p, root, kind_of(p)), int(info.get("size") or 0),
                 _version(info)) for p, info in sorted(infos, key=itemgetter(0))]
    parts = tuple(_write_part(task, extra, rows[lo:lo + part_rows], None, policy)
                  for extra, lo in enumerate(range(0, max(len(rows), 1), part_rows)))
    classes = tuple(sorted({c for _, _, c, _, _ in rows if c is not None}))
    return ListResult(parts, classes, tuple(sorted(subfolders)), rest)


def _write_part(task: ListTask, extra: int, rows: list[tuple], line: int | None, policy: RetryPolicy) -> ListedPart:
    """One part: its parquet file, the sum of its rows' hashes (a text list's rows hash their line number too:
    its order is the file's, not implied by the names) and its runs of kinds."""
    digest = 0
    for i, (kind, url, cls, size, version) in enumerate(rows):
        text = f"{kind}\t{url}\t{cls}\t{size}\t{version}" + ("" if line is None else f"\t{line + i}")
        digest += int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=32).digest(), "big")
    columns = list(zip(*rows)) if rows else [[] for _ in ENTRY_SCHEMA]
    table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, ENTRY_SCHEMA)], schema=ENTRY_SCHEMA)
    url = task.part_url(extra)
    put_bytes(url, _parquet_bytes(table), task.storage_options)
    runs: list[tuple[str, int, int]] = []
    for kind, entry_url, *_ in rows:
        if kind == "file":
            kind = "web" if is_web(entry_url) else "file"
            if runs and runs[-1][0] == kind:
                runs[-1] = (kind, runs[-1][1] + 1, 0)
                continue
        file_rows = 0
        if kind == "parquet":
            file_rows, urls = _parquet_footer(entry_url, task.storage_options, policy)
            kind = "web_parquet" if urls else kind
        runs.append((kind, 1, file_rows))
    return ListedPart(url, len(rows), digest % 2**256, tuple(runs))


def _parquet_footer(url: str, storage_options: dict, policy: RetryPolicy) -> tuple[int, bool]:
    """(rows of a parquet file, whether they are URLs to download), from its footer; (-1, False) if it is not
    readable parquet (its stage task then rejects it)."""
    footer = _footer(url, storage_options, policy)
    return (-1, False) if footer is None else (footer.num_rows, holds_urls(footer.schema.to_arrow_schema()))


def _footer(url: str, storage_options: dict, policy: RetryPolicy) -> pq.FileMetaData | None:
    """A parquet file's footer, read with retries; None if it is not readable parquet (a content fault: its stage
    task rejects it). A fault that outlasts the retries propagates."""
    fs, path = url_to_fs(url, storage_options)

    def read() -> pq.FileMetaData:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata

    try:
        return retry(read, policy, f"read the footer of {url}")
    except TransientFailure:
        raise
    except Exception:  # noqa: BLE001 - corrupt or not parquet: a content fault, rejected by the stage task
        return None


def check_columns(urls: Iterable[str], keep_columns: tuple[str, ...], hash_column: str | None,
                  storage_options: dict, policy: RetryPolicy) -> None:
    """The columns --keep-columns and --verify-hash name, against the footer of the first parquet source of `urls`
    that reads (a corrupt one is skipped: its stage task rejects it): a column it lacks, or a hash column that holds
    neither text nor bytes (LAION's int64 "hash" is not a digest), is refused before anything is staged, naming
    the file's columns. A typo would otherwise be a null (or no check) in every sample of a run that takes hours,
    where a file later in the dump lacking a column is schema drift (null, or unchecked, in its samples only)."""
    for url in urls:
        footer = _footer(url, storage_options, policy)
        if footer is None:
            continue
        schema = footer.schema.to_arrow_schema()
        have = ", ".join(f"{f.name} ({f.type})" for f in schema)
        for flag, columns in (("--keep-columns", keep_columns), ("--verify-hash", (hash_column or "",))):
            missing = [c for c in columns if c and c not in schema.names]
            if missing:
                raise IngestError(f"{flag} {', '.join(missing)}: not a column of {url}, the first parquet source "
                                  f"listed that reads (its columns: {have})")
        if hash_column and not _textual(schema.field(hash_column).type):
            raise IngestError(f"--verify-hash {hash_column}: {url} holds {schema.field(hash_column).type} there, not "
                              "a digest as hex text or bytes")
        return


def _textual(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or \
        pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def read_part_rows(part_url: str, start: int, end: int, storage_options: dict) -> list[dict]:
    """Rows [start, end) of a listing part, reading only the row groups that hold them."""
    return read_part_spans(part_url, [(start, end)], storage_options)[0]


def read_part_spans(part_url: str, spans: list[tuple[int, int]], storage_options: dict) -> list[list[dict]]:
    """The rows of each span [start, end) of a listing part: the part opened once, only the row groups that hold any
    of them read."""

    def groups(a: int, b: int) -> range:
        return range(a // PART_ROW_GROUP, (b - 1) // PART_ROW_GROUP + 1) if b > a else range(0)

    fs, path = url_to_fs(part_url, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        tables = {g: pf.read_row_group(g) for g in sorted({g for a, b in spans for g in groups(a, b)})}
    out = []
    for a, b in spans:
        rows = []
        for g in groups(a, b):
            lo, hi = max(a, g * PART_ROW_GROUP), min(b, (g + 1) * PART_ROW_GROUP)
            rows += tables[g].slice(lo - g * PART_ROW_GROUP, hi - lo).to_pylist()
        out.append(rows)
    return out


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=PART_ROW_GROUP)
    return sink.getvalue().to_pybytes()


def _class(path: str, root: str | None, kind: str) -> str | None:
    if root is None or kind != "file":
        return None
    rel = path[len(root) + 1 :].split("/")
    return rel[0] if len(rel) > 1 else None


def _version(info: dict) -> str:
    """What changes when the object changes: the ETag on object stores, else the modification time."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


LIST_BLOCK = 16 << 20  # bytes of a text list read at a time, each block with retries


def _read_list(fs: fsspec.AbstractFileSystem, path: str, storage_options: dict, policy: RetryPolicy
               ) -> Iterator[str]:
    """Non-empty, non-comment lines (ended by LF, CRLF or CR; a UTF-8 BOM dropped), read in blocks of LIST_BLOCK
    bytes, a line cut between two joined. Web URLs are kept as written, their scheme lower-cased (fsspec would cut
    one at "::", its chaining mark, as in an IPv6 host, and took 18.6 us a line: 1.5 CPU-hours for 300M); plain
    paths become absolute URLs so keys do not depend on the cwd; a line with a scheme no filesystem knows stays as
    written, and its fetch rejects it."""
    carry, first = b"", True
    for block in _blocks(fs, path, policy):
        lines = (carry + block).splitlines(keepends=True)  # at LF, CRLF, CR (a CRLF cut in two: an empty line)
        carry = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        if first and lines:
            lines[0], first = lines[0].removeprefix(b"\xef\xbb\xbf"), False
        yield from _list_entries(lines, storage_options)
    yield from _list_entries([carry.removeprefix(b"\xef\xbb\xbf") if first else carry], storage_options)


def _blocks(fs: fsspec.AbstractFileSystem, path: str, policy: RetryPolicy) -> Iterator[bytes]:
    """The file in blocks of LIST_BLOCK bytes, each read with retries; whole, in one read, when its size is unknown
    (an HTTP server without Content-Length) or its server answers a range with the whole file. Its version (ETag,
    mtime) is compared after the last block: a list replaced while it was read would mix two lists' lines."""
    info = retry(lambda: fs.info(path), policy, f"read {path}")
    size = info.get("size")
    if size is None or size <= LIST_BLOCK:
        yield retry(lambda: fs.cat_file(path), policy, f"read {path}")
        return
    for start in range(0, size, LIST_BLOCK):
        end = min(start + LIST_BLOCK, size)
        block = retry(lambda: fs.cat_file(path, start=start, end=end), policy, f"read {path}")
        if start == 0 and len(block) == size != end:  # the range was ignored: the whole file came
            yield block
            return
        if len(block) != end - start:
            raise IngestError(f"{path}: bytes {start}-{end} of {size} asked, {len(block)} read: the list changed "
                              "while it was read")
        yield block
    after = retry(lambda: fs.info(path), policy, f"read {path}")
    if (_version(after), after.get("size")) != (_version(info), size):
        raise IngestError(f"{path}: the list changed while it was read ({_version(info)} -> {_version(after)})")


def _list_entries(lines: list[bytes], storage_options: dict) -> Iterator[str]:
    for line in (raw.decode("utf-8", errors="replace").strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        if line.startswith(WEB_SCHEMES):
            yield line
            continue
        if is_web(line):
            scheme, rest = line.split(":", 1)
            yield scheme.lower() + ":" + rest
            continue
        try:
            item_fs, item_path = url_to_fs(line, storage_options)
        except ValueError:  # "Protocol not known": a reject of its own when fetched (a missing package still stops)
            yield line
            continue
        yield item_fs.unstrip_protocol(item_path)
