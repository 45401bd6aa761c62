"""Synthetic shards on the loopback S3 server, written with the ingest writer (the same bytes tools/shard.py makes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.ingest.writer import write_shard


def make_jpeg(seed: int) -> bytes:
    """A 64-128 px photo-like JPEG: random coloured shapes on a random background."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(64, 129, size=2))
    im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(8, w)), y0 + int(rng.integers(8, h))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_dataset(prefix: str, num_shards: int, per_shard: int, corrupt: dict[str, bytes | None] | None = None,
                  labelled: bool = True) -> list[str]:
    """Shards shard-000000.tar... under prefix; keys s{shard}_{i}; `corrupt` replaces some keys' JPEG bytes
    (None: the sample has no image at all). Returns all keys in write order."""
    keys = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            key = f"s{s}_{i:03d}"
            jpg = (corrupt or {}).get(key, make_jpeg(1000 * s + i))
            parts = {"json": b"{}"} if jpg is None else {"jpg": jpg, "json": b"{}"}
            if labelled:
                parts["cls"] = str((s * per_shard + i) % 10).encode()
            samples.append((key, parts))
            keys.append(key)
        write_shard(f"{prefix}/shard-{s:06d}.tar", samples)
    return keys


@pytest.fixture(scope="session")
def dataset(s3_server):
    """4 shards x 12 samples, labelled; shared read-only by the tests."""
    prefix = s3_server.make_bucket("pipeline-data") + "/ds"
    keys = write_dataset(prefix, 4, 12)
    return prefix, keys


@pytest.fixture(scope="session")
def shard_writer():
    """The write_dataset helper, as a fixture (tests do not import conftest)."""
    return write_dataset
