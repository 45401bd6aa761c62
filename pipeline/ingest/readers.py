"""Read the raw inputs of one unit as a stream of RawItem, in input order, without ever raising on bad input.

Archives are read as streams (tar: `r|*`, one pass; zip: through the seekable fsspec file, member by member);
nothing is extracted to disk and member names are only used as identities, so `../x` or `/etc/x` members cannot
write anywhere. Anything that cannot be read becomes a RawItem carrying a rejection reason.
"""

from __future__ import annotations

import tarfile
import zipfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow.parquet as pq

from pipeline.ingest.atomic import url_to_fs
from pipeline.ingest.sources import Unit

_IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "image_bytes", "bytes", "data")
_ID_COLUMNS = ("id", "key", "uid", "image_id")
_CAPTION_COLUMNS = ("caption", "text", "txt")
_LABEL_COLUMNS = ("label", "cls", "class", "target")


@dataclass(frozen=True)
class RawItem:
    source: str  # stable identity: URL, "ARCHIVE::MEMBER" or "PARQUET#id=..."/"PARQUET#row=N"
    data: bytes | None  # None when `reject` is set
    label: int = -1  # -1 = unlabelled
    caption: str | None = None
    reject: tuple[str, str] | None = None  # (reason, detail)


def read_unit(unit: Unit, max_bytes: int, image_column: str | None, label_column: str | None,
              storage_options: dict) -> Iterator[RawItem]:
    if unit.kind == "files":
        labels = unit.labels or (-1,) * len(unit.urls)
        for url, label in zip(unit.urls, labels):
            yield _read_file(url, label, max_bytes, storage_options)
    elif unit.kind == "archive":
        url = unit.urls[0]
        reader = _read_zip if url.lower().endswith(".zip") else _read_tar
        try:
            yield from reader(url, max_bytes, storage_options)
        except Exception as e:  # noqa: BLE001 - a corrupt archive ends its stream; what was read so far stays
            yield RawItem(f"{url}::", None, reject=("corrupt_archive", f"{type(e).__name__}: {e}"))
    else:
        try:
            yield from _read_parquet(unit.urls[0], image_column, label_column, storage_options)
        except Exception as e:  # noqa: BLE001
            yield RawItem(f"{unit.urls[0]}#", None, reject=("corrupt_parquet", f"{type(e).__name__}: {e}"))


def _read_file(url: str, label: int, max_bytes: int, storage_options: dict) -> RawItem:
    try:
        fs, path = url_to_fs(url, storage_options)
        size = fs.size(path)
        if size is not None and size > max_bytes:
            return RawItem(url, None, label, reject=("too_large_file", f"{size} bytes"))
        return RawItem(url, fs.cat_file(path), label)
    except Exception as e:  # noqa: BLE001
        return RawItem(url, None, label, reject=("unreadable", f"{type(e).__name__}: {e}"))


def _read_tar(url: str, max_bytes: int, storage_options: dict) -> Iterator[RawItem]:
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            source = f"{url}::{member.name}"
            if member.isdir():
                continue
            if not member.isfile():
                yield RawItem(source, None, reject=("not_a_regular_file", f"tar type {member.type!r}"))
            elif member.size > max_bytes:
                yield RawItem(source, None, reject=("too_large_file", f"{member.size} bytes"))
            else:
                yield RawItem(source, tar.extractfile(member).read())


def _read_zip(url: str, max_bytes: int, storage_options: dict) -> Iterator[RawItem]:
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            source = f"{url}::{info.filename}"
            if info.is_dir():
                continue
            if info.file_size > max_bytes:
                yield RawItem(source, None, reject=("too_large_file", f"{info.file_size} bytes"))
                continue
            try:
                with archive.open(info) as member:
                    data = member.read(max_bytes + 1)  # the declared size can lie: bound what a bomb can inflate to
                if len(data) > max_bytes:
                    yield RawItem(source, None, reject=("too_large_file", "inflates past max_bytes"))
                else:
                    yield RawItem(source, data)
            except Exception as e:  # noqa: BLE001 - encrypted, bad CRC, unsupported compression
                yield RawItem(source, None, reject=("unreadable", f"{type(e).__name__}: {e}"))


def _pick(names: list[str], explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        if explicit not in names:
            raise KeyError(f"column {explicit!r} not in {names}")
        return explicit
    lower = {n.lower(): n for n in names}
    return next((lower[c] for c in candidates if c in lower), None)


def _read_parquet(url: str, image_column: str | None, label_column: str | None,
                  storage_options: dict) -> Iterator[RawItem]:
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        names = schema.names
        image = _pick(names, image_column, _IMAGE_COLUMNS) or _first_binary(schema)
        if image is None:
            raise KeyError(f"no image-bytes column among {names}; pass --image-column")
        ident, caption = _pick(names, None, _ID_COLUMNS), _pick(names, None, _CAPTION_COLUMNS)
        label = _pick(names, label_column, _LABEL_COLUMNS)
        columns = [c for c in (image, ident, caption, label) if c is not None]
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=list(dict.fromkeys(columns))):
            for rec in batch.to_pylist():
                source = f"{url}#id={rec[ident]}" if ident else f"{url}#row={row}"
                row += 1
                value = rec[image]
                if isinstance(value, dict):  # Hugging Face image struct {"bytes": ..., "path": ...}
                    value = value.get("bytes")
                yield RawItem(source, value if isinstance(value, bytes) else b"", _label(rec, label),
                              None if caption is None or rec[caption] is None else str(rec[caption]))


def _first_binary(schema) -> str | None:
    import pyarrow as pa

    for fld in schema:
        if pa.types.is_binary(fld.type) or pa.types.is_large_binary(fld.type):
            return fld.name
        if pa.types.is_struct(fld.type) and fld.type.get_field_index("bytes") >= 0:
            return fld.name
    return None


def _label(rec: dict, column: str | None) -> int:
    if column is None or rec[column] is None:
        return -1
    try:
        return int(rec[column])
    except (TypeError, ValueError):
        return -1
