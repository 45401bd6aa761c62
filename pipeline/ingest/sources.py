"""Turn SOURCE arguments into an ordered list of work units, failing early (IngestError) on a missing source.

A SOURCE is a directory (walked recursively, sorted), a glob, a .tar/.tar.gz/.tgz/.zip archive, a .parquet file,
or a text list (.txt/.lst/.list/.urls) of image paths or URLs. Inside a directory or glob, archives and parquet
files become their own units and every other file is a loose image candidate (a non-image ends up in rejects).

Units are defined by the inputs alone (runs of `unit_size` loose files; one unit per archive or parquet file), never
by the worker count: that is what makes the output independent of --workers and lets a rerun skip finished units.
Input order = SOURCE order, then sorted paths, then member/row order; "first occurrence wins" refers to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec

from pipeline.ingest.atomic import url_to_fs

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
PARQUET_SUFFIXES = (".parquet",)
LIST_SUFFIXES = (".txt", ".lst", ".list", ".urls")


class IngestError(Exception):
    """A problem found before any work starts (missing source, unwritable output, refused output prefix)."""


@dataclass(frozen=True)
class Unit:
    index: int
    kind: str  # "files" | "archive" | "parquet"
    urls: tuple[str, ...]  # "files": the files; otherwise the one archive / parquet file
    labels: tuple[int, ...] = ()  # "files" with --labels-from-folders: class index per file, -1 = none


@dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]
    classes: tuple[str, ...]  # folder class names; index = label


def plan_units(sources: tuple[str, ...], unit_size: int, labels_from_folders: bool, storage_options: dict) -> Plan:
    entries: list[tuple[str, str, str | None]] = []  # (kind, url, class name)
    for source in sources:
        entries.extend(_expand(source, labels_from_folders, storage_options))
    classes = tuple(sorted({c for _, _, c in entries if c is not None}))
    class_index = {c: i for i, c in enumerate(classes)}
    units: list[Unit] = []
    run: list[tuple[str, int]] = []

    def flush():
        if run:
            urls, labels = zip(*run)
            units.append(Unit(len(units), "files", urls, labels if labels_from_folders else ()))
            run.clear()

    for kind, url, cls in entries:
        if kind == "file":
            run.append((url, class_index.get(cls, -1)))
            if len(run) == unit_size:
                flush()
        else:
            flush()
            units.append(Unit(len(units), kind, (url,)))
    flush()
    return Plan(tuple(units), classes)


def _kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "file"


def _expand(source: str, labels_from_folders: bool, storage_options: dict) -> list[tuple[str, str, str | None]]:
    try:
        fs, path = url_to_fs(source, storage_options)
        if any(ch in path for ch in "*?["):
            matches = sorted(fs.glob(path))
            if not matches:
                raise IngestError(f"SOURCE {source!r} matched no files")
            out = []
            for m in matches:
                out.extend(_expand_path(fs, m, False, storage_options))
            return out
        if not fs.exists(path):
            raise IngestError(f"SOURCE {source!r} does not exist")
        return _expand_path(fs, path, labels_from_folders, storage_options)
    except IngestError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials, permissions, network: name the source, stop before work
        raise IngestError(f"SOURCE {source!r} cannot be read: {type(e).__name__}: {e}") from None


def _expand_path(fs: fsspec.AbstractFileSystem, path: str, labels_from_folders: bool, storage_options: dict):
    if fs.isdir(path):
        root = path.rstrip("/")
        out = []
        for p in sorted(fs.find(root)):
            rel = p[len(root) + 1 :].split("/")
            cls = rel[0] if labels_from_folders and len(rel) > 1 else None
            kind = _kind(p)
            out.append((kind, fs.unstrip_protocol(p), cls if kind == "file" else None))
        return out
    kind = _kind(path)
    if kind == "file" and path.lower().endswith(LIST_SUFFIXES):
        return [("file", line, None) for line in _read_list(fs, path, storage_options)]
    _probe(fs, path)
    return [(kind, fs.unstrip_protocol(path), None)]


def _read_list(fs: fsspec.AbstractFileSystem, path: str, storage_options: dict) -> list[str]:
    """Non-empty, non-comment lines; plain paths become absolute URLs so keys do not depend on the cwd."""
    lines = fs.cat_file(path).decode("utf-8", errors="replace").splitlines()
    out = []
    for line in (raw.strip() for raw in lines):
        if line and not line.startswith("#"):
            item_fs, item_path = url_to_fs(line, storage_options)
            out.append(item_fs.unstrip_protocol(item_path))
    return out


def _probe(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Open and read one byte, so a permission problem shows up now rather than as a rejected input later."""
    with fs.open(path, "rb") as f:
        f.read(1)
