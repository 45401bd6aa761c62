"""tools/preview.py end to end: a PNG grid of (original, view1, view2, view1 masked, view2 masked) per sample."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from tools.preview import apply_mask, mask_from_keys


def test_mask_from_keys_masks_exactly_the_largest_keys():
    keys = torch.rand(16)
    mask = mask_from_keys(keys, 0.75)
    assert mask.sum() == 12 and keys[mask].min() > keys[~mask].max()
    img = apply_mask(np.zeros((8, 8, 3), np.uint8), torch.tensor([True, False, False, False]), 4)
    assert (img[:4, :4] == 128).all() and (img[4:] == 0).all() and (img[:4, 4:] == 0).all()


def test_preview_writes_a_grid(dataset, tmp_path, s3_server):
    prefix, _ = dataset
    out = tmp_path / "grid.png"
    subprocess.run([sys.executable, "-m", "tools.preview", prefix + "/shard-{000000..000001}.tar", "--out", str(out),
                    "--patch-size", "8", "--mask-ratio", "0.5", "--img-size", "32", "--num", "3"],
                   check=True, env={**os.environ, **s3_server.env}, cwd=os.path.dirname(os.path.dirname(
                       os.path.dirname(os.path.abspath(__file__)))), timeout=120)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * 32 + 2 * 4, 5 * 32 + 4 * 4, 3)
    masked = grid[:32, 3 * 36 : 3 * 36 + 32]
    grey_patches = sum((masked[r:r + 8, c:c + 8] == 128).all() for r in range(0, 32, 8) for c in range(0, 32, 8))
    assert grey_patches == 8  # round(0.5 * 16) patches of view 1 greyed
    assert not (grid[:32, :32] == 255).all()  # the original was found in the shards


def test_preview_shows_highpass_and_masks_with_mscn(dataset, tmp_path, s3_server):
    prefix, _ = dataset
    out = tmp_path / "mscn.png"
    subprocess.run([sys.executable, "-m", "tools.preview", prefix + "/shard-{000000..000001}.tar", "--out", str(out),
                    "--augment", "mscn_simclr", "--img-size", "32", "--patch-size", "8", "--num", "2"],
                   check=True, env={**os.environ, **s3_server.env}, cwd=os.path.dirname(os.path.dirname(
                       os.path.dirname(os.path.abspath(__file__)))), timeout=120)
    grid = np.asarray(Image.open(out))
    # original, view1/2 high-passed, mask1/2, view1/2 masked
    assert grid.shape == (2 * 32 + 4, 7 * 32 + 6 * 4, 3)
    hp = grid[:32, 36:68].astype(np.float64)
    assert abs(hp.mean() - 128) < 20  # high-passed: centred on mid-grey
    masks = grid[:32 * 2 + 4, 3 * 36 : 3 * 36 + 2 * 32 + 4]
    assert set(np.unique(masks)) <= {0, 255}  # masks are binary (white = masked); gaps are white
