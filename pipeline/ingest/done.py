"""Task completion marks: a task's summary (small JSON), written as its last step, under _ingest/done/PHASE/.

A task reads its mark first and, when present, returns the recorded summary without redoing anything: that is
what makes a task idempotent after a kill. The mark is written only after every output of the task is published.
"""

from __future__ import annotations

import json

from pipeline.ingest.atomic import put_bytes, url_to_fs
from pipeline.ingest.layout import Layout


def read_done(layout: Layout, phase: str, task: int, storage_options: dict) -> dict | None:
    fs, path = url_to_fs(layout.done(phase, task), storage_options)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def mark_done(layout: Layout, phase: str, task: int, summary: dict, storage_options: dict) -> dict:
    put_bytes(layout.done(phase, task), json.dumps(summary).encode(), storage_options)
    return summary
