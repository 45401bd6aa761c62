"""clusters.png: for the largest top-level clusters (after dedup), thumbnails before curation and after.

"Before" shows the cluster's members in the raw dump (duplicates included), "after" its curated members, each the
first by ordinal hash: the same uniform sample the selection uses, so the picture shows what balancing kept.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from pipeline.curate.balance_stage import BalanceResult
from pipeline.curate.embeddings import EmbeddingSet
from pipeline.curate.records import ordinal_position, ordinal_shard, runs
from pipeline.curate.report import merged_counts
from pipeline.curate.shard_samples import list_samples, read_members

THUMB = 56
LABEL_W = 150
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def draw_grid(emb: EmbeddingSet, balance: BalanceResult, per_row: int, so: dict) -> bytes:
    """PNG bytes: one line per cluster of balance.grid_tops, `per_row` thumbnails before | `per_row` after."""
    top = merged_counts(balance.stats, "top")
    shown = [int(t) for t in balance.grid_tops if top["raw"][t]]
    picks = {t: {side: _first(balance.stats, t, side, per_row) for side in ("before", "after")} for t in shown}
    thumbs = _thumbnails({o for p in picks.values() for side in p.values() for o in side}, emb, so)
    gap = THUMB // 2
    width = LABEL_W + 2 * per_row * THUMB + gap
    canvas = Image.new("RGB", (width, (len(shown) + 1) * THUMB), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((LABEL_W, THUMB // 3), "before (raw dump)", fill="black")
    draw.text((LABEL_W + per_row * THUMB + gap, THUMB // 3), "after (curated)", fill="black")
    for row, t in enumerate(shown, start=1):
        y = row * THUMB
        draw.text((4, y + 4), f"top cluster {t}: {top['raw'][t]}\n-> {top['dedup'][t]} deduplicated\n"
                  f"-> {top['selected'][t]} kept", fill="black")
        for side, x0 in (("before", LABEL_W), ("after", LABEL_W + per_row * THUMB + gap)):
            for j, o in enumerate(picks[t][side]):
                canvas.paste(thumbs[o], (x0 + j * THUMB, y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _first(stats: list[dict], top: int, side: str, n: int) -> list[int]:
    """Ordinals of the n members of top-level cluster `top` with the smallest hashes, over every bucket."""
    cands = [tuple(c) for s in stats for c in s["grid"].get(str(top), {}).get(side, [])]
    return [int(o) for _, o in sorted(cands)[:n]]


def _thumbnails(ordinals: set[int], emb: EmbeddingSet, so: dict) -> dict[int, Image.Image]:
    out = {}
    ords = np.array(sorted(ordinals), dtype=np.int64)
    shard, position = ordinal_shard(ords), ordinal_position(ords)
    for start, end in runs(shard):
        url = emb.shards[int(shard[start])]
        listing = list_samples(url, so)
        wanted = [listing[int(p)] for p in position[start:end]]
        for o, (_, parts) in zip(ords[start:end].tolist(), read_members(url, wanted, so)):
            data = next((parts[e] for e in _IMAGE_EXTS if e in parts), None)
            img = Image.open(io.BytesIO(data)).convert("RGB") if data else Image.new("RGB", (THUMB, THUMB), "grey")
            out[o] = img.resize((THUMB, THUMB), Image.BILINEAR)
    return out
