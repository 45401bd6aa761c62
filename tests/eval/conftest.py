"""Tiny labelled shard sets for the evaluation tests, written with the real shard writer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.ingest.writer import write_shard

# Three classes told apart by colour alone: a linear probe on almost any features separates them.
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def colour_jpeg(rng: np.random.Generator, label: int, size: int = 32) -> bytes:
    base = np.array(COLOURS[label], dtype=np.float32)
    img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_colour_shards(out: Path, num_shards: int, per_shard: int, seed: int, prefix: str) -> str:
    """Writes OUT/shard-00000K.tar with KEY.jpg, KEY.json, KEY.cls; returns the brace pattern."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            label = int(rng.integers(len(COLOURS)))
            key = f"{prefix}{s:02d}{i:04d}"
            samples.append((key, {"jpg": colour_jpeg(rng, label), "json": json.dumps({"key": key}).encode(),
                                  "cls": str(label).encode()}))
        write_shard(str(out / f"shard-{s:06d}.tar"), samples)
    return str(out / f"shard-{{000000..{num_shards - 1:06d}}}.tar")


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory) -> dict[str, str]:
    """{"train": pattern, "val": pattern}: 4 x 12 training and 2 x 12 validation 32 px images in 3 colour classes."""
    root = tmp_path_factory.mktemp("colour_shards")
    return {
        "train": write_colour_shards(root / "train", num_shards=4, per_shard=12, seed=0, prefix="tr"),
        "val": write_colour_shards(root / "val", num_shards=2, per_shard=12, seed=1, prefix="va"),
    }
