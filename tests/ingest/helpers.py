"""Read an ingest output back: every kept sample through Pillow, tarfile, webdataset and DALI (with the .idx); and
an in-process stand-in for the kill hook."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


def verdicts(out: Path) -> dict[str, str]:
    """source identity -> "keep" or rejection reason, for every input."""
    result = {row["source"]: "keep" for row in pq.read_table(out / "manifest.parquet").to_pylist()}
    for row in pq.read_table(out / "rejects.parquet").to_pylist():
        result[row["source"]] = row["reason"]
    return result


def shard_contents(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over all shards, read with tarfile; asserts no key appears twice."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                parts = samples.setdefault(key, {})
                assert ext not in parts, f"{m.name} twice"
                parts[ext] = tar.extractfile(m).read()
    return samples


def check_readable(out: Path) -> dict[str, dict[str, bytes]]:
    import webdataset as wds

    samples = shard_contents(out)
    manifest = {r["key"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert set(samples) == set(manifest)
    for key, parts in samples.items():
        img = Image.open(io.BytesIO(parts["jpg"]))
        img.load()
        meta = json.loads(parts["json"])
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        assert (manifest[key]["width"], manifest[key]["height"]) == img.size
    shards = sorted(out.glob("shard-*.tar"))
    via_wds = {s["__key__"]: s["jpg"] for s in wds.WebDataset([str(s) for s in shards], shardshuffle=False)}
    assert via_wds == {k: p["jpg"] for k, p in samples.items()}
    for shard in shards:
        for jpg, key_json in _dali_read(shard):
            key = json.loads(key_json)["key"]
            assert jpg == samples[key]["jpg"]
    return samples


def _dali_read(shard: Path) -> list[tuple[bytes, bytes]]:
    from nvidia.dali import fn, pipeline_def

    n = int(shard.with_suffix(".idx").read_text().split()[1])

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, meta = fn.readers.webdataset(paths=[str(shard)], index_paths=[str(shard.with_suffix(".idx"))],
                                          ext=["jpg", "json"], missing_component_behavior="error")
        return jpg, meta

    p = pipe()
    p.build()
    jpgs, metas = p.run()
    return [(np.array(jpgs.at(i)).tobytes(), np.array(metas.at(i)).tobytes()) for i in range(n)]


class Killed(Exception):
    """Raised in-process by kill_at's hook where the CLI's test hook would SIGKILL the run."""


def kill_at(phase: str, at: int):
    """A stand-in for phase.maybe_kill / plan.maybe_kill: raises Killed after `at` completed tasks of `phase`."""
    def kill(name: str, completed: int) -> None:
        if name == phase and completed == at:
            raise Killed
    return kill
