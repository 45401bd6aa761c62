"""Phase 0, listing: SOURCE arguments -> listing parts (parquet, one row per file in input order), in parallel.

A SOURCE is a directory (walked recursively), a glob, a .tar/.tar.gz/.tgz/.zip archive, a .parquet file, or a text
list (.txt/.lst/.list/.urls) of image paths or URLs. Inside a directory or glob, archives and parquet files are
entries of their own kind and every other file is a loose image candidate (a non-image ends up in rejects).

Directories are listed by tasks: one lists the top level (its loose files become one part, its sub-folders are
returned), then one task per sub-folder walks it recursively, so a tree of 300M keys is listed by as many tasks as
it has top-level folders, never by the driver. Each part is sorted; parts are ordered by (SOURCE, top-level files
first, then sub-folders by name): that order is the input order "first occurrence wins" refers to. Each task also
returns a digest of what it listed (path, size, ETag or mtime): the plan's fingerprint is made from these, so a
source that changed since an interrupted run is noticed before any stale staged work is reused.

The driver only checks that each SOURCE exists (failing early, IngestError, naming it) and expands globs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import put_bytes, url_to_fs
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
    """List one piece of the sources into `part_url`. mode: "top" (a directory's own files; returns sub-folders),
    "tree" (a sub-folder, recursively), "list" (a text file of paths / URLs), "entries" (given entries)."""

    part_url: str
    mode: str
    unit_size: int  # loose files per unit
    path: str  # URL of the directory / sub-folder / list file
    label_root: str | None  # with --labels-from-folders: the SOURCE directory (class = first folder below it)
    storage_options: dict
    entries: tuple[tuple[str, str, int, str], ...] = ()  # "entries": (kind, url, size, version)


@dataclass(frozen=True)
class ListResult:
    part_url: str
    rows: int
    digest: str
    # Work units cut from this part: (kind, first row, end row, first parquet row, end parquet row); a parquet file
    # is cut into runs of unit_size of its own rows (a LAION metadata file holds ~1M URLs), -1 -1 = all of it.
    units: tuple[tuple[str, int, int, int, int], ...]
    classes: tuple[str, ...]
    subfolders: tuple[str, ...]  # "top" only: sub-folder URLs, sorted


def kind_of(path: str) -> str:
    lower = path.lower()
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "file"


def expand_sources(sources: tuple[str, ...], labels_from_folders: bool, unit_size: int, storage_options: dict,
                   part_url) -> list[ListTask]:
    """Driver side: one or more ListTasks per SOURCE, in SOURCE order; `part_url(i)` names part i."""
    tasks: list[ListTask] = []

    def add(mode: str, url: str, label_root: str | None = None, entries: tuple = ()) -> None:
        tasks.append(ListTask(part_url(len(tasks)), mode, unit_size, url, label_root, storage_options, entries))

    for source in sources:
        try:
            fs, path = url_to_fs(source, storage_options)
            if any(ch in path for ch in "*?["):
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
            if not fs.exists(path):
                raise IngestError(f"SOURCE {source!r} does not exist")
            url = fs.unstrip_protocol(path)
            if fs.isdir(path):
                add("top", url, url if labels_from_folders else None)
            elif path.lower().endswith(LIST_SUFFIXES):
                add("list", url)
            else:
                info = fs.info(path)
                with fs.open(path, "rb") as f:  # a permission problem shows up now, not as a rejected input later
                    f.read(1)
                add("entries", source, entries=((kind_of(path), url, int(info.get("size") or 0), _version(info)),))
        except IngestError:
            raise
        except Exception as e:  # noqa: BLE001 - credentials, permissions, network: name the source, stop before work
            raise IngestError(f"SOURCE {source!r} cannot be read: {type(e).__name__}: {e}") from None
    return tasks


def subfolder_tasks(top: ListTask, result: ListResult, part_url) -> list[ListTask]:
    """The walks of a "top" task's sub-folders; `part_url(j)` names the j-th (from 1: the top's own part is 0)."""
    return [ListTask(part_url(j), "tree", top.unit_size, url, top.label_root, top.storage_options)
            for j, url in enumerate(result.subfolders, 1)]


def run_listing(task: ListTask, policy: RetryPolicy) -> ListResult:
    fs, path = url_to_fs(task.path, task.storage_options)
    subfolders: tuple[str, ...] = ()
    if task.mode == "entries":
        rows = [(k, u, None, s, v) for k, u, s, v in task.entries]
    elif task.mode == "list":
        rows = [("file", u, None, 0, "") for u in _read_list(fs, path, task.storage_options, policy)]
    else:
        if task.mode == "top":
            listed = retry(lambda: fs.ls(path, detail=True), policy, f"list {task.path}")
            infos = {i["name"]: i for i in listed if i.get("type") != "directory"}
            subfolders = tuple(sorted(fs.unstrip_protocol(i["name"]) for i in listed if i.get("type") == "directory"))
        else:
            infos = retry(lambda: fs.find(path, detail=True), policy, f"list {task.path}")
        root = url_to_fs(task.label_root, task.storage_options)[1].rstrip("/") if task.label_root else None
        rows = [(kind_of(p), fs.unstrip_protocol(p), _class(p, root, kind_of(p)), int(info.get("size") or 0),
                 _version(info)) for p, info in sorted(infos.items())]
    digest = hashlib.sha256()
    for kind, url, cls, size, version in rows:
        digest.update(f"{kind}\t{url}\t{cls}\t{size}\t{version}\n".encode("utf-8", "surrogatepass"))
    columns = list(zip(*rows)) if rows else [[] for _ in ENTRY_SCHEMA]
    table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, ENTRY_SCHEMA)], schema=ENTRY_SCHEMA)
    put_bytes(task.part_url, _parquet_bytes(table), task.storage_options)
    classes = tuple(sorted({c for _, _, c, _, _ in rows if c is not None}))
    parquet_rows = {i: _parquet_rows(r[1], task.storage_options, policy) for i, r in enumerate(rows)
                    if r[0] == "parquet"}
    units = cut_units([r[0] for r in rows], task.unit_size, parquet_rows)
    return ListResult(task.part_url, len(rows), digest.hexdigest(), units, classes, subfolders)


def cut_units(kinds: list[str], unit_size: int, parquet_rows: dict[int, int]
              ) -> tuple[tuple[str, int, int, int, int], ...]:
    """Runs of up to unit_size loose files; each archive a unit of its own; each parquet file runs of unit_size of
    its rows. Units depend on the listing alone, never on the worker count: that is what makes output independent
    of --workers."""
    units: list[tuple[str, int, int, int, int]] = []
    start = None
    for i, kind in enumerate(kinds):
        if kind == "file":
            if start is None:
                start = i
            if i + 1 - start == unit_size:
                units.append(("files", start, i + 1, 0, 0))
                start = None
            continue
        if start is not None:
            units.append(("files", start, i, 0, 0))
            start = None
        n = parquet_rows.get(i, -1)
        if kind == "parquet" and n > 0:
            units += [(kind, i, i + 1, lo, min(n, lo + unit_size)) for lo in range(0, n, unit_size)]
        else:
            units.append((kind, i, i + 1, -1, -1))
    if start is not None:
        units.append(("files", start, len(kinds), 0, 0))
    return tuple(units)


def _parquet_rows(url: str, storage_options: dict, policy: RetryPolicy) -> int:
    """Rows of a parquet file from its footer; -1 if it is not readable parquet (its stage task then rejects it)."""
    fs, path = url_to_fs(url, storage_options)

    def read() -> int:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows

    try:
        return retry(read, policy, f"read the footer of {url}")
    except TransientFailure:
        raise
    except Exception:  # noqa: BLE001 - corrupt or not parquet: a content fault, rejected by the stage task
        return -1


def read_part_rows(part_url: str, start: int, end: int, storage_options: dict) -> list[dict]:
    """Rows [start, end) of a listing part, reading only the row groups that hold them."""
    fs, path = url_to_fs(part_url, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        first, last = start // PART_ROW_GROUP, (end - 1) // PART_ROW_GROUP
        table = pf.read_row_groups(list(range(first, last + 1)))
    offset = first * PART_ROW_GROUP
    return table.slice(start - offset, end - start).to_pylist()


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


def _read_list(fs: fsspec.AbstractFileSystem, path: str, storage_options: dict, policy: RetryPolicy) -> list[str]:
    """Non-empty, non-comment lines; plain paths become absolute URLs so keys do not depend on the cwd."""
    lines = retry(lambda: fs.cat_file(path), policy, f"read {path}").decode("utf-8", errors="replace").splitlines()
    out = []
    for line in (raw.strip() for raw in lines):
        if line and not line.startswith("#"):
            item_fs, item_path = url_to_fs(line, storage_options)
            out.append(item_fs.unstrip_protocol(item_path))
    return out
