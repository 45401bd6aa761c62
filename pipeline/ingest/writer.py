"""Write one complete WebDataset tar shard, and DALI's index beside it, to any fsspec URL, atomically.

    info = write_shard("s3://bucket/ds/shard-000000.tar",
                       [("a1b2c3", {"jpg": jpeg_bytes, "json": meta_bytes, "cls": b"7"}), ...])

Members are `KEY.EXT` in the given order (the components of a sample stay adjacent, as WebDataset and DALI group
consecutive members by key). Headers carry fixed owner/mtime/mode so the same samples always give the same bytes:
a rerun after a crash reproduces a shard bit for bit. The index (`shard-000000.idx`) is published BEFORE the tar,
so a visible tar always has its index; the tar itself only appears once complete (see atomic.py).

Headers come from tarfile.TarInfo, but the bytes are written directly (header, data, padding, then tarfile's end
of archive) rather than through TarFile.addfile, which builds each header twice and copies the data through a
file object: that was most of the per-sample Python cost of staging and of the shard copy.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from typing import Iterable

from pipeline.ingest.atomic import atomic_writer, put_bytes
from pipeline.ingest.dali_index import Component, format_index

# Keys must not contain "." (WebDataset and DALI split the extension at the first dot of the basename) nor "/".
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_EXT_RE = re.compile(r"^[A-Za-z0-9_\-.]+$")
_MTIME = 0  # fixed so shard bytes depend only on the samples


@dataclass(frozen=True)
class ShardInfo:
    url: str
    index_url: str | None  # None when written with write_index=False
    num_samples: int
    num_bytes: int  # size of the tar
    keys: tuple[str, ...]
    components: tuple[tuple[Component, ...], ...]  # per sample, offsets of each member's data in the tar


def index_url_for(url: str) -> str:
    """shard-000000.tar -> shard-000000.idx (same rule as wds2idx: replace the suffix after the basename's dot)."""
    return re.sub(r"\.tar$", "", url) + ".idx"


def write_shard(
    url: str,
    samples: Iterable[tuple[str, dict[str, bytes]]],
    storage_options: dict | None = None,
    write_index: bool = True,
    unique_keys: bool = True,
) -> ShardInfo:
    """Write `samples` (key -> {ext: bytes}) as one tar at `url`; raises ValueError on bad or repeated keys.
    unique_keys=False lets a key repeat: for ingest's stage tars, read by member offset, never by name."""
    keys: list[str] = []
    components: list[tuple[Component, ...]] = []
    seen: set[str] = set()
    with atomic_writer(url, storage_options) as f:
        for key, parts in samples:
            if not _KEY_RE.match(key) or (unique_keys and key in seen):
                raise ValueError(f"bad or repeated shard key {key!r}")
            if not parts:
                raise ValueError(f"sample {key!r} has no components")
            seen.add(key)
            members = []
            for ext, data in parts.items():
                if not _EXT_RE.match(ext):
                    raise ValueError(f"bad extension {ext!r} for key {key!r}")
                header = _header(f"{key}.{ext}", len(data))
                # Data starts right after this member's header: that is the offset DALI seeks to.
                offset = f.tell() + len(header)
                f.write(header)
                f.write(data)
                f.write(_padding(len(data)))
                members.append(Component(ext, offset, len(data), f"{key}.{ext}"))
            keys.append(key)
            components.append(tuple(members))
        # End of archive as tarfile writes it: two zero blocks, then zeros up to a whole 10 KiB record.
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        f.write(_padding(f.tell(), tarfile.RECORDSIZE))
        num_bytes = f.tell()
        if write_index:
            # Published first: by the time the tar is visible its index is too.
            put_bytes(index_url_for(url), format_index([list(c) for c in components]).encode(), storage_options)
    return ShardInfo(
        url=url,
        index_url=index_url_for(url) if write_index else None,
        num_samples=len(keys),
        num_bytes=num_bytes,
        keys=tuple(keys),
        components=tuple(components),
    )


def _tarfile_header(name: str, size: int) -> bytes:
    """One ustar header block, from tarfile itself (checksum and field encoding stay tarfile's)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _MTIME, 0o444
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


_TEMPLATE = _tarfile_header("", 0)
# The checksum is the byte sum of the header with its own field as spaces: the template's, plus the name and size.
_BASE_SUM = sum(_TEMPLATE[:148]) + 8 * ord(" ") + sum(_TEMPLATE[156:]) - sum(_TEMPLATE[124:136])


def _header(name: str, size: int) -> bytes:
    """tarfile's header for `name` and `size`, made from a template: only the name, the size and the checksum
    differ between members, and TarInfo.tobuf costs ~0.1 ms, four times per sample (stage and shard), ~3% of a
    sample's whole cost. Long names and sizes past the field (8 GiB) go through tarfile."""
    raw = name.encode("ascii")  # keys and extensions are checked against [A-Za-z0-9_-.]
    if len(raw) > 100 or size >= 8**11:
        return _tarfile_header(name, size)
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_BASE_SUM + sum(raw) + sum(size_field))
    return b"".join((raw, bytes(100 - len(raw)), _TEMPLATE[100:124], size_field, _TEMPLATE[136:148], checksum,
                     _TEMPLATE[156:]))


def _padding(size: int, block: int = tarfile.BLOCKSIZE) -> bytes:
    return b"\0" * (-size % block)
