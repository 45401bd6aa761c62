"""MSCN masking: host-drawn masks (distributions, purity), the DALI graph (high-pass, pixel masks) on hand-made
images, and the real loader (noise fill, branch asymmetry, multi-masks, eval high-pass, exact resume)."""

from __future__ import annotations

import itertools
import dataclasses
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import augment
from pipeline.config import AugmentConfig, DataConfig, MSCNMaskConfig, data_config_from_dict
from pipeline.ingest.writer import write_shard
from pipeline.loader import build_loader
from pipeline.mscn_graph import feed_masks
from pipeline.mscn_params import draw_batch_masks, draw_masks, keep_pixels, mask_rng
from pipeline.view_params import NO_BLUR_SIGMA, draw_batch, pack_params

N, S = 4000, 32
CFG = MSCNMaskConfig(grid_cell=8, mask_prob=(0.2, 0.5))


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ----- host-side draws ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("branch", [0, 1])
def test_masks_cover_the_configured_fraction(branch):
    p = CFG.mask_prob[branch]
    m = draw_masks(N, S, CFG, branch, mask_rng(0, 0, 3, branch, 0))
    keep = keep_pixels(m, S)  # [N, S, S, 3], 1 = visible
    masked = 1.0 - keep.reshape(N, -1).mean(1)
    # Mask type and channel mode shares (binomial sd at n=4000 is < 0.008).
    assert abs(m.focal.mean() - CFG.focal_p) < 0.03 and abs(m.independent.mean() - CFG.channel_independent_p) < 0.03
    # Grid masks: each cell masked with p; focal masks keep a box of area (1 - p): both remove p on average.
    assert abs(masked[~m.focal].mean() - p) < 0.02 and abs(masked[m.focal].mean() - p) < 0.02
    assert (m.grid[m.focal] == 1).all() and (m.rows[~m.focal] == 1).all() and (m.cols[~m.focal] == 1).all()
    # A focal mask is one box kept at its place: inside the view, the rest masked.
    top, left, h, w = (m.box[m.focal][..., i] for i in range(4))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= S).all() and (left + w <= S).all()
    np.testing.assert_array_equal(keep[m.focal].sum((1, 2)), h * w)
    # Channel-independent masks differ between channels; shared ones are identical.
    same = (keep == keep[..., :1]).all((1, 2, 3))
    assert same[~m.independent].all() and (~same[m.independent]).mean() > 0.95


def test_branches_differ_and_draws_are_a_pure_function_of_the_batch():
    a = draw_batch_masks(64, S, MSCNMaskConfig(grid_cell=8, num_masks=3), 2, 5, 1, 9)
    b = draw_batch_masks(64, S, MSCNMaskConfig(grid_cell=8, num_masks=3), 2, 5, 1, 9)
    assert [len(c) for c in a] == [3, 1]  # multi-masks of view 1 only
    for ca, cb in zip(a, b):
        for x, y in zip(ca, cb):
            for f in dataclasses.fields(x):
                np.testing.assert_array_equal(getattr(x, f.name), getattr(y, f.name))
    flat = [m for c in a for m in c]
    keys = [keep_pixels(m, S).tobytes() for m in flat] + [keep_pixels(draw_batch_masks(
        64, S, CFG, 1, 5, 1, 10)[0][0], S).tobytes()]
    assert len(set(keys)) == len(keys) and len({m.noise_seed for m in flat}) == len(flat)
    # Asymmetry: branch 2 masks more than branch 1 (0.5 vs 0.2).
    m1, m2 = (draw_masks(N, S, CFG, br, mask_rng(0, 0, 0, br, 0)) for br in (0, 1))
    masked1, masked2 = (1.0 - keep_pixels(m, S).mean() for m in (m1, m2))
    assert masked2 > masked1 + 0.25


def test_presets_and_yaml_overrides():
    for name in ("mscn_simclr", "mscn_byol"):
        aug = AugmentConfig.preset(name)
        assert aug.mscn == MSCNMaskConfig() and aug.mscn.highpass_sigma == 5.0 and aug.mscn.grid_cell == 32
        assert aug.mscn.focal_p == 0.4 and aug.mscn.channel_independent_p == 0.8 and aug.mscn.num_masks == 1
        assert aug.mscn.mask_prob[0] != aug.mscn.mask_prob[1] and aug.mscn.noise_std[0] != aug.mscn.noise_std[1]
    assert AugmentConfig.preset("can").mscn is None
    cfg = data_config_from_dict({"augment": {"preset": "mscn_byol", "mscn": {"num_masks": 2, "noise_std": [0.1, 1]}}})
    assert cfg.augment.mscn.num_masks == 2 and cfg.augment.mscn.noise_std == (0.1, 1)
    assert cfg.augment.saturation == AugmentConfig.preset("mscn_byol").saturation


# ----- the DALI graph on hand-made images -----------------------------------------------------------------------


def test_dali_highpass_is_zero_on_flat_regions_and_masks_match_the_host():
    """64 x 64 image: flat 60 on the left 48 columns, flat 200 on the right. Pixels more than 3 sigma (15 px) from the
    step are exactly flat, so the high-pass is 0 there (train and eval); at the step it is not. grid_cell 24 does not
    divide 64 (3 cells of 21.3 px): DALI's masks must still equal the host reference."""
    size = 64
    img = np.full((size, size, 3), 60, np.uint8)
    img[:, 48:] = 200
    mscn = MSCNMaskConfig(grid_cell=24, num_masks=2, mask_prob=(0.3, 0.6))
    aug = dataclasses.replace(AugmentConfig(), mscn=mscn)
    pipe = augment.train_pipeline(4, size, 2, aug, None, 1, 1)
    sizes = [(size, size)] * 4
    views = [dataclasses.replace(
        p, roi_start=np.zeros((4, 2), np.float32), roi_end=np.ones((4, 2), np.float32), mirror=np.zeros(4, np.int32),
        brightness=np.ones(4, np.float32), contrast=np.ones(4, np.float32), saturation=np.ones(4, np.float32),
        hue=np.zeros(4, np.float32), sigma=np.full(4, NO_BLUR_SIGMA, np.float32))
        for p in draw_batch(sizes, aug, 2, 16, 0, 0, 0)]
    masks = draw_batch_masks(4, size, mscn, 2, 0, 0, 0)
    jpeg = np.frombuffer(_jpeg(img), np.uint8)
    augment.feed_images(pipe, [jpeg] * 4, [len(jpeg)] * 4)
    augment.feed_params(pipe, pack_params(aug, views))
    feed_masks(pipe, [masks])
    out = [np.array(o.as_tensor()) for o in pipe.run()]
    assert len(out) == 2 + 3  # two views, then keep masks: view 1 x 2 copies, view 2 x 1
    for view in out[:2]:  # [4, 3, S, S] float32
        assert np.abs(view[..., :32]).max() < 1e-4
        assert np.abs(view[..., 44:52]).max() > 0.5  # the step survives the filter
    expected = [keep_pixels(m, size).transpose(0, 3, 1, 2) for copies in masks for m in copies]
    for got, want in zip(out[2:], expected):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
    ev = augment.eval_pipeline(1, size, aug, None, 1, 1)
    jpeg = np.frombuffer(_jpeg(np.pad(img, ((0, 0), (0, 8), (0, 0)), mode="edge")), np.uint8)
    augment.feed_images(ev, [jpeg], [len(jpeg)])
    (e,) = [np.array(o.as_tensor()) for o in ev.run()]
    assert e.shape == (1, 3, size, size) and np.abs(e[..., :24]).max() < 1e-4 and np.abs(e).max() > 0.5


# ----- the real loader ------------------------------------------------------------------------------------------

B, IMG = 8, 32
MSCN = MSCNMaskConfig(grid_cell=8, mask_prob=(0.2, 0.6), noise_std=(0.5, 1.5), num_masks=3, debug_outputs=True)


@pytest.fixture(scope="module")
def constant_shard(s3_server):
    """One shard of 16 constant-colour 48 x 40 JPEGs (flat colours survive JPEG exactly)."""
    url = s3_server.make_bucket("mscn-const") + "/shard-000000.tar"
    rng = np.random.default_rng(0)
    samples = [(f"c{i:02d}", {"jpg": _jpeg(np.full((40, 48, 3), rng.integers(30, 220, 3), np.uint8)), "json": b"{}"})
               for i in range(16)]
    write_shard(url, samples)
    return url


def _cfg(shards: str, mscn: MSCNMaskConfig, **kw) -> DataConfig:
    aug = dataclasses.replace(AugmentConfig.preset("mscn_simclr"), mscn=mscn)
    base = dict(shards=shards, batch_size=B, img_size=IMG, patch_size=8, shuffle_buffer=0, workers=1, device="cpu",
                seed=0, augment=aug)
    return DataConfig(**{**base, **kw})


def _take(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


def test_loader_fills_masks_with_each_branchs_noise(constant_shard):
    """Constant images high-pass to 0, so masked pixels hold the noise alone: its std is the branch's noise_std, and
    the masked share is the branch's mask probability. Extra copies are view 1 under fresh masks."""
    loader = build_loader(_cfg(constant_shard, MSCN), 0, 1, torch.device("cpu"))
    batches = _take(loader, 2)
    loader.close()
    b0 = batches[0]
    assert {"view1", "view2", "views_extra", "keep1", "keep2", "keep_extra", "clean1", "clean2"} <= set(b0)
    assert b0["views_extra"].shape == (B, 2, 3, IMG, IMG) and b0["views_extra"].dtype == torch.float32
    assert b0["keep_extra"].shape == (B, 2, 3, IMG, IMG) and b0["keep1"].dtype == torch.bool
    cat = {k: torch.cat([b[k] for b in batches]) for k in b0 if k not in ("keys", "labels")}
    for v, (p, std) in enumerate(zip(MSCN.mask_prob, MSCN.noise_std), start=1):
        view, keep, clean = cat[f"view{v}"], cat[f"keep{v}"], cat[f"clean{v}"]
        assert clean.abs().max() < 1e-4  # high-pass of a flat image
        assert torch.equal(view[keep], clean[keep])  # visible pixels untouched
        noise = view[~keep]
        assert abs(noise.std().item() - std) < 0.05 * std and abs(noise.mean().item()) < 0.05 * std
        assert abs((~keep).float().mean().item() - p) < 0.1
    extra, keep_extra = cat["views_extra"], cat["keep_extra"]
    for j in range(2):
        assert not torch.equal(keep_extra[:, j], cat["keep1"])
        assert torch.equal(extra[:, j][keep_extra[:, j]], cat["clean1"][keep_extra[:, j]])
        assert abs(extra[:, j][~keep_extra[:, j]].std().item() - MSCN.noise_std[0]) < 0.05 * MSCN.noise_std[0]
    # Eval: high-passed (0 on flat images), never masked.
    ev = build_loader(_cfg(constant_shard, MSCN, mode="eval"), 0, 1, torch.device("cpu"))
    eb = next(iter(ev))
    ev.close()
    assert set(eb) == {"view1", "keys", "labels"} and eb["view1"].abs().max() < 1e-4


def test_train_resume_is_exact_with_mscn(dataset):
    """test_loader's resume pattern with the mscn_simclr preset and multi-masks: kill at batch 3, resume for 3."""
    prefix, _ = dataset
    cfg = _cfg(prefix, MSCNMaskConfig(grid_cell=8, num_masks=2), shuffle_buffer=16, workers=2)
    ref = build_loader(cfg, 0, 1, torch.device("cpu"))
    uninterrupted = _take(ref, 6)
    ref.close()
    first = build_loader(cfg, 0, 1, torch.device("cpu"))
    head = _take(first, 3)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    first.close()
    resumed = build_loader(cfg, 0, 1, torch.device("cpu"))
    resumed.load_state_dict(state)
    tail = _take(resumed, 3)
    resumed.close()
    got = head + tail
    assert "views_extra" in got[0] and "keep1" not in got[0]
    for x, y in zip(got, uninterrupted, strict=True):
        assert set(x) == set(y) and x["keys"] == y["keys"]
        for k in x:
            if k != "keys":
                assert torch.equal(x[k], y[k]), k
    # The masks really change from batch to batch (the fill is not a constant pattern).
    assert not torch.equal(got[0]["view1"], got[1]["view1"])
