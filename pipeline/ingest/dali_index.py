"""DALI's webdataset index (`.idx`), byte-compatible with DALI's tools/wds2idx.py (format "v1.2").

    v1.2 <num_samples>
    <ext> <data_offset> <size> <member_name> [<ext> <data_offset> <size> <member_name> ...]   # one line per sample

`data_offset` is the offset of the member's DATA (wds2idx takes tar's header block number and adds one 512-byte
block), not of its header. With index files, `fn.readers.webdataset` seeks straight to each sample instead of
scanning the tar, which is what lets the streaming loader shard by sample.
"""

from __future__ import annotations

from dataclasses import dataclass

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Component:
    """One tar member of a sample: `ext` is everything after the key's first dot ("jpg", "json", "cls")."""

    ext: str
    offset: int  # byte offset of the member's data in the tar
    size: int  # data size in bytes, without the 512-byte padding
    name: str  # full member name, KEY.ext


def format_index(samples: list[list[Component]]) -> str:
    """Index text for a tar whose samples (each a list of adjacent members) appear in this order."""
    if not samples:
        raise ValueError("DALI cannot index an empty webdataset tar")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in components))
    return "\n".join(lines) + "\n"
