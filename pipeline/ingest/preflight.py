"""Checks before any work: the output is writable (credentials included) and holds no shards from other arguments."""

from __future__ import annotations

import json
import uuid

from pipeline.ingest.atomic import put_bytes, remove_stale_temporaries, url_to_fs
from pipeline.ingest.layout import Layout
from pipeline.ingest.sources import IngestError

# Files this tool owns under an output prefix: the only ones --overwrite deletes.
_OWNED_PATTERNS = ("shard-*.tar", "shard-*.idx", "shards.parquet", "manifest.parquet", "rejects.parquet", "report.json",
                   "classes.json")


def check_output(layout: Layout, fingerprint: str, overwrite: bool, storage_options: dict,
                 legacy: str | None = None) -> None:
    """Refuses an output made under other arguments (or work formats) unless `overwrite`. `legacy`: this run's
    fingerprint as the version before opt-outs computed it: an output that version finished passes (the caller finds
    its report.json complete), one it left unfinished is refused naming the way to resume it."""
    try:
        fs, root = url_to_fs(layout.output, storage_options)
        probe = f"{layout.work}/.probe-{uuid.uuid4().hex}"
        put_bytes(probe, b"ok", storage_options)
        fs.rm_file(url_to_fs(probe, storage_options)[1])
    except Exception as e:  # noqa: BLE001 - bad credentials, missing bucket, read-only disk: name it and stop
        raise IngestError(f"output {layout.output!r} is not writable: {type(e).__name__}: {_first_line(e)}") from None
    existing = _existing_fingerprint(fs, layout)
    owned = [p for pattern in _OWNED_PATTERNS for p in fs.glob(f"{root}/{pattern}")]
    if overwrite:
        for p in owned:
            fs.rm(p, recursive=True)  # manifest.parquet and rejects.parquet are folders of parts
        if fs.exists(url_to_fs(layout.work, storage_options)[1]):
            fs.rm(url_to_fs(layout.work, storage_options)[1], recursive=True)
    elif existing is not None and existing == legacy != fingerprint:
        if not _finished(fs, layout, legacy):
            raise IngestError(f"output {layout.output!r} was begun by a version of this tool before X-Robots-Tag "
                              "opt-outs (f7b6f19), whose staged work honours none: resume it with "
                              "--opt-out-directives '' (what that version did), or start over with --overwrite")
    elif existing is not None and existing != fingerprint:
        raise IngestError(f"output {layout.output!r} holds shards made with different arguments or by a version of "
                          f"this tool with other work formats (fingerprint {existing}, now {fingerprint}); use another "
                          "--output or pass --overwrite")
    elif existing is None and owned:
        raise IngestError(f"output {layout.output!r} already holds shard files of unknown origin; pass --overwrite")
    remove_stale_temporaries(layout.output, storage_options)


def write_config(layout: Layout, fingerprint: str, public_config: dict, storage_options: dict) -> None:
    body = {"fingerprint": fingerprint, "config": public_config}
    put_bytes(layout.config, json.dumps(body, indent=1).encode(), storage_options)


def _existing_fingerprint(fs, layout: Layout) -> str | None:
    path = url_to_fs(layout.config)[1]
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path))["fingerprint"]


def _finished(fs, layout: Layout, fingerprint: str) -> bool:
    """report.json says the output is final under `fingerprint` (no unit left quarantined, or given up)."""
    path = url_to_fs(layout.report)[1]
    report = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    return report.get("fingerprint") == fingerprint and (not report.get("quarantined")
                                                          or bool(report.get("gave_up_quarantined")))


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""
