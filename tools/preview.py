"""See what the model sees: a PNG grid of a few samples through the real loader.

    python -m tools.preview "s3://bucket/ds/shard-{000000..000003}.tar" --out preview.png \
        --patch-size 16 --mask-ratio 0.5 --num 6 [--augment can|mae|simclr|mscn_simclr|mscn_byol] [--img-size 224]

Columns per sample: original (shorter side resized, centre crop), view 1, view 2, view 1 masked, view 2 masked.
Masked patches are greyed. The mask is the one the model builds from the loader's mask keys: the
round(mask_ratio * L) patches with the LARGEST keys are masked (argsort ascending, keep the first L - n; MAE's rule).

With an MSCN preset the masks are the loader's own (pixel masks, not mask keys), and the columns are: original,
view 1 and view 2 high-passed (before masking), the masks of branch 1 and branch 2 (white = masked, per colour
channel: a coloured cell is a channel-independent mask), and the two views as the model gets them (noise-filled).
High-passed images are shown around mid-grey (0 -> 128).
"""

from __future__ import annotations

import argparse
import io
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from pipeline.config import AUGMENT_PRESETS, AugmentConfig, DataConfig
from pipeline.loader import build_loader
from pipeline.counters import Counters
from pipeline.prefetch import BlockFetcher, RetryPolicy
from pipeline.stream import iter_samples
from pipeline.validate import FORMATS
from pipeline.shards import build_plan


def _to_uint8(view: torch.Tensor, aug: AugmentConfig) -> np.ndarray:
    """[3,H,W] normalised -> [H,W,3] uint8."""
    mean = torch.tensor(aug.mean).view(3, 1, 1)
    std = torch.tensor(aug.std).view(3, 1, 1)
    return (view.cpu() * std + mean).clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _highpass_to_uint8(view: torch.Tensor, aug: AugmentConfig) -> np.ndarray:
    """[3,H,W] high-passed, normalised with mean 0 -> [H,W,3] uint8 around mid-grey."""
    std = torch.tensor(aug.std).view(3, 1, 1)
    return (view.cpu() * std + 128).clamp(0, 255).byte().permute(1, 2, 0).numpy()


def keep_to_uint8(keep: torch.Tensor) -> np.ndarray:
    """[3,H,W] bool (True = visible) -> [H,W,3] uint8: 255 where masked, per channel."""
    return ((~keep.cpu()).to(torch.uint8) * 255).permute(1, 2, 0).numpy()


def mask_from_keys(keys: torch.Tensor, ratio: float) -> torch.Tensor:
    """keys [L] -> bool [L], True = masked (removed): the round(ratio * L) largest keys."""
    n_mask = round(ratio * keys.numel())
    order = keys.argsort()
    mask = torch.zeros_like(keys, dtype=torch.bool)
    mask[order[keys.numel() - n_mask :]] = True
    return mask


def apply_mask(img: np.ndarray, mask: torch.Tensor, patch: int) -> np.ndarray:
    side = img.shape[0] // patch
    out = img.copy()
    for i in np.flatnonzero(mask.numpy()):
        r, c = divmod(int(i), side)
        out[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 128
    return out


def _original(jpeg: bytes, size: int) -> np.ndarray:
    im = Image.open(io.BytesIO(jpeg)).convert("RGB")
    s = size / min(im.size)
    im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BILINEAR)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", help="brace pattern, prefix or manifest.parquet URL")
    ap.add_argument("--out", default="preview.png")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--num", type=int, default=6)
    ap.add_argument("--augment", default="can", choices=list(AUGMENT_PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    aug = AugmentConfig.preset(args.augment)
    if aug.mscn is not None:  # the loader also hands out the masks and the unmasked high-passed views
        aug = replace(aug, mscn=replace(aug.mscn, debug_outputs=True))
    cfg = DataConfig(shards=args.shards, batch_size=args.num, img_size=args.img_size, patch_size=args.patch_size,
                     num_views=2, augment=aug, shuffle_buffer=0, workers=1, seed=args.seed, device="auto")
    loader = build_loader(cfg, 0, 1, torch.device("cpu"))
    batch = next(iter(loader))
    loader.close()
    # The originals, read straight from the shards by key (the loader hands out augmented views only).
    wanted, originals = set(batch["keys"]), {}
    plan, _ = build_plan(cfg.sources, 1, cfg.seed, cfg.storage_options)
    fetcher = BlockFetcher(cfg.storage_options, cfg.read_block_bytes, 1, RetryPolicy(), Counters())
    for url in plan.train_shards(0, 0) + plan.all_shards:
        if len(originals) == len(wanted):
            break
        with fetcher.open(url) as f:
            for raw in iter_samples(f):
                name, ext = raw.key.rsplit("/", 1)[-1], next((e for e in FORMATS if e in raw.files), None)
                if name in wanted and ext is not None:
                    originals[name] = _original(raw.files[ext], args.img_size)
    fetcher.close()

    rows = []
    blank = np.full((args.img_size, args.img_size, 3), 255, np.uint8)
    for i, key in enumerate(batch["keys"]):
        if aug.mscn is not None:
            cells = [originals.get(key, blank)]
            cells += [_highpass_to_uint8(batch[f"clean{v}"][i], aug) for v in (1, 2)]
            cells += [keep_to_uint8(batch[f"keep{v}"][i]) for v in (1, 2)]
            cells += [_highpass_to_uint8(batch[f"view{v}"][i], aug) for v in (1, 2)]
        else:
            v1, v2 = _to_uint8(batch["view1"][i], aug), _to_uint8(batch["view2"][i], aug)
            m1 = mask_from_keys(batch["mask_keys1"][i], args.mask_ratio)
            m2 = mask_from_keys(batch["mask_keys2"][i], args.mask_ratio)
            cells = [originals.get(key, blank), v1, v2, apply_mask(v1, m1, args.patch_size),
                     apply_mask(v2, m2, args.patch_size)]
        gap = np.full((args.img_size, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([c for cell in cells for c in (cell, gap)][:-1], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    Image.fromarray(np.concatenate(rows[:-1], axis=0)).save(args.out)
    columns = ("original, view1 high-pass, view2 high-pass, mask1, mask2, view1 masked, view2 masked"
               if aug.mscn is not None else "original, view1, view2, view1 masked, view2 masked")
    print(f"wrote {args.out}: {len(batch['keys'])} samples x ({columns})")


if __name__ == "__main__":
    main()
