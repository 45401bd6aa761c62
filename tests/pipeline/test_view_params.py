"""Host-drawn augmentation parameters: their distributions, their determinism, and what DALI does with them."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from PIL import Image

from pipeline import augment
from pipeline.config import AugmentConfig
from pipeline.view_params import NO_BLUR_SIGMA, batch_rng, crop_windows, draw_batch, draw_view, pack_params

AUG = AugmentConfig()
N, L = 4000, 16


def _sizes(n: int, seed: int = 1) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(w), int(h)) for w, h in rng.integers(64, 513, size=(n, 2))]


def test_parameters_follow_the_configured_distributions():
    sizes = _sizes(N)
    p = draw_view(sizes, AUG, L, batch_rng(0, 0, 7, 0))
    wh = np.array(sizes, dtype=np.float64)
    h, w = p.crop_hw[:, 0].astype(np.float64), p.crop_hw[:, 1].astype(np.float64)
    # Crop windows: inside the image, area fraction in crop_scale and aspect w/h in crop_ratio, up to pixel rounding.
    top, left = p.roi_start[:, 0] * wh[:, 1], p.roi_start[:, 1] * wh[:, 0]
    assert (np.round(top) >= 0).all() and (np.round(left) >= 0).all()
    assert (np.round(top) + h <= wh[:, 1]).all() and (np.round(left) + w <= wh[:, 0]).all()
    np.testing.assert_allclose((p.roi_end - p.roi_start) * wh[:, ::-1], p.crop_hw, atol=1e-3)
    area = h * w / (wh[:, 0] * wh[:, 1])
    slack = 2.5 / wh.min(1)  # one pixel of rounding on each side
    assert (area >= AUG.crop_scale[0] - 2 * slack).all() and (area <= 1.0).all()
    assert area.min() < 0.25 and area.max() > 0.9  # the whole range is used, not a corner of it
    ratio = w / h
    assert (ratio >= AUG.crop_ratio[0] - slack).all() and (ratio <= AUG.crop_ratio[1] + slack).all()
    # Probabilities (binomial sd at n=4000 is < 0.008; 0.03 is ~4 sd).
    assert abs(p.mirror.mean() - AUG.flip_p) < 0.03
    assert abs(p.jitter.mean() - AUG.jitter_p) < 0.03
    assert abs(p.gray.mean() - AUG.grayscale_p) < 0.03
    assert abs(p.blur.mean() - AUG.blur_p) < 0.03
    # Strengths when applied, identities when not.
    j = p.jitter
    for name, s in (("brightness", AUG.brightness), ("contrast", AUG.contrast)):
        v = getattr(p, name)
        assert (v[j] >= 1 - s).all() and (v[j] <= 1 + s).all() and v[j].std() > s / 3 and (v[~j] == 1).all()
    sat = p.saturation
    assert (sat[p.gray] == 0).all() and (sat[~p.gray & ~j] == 1).all()
    assert (sat[~p.gray & j] >= 1 - AUG.saturation).all() and (sat[~p.gray & j] <= 1 + AUG.saturation).all()
    assert (np.abs(p.hue[j]) <= AUG.hue * 360).all() and np.abs(p.hue[j]).max() > 30 and (p.hue[~j] == 0).all()
    assert (p.sigma[p.blur] >= AUG.blur_sigma[0]).all() and (p.sigma[p.blur] <= AUG.blur_sigma[1]).all()
    assert (p.sigma[~p.blur] == np.float32(NO_BLUR_SIGMA)).all()
    # Mask keys: U[0, 1), float32, [n, L].
    assert p.mask_keys.shape == (N, L) and p.mask_keys.dtype == np.float32
    assert 0 <= p.mask_keys.min() and p.mask_keys.max() < 1 and abs(p.mask_keys.mean() - 0.5) < 0.01


def test_draws_are_a_pure_function_of_seed_rank_batch_and_view():
    sizes = _sizes(32)
    a, b = draw_batch(sizes, AUG, 2, L, 3, 1, 5), draw_batch(sizes, AUG, 2, L, 3, 1, 5)
    for va, vb in zip(a, b):
        for f in dataclasses.fields(va):
            np.testing.assert_array_equal(getattr(va, f.name), getattr(vb, f.name))
    # The two views, the next batch, another rank and another seed all draw differently.
    others = [a[1], draw_batch(sizes, AUG, 1, L, 3, 1, 6)[0], draw_batch(sizes, AUG, 1, L, 3, 0, 5)[0],
              draw_batch(sizes, AUG, 1, L, 4, 1, 5)[0]]
    for o in others:
        assert not np.array_equal(a[0].roi_start, o.roi_start) and not np.array_equal(a[0].mask_keys, o.mask_keys)


def test_crop_falls_back_to_torchvision_centre_crop():
    # 1000 x 10: no window of area >= 20% fits with aspect <= 4/3, so every sample takes the fallback.
    win = crop_windows([(1000, 10), (10, 1000)], AUG, batch_rng(0, 0, 0, 0))
    assert win.tolist() == [[0, 493, 10, 13], [493, 0, 13, 10]]  # (top, left, h, w) as RandomResizedCrop


def _jpeg(array: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _run(pipe, jpegs, views):
    augment.feed_images(pipe, jpegs, [len(j) for j in jpegs])
    augment.feed_params(pipe, pack_params(AUG, views))
    return [np.array(o.as_tensor()) for o in pipe.run()]


def test_dali_applies_the_host_window_and_identities_are_exact():
    # 64 x 32 image: left half black, right half white. The window over the right half must come out white.
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, 32:] = 255
    rng = np.random.default_rng(0)
    photo = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    jpegs = [_jpeg(img), _jpeg(photo)]
    pipe = augment.train_pipeline(2, 16, 1, AUG, None, 1, 1)
    (p,) = draw_batch([(64, 32), (40, 48)], AUG, 1, L, 0, 0, 0)
    ident = dataclasses.replace(
        p, roi_start=np.array([[0, 0.5], [0, 0]], np.float32), roi_end=np.array([[1, 1], [1, 1]], np.float32),
        mirror=np.zeros(2, np.int32), brightness=np.ones(2, np.float32), contrast=np.ones(2, np.float32),
        saturation=np.ones(2, np.float32), hue=np.zeros(2, np.float32), sigma=np.full(2, NO_BLUR_SIGMA, np.float32))
    (out,) = _run(pipe, jpegs, [ident])
    white = (255 - np.array(AUG.mean)) / np.array(AUG.std)
    np.testing.assert_allclose(out[0].mean((1, 2)), white, atol=0.05)
    # Sample 2, whole window, every stage off: exactly a plain resize + normalise (jitter and blur are identities).
    plain = Pipeline(batch_size=2, num_threads=1, device_id=None)
    with plain:
        x = fn.decoders.image(fn.external_source(name=augment.IMAGE_INPUT, dtype=types.UINT8, ndim=1),
                              device="cpu", output_type=types.RGB)
        plain.set_outputs(fn.crop_mirror_normalize(fn.resize(x, size=[16, 16]), mean=list(AUG.mean),
                                                   std=list(AUG.std), dtype=types.FLOAT, output_layout="CHW"))
    plain.build()
    plain.feed_input(augment.IMAGE_INPUT, jpegs)
    np.testing.assert_array_equal(out[1], np.array(plain.run()[0].as_tensor())[1])
    # Flip: the mirrored window is the same pixels reversed along width.
    (flipped,) = _run(pipe, jpegs, [dataclasses.replace(ident, mirror=np.ones(2, np.int32))])
    np.testing.assert_array_equal(flipped[1], out[1][:, :, ::-1])
    # Grayscale (saturation 0): the three channels carry the same value (before per-channel normalisation).
    (gray,) = _run(pipe, jpegs, [dataclasses.replace(ident, saturation=np.zeros(2, np.float32))])
    pix = gray[1] * np.array(AUG.std)[:, None, None] + np.array(AUG.mean)[:, None, None]
    assert np.abs(pix - pix.mean(0, keepdims=True)).max() < 1.0
