"""Every random number of a training batch, drawn on the host: a pure function of (seed, rank, batch index, view).

DALI's own random operators keep a hidden per-operator state that a checkpoint cannot capture, so a resumed run would
draw different augmentations than the uninterrupted one. Here each view of each batch gets its own generator,
np.random.default_rng([seed, rank, batch_index, view]), and the parameters go into the DALI graph as argument inputs
(augment.py). Batch index = position of the batch in this rank's stream (the sampler's counter, part of the loader
state), so batch k has the same augmentations and mask keys however the run got there.

Every draw is made for every sample whatever the probabilities are (a fixed number of numbers per view, in a fixed
order), so the stream of numbers never depends on which branch a sample took, and a stage that is off for a sample
gets its identity parameters (factor 1, hue 0, the near-zero sigma whose kernel is exactly [0, 1, 0]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import AugmentConfig
from pipeline.validate import Size

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 windows, then falls back to a centre crop
# Blur "off": DALI's kernel for this sigma has 3 taps, exp(-1 / (2 * 0.01^2)) underflows to 0, so it is [0, 1, 0],
# the exact identity (checked in tests/pipeline/test_view_params.py).
NO_BLUR_SIGMA = 0.01


@dataclass
class ViewParams:
    """Per-sample parameters of one view of one batch of n samples (float32 unless noted).

    roi_start, roi_end: [n, 2] crop window (y, x) relative to the decoded image, in [0, 1] (the HWC shape order that
        fn.resize expects); the window is a whole number of pixels, drawn as torchvision's RandomResizedCrop.
    mirror: [n] int32, 1 = flip horizontally.
    brightness, contrast, saturation: [n] factors (1 = unchanged; saturation 0 = grayscale); hue: [n] degrees.
    sigma: [n] Gaussian blur sigma in output pixels (NO_BLUR_SIGMA = not blurred).
    mask_keys: [n, L] uniform [0, 1): the model masks the round(ratio * L) largest.
    Also kept for tests and previews: crop_hw [n, 2] int (window height, width in pixels), jitter, gray, blur [n] bool.
    """

    roi_start: np.ndarray
    roi_end: np.ndarray
    mirror: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    sigma: np.ndarray
    mask_keys: np.ndarray
    crop_hw: np.ndarray
    jitter: np.ndarray
    gray: np.ndarray
    blur: np.ndarray

    def take(self, idx: list[int]) -> "ViewParams":
        """The parameters of samples idx only (a batch that lost a sample DALI rejected keeps the others' draws)."""
        return ViewParams(**{k: v[idx] for k, v in vars(self).items()})


def batch_rng(seed: int, rank: int, batch_index: int, view: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, batch_index, view])


def crop_windows(sizes: list[Size | None], aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params, vectorised: [n, 4] int (top, left, height, width) in pixels.

    All 10 attempts are drawn for every sample (then the first valid one is taken) so the numbers consumed do not
    depend on the images. A sample of unknown size gets the whole image: (0, 0, -1, -1)."""
    n = len(sizes)
    wh = np.array([s if s is not None else (1, 1) for s in sizes], dtype=np.float64).reshape(n, 2)
    width, height = wh[:, :1], wh[:, 1:]
    area = width * height * rng.uniform(aug.crop_scale[0], aug.crop_scale[1], size=(n, CROP_ATTEMPTS))
    log_r = np.log(np.asarray(aug.crop_ratio, dtype=np.float64))
    aspect = np.exp(rng.uniform(log_r[0], log_r[1], size=(n, CROP_ATTEMPTS)))
    u_top, u_left = rng.random(n), rng.random(n)
    w = np.round(np.sqrt(area * aspect))  # np.round rounds half to even, as Python's round in torchvision
    h = np.round(np.sqrt(area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(1)
    rows = np.arange(n)
    cw, ch = w[rows, first], h[rows, first]
    width, height = width[:, 0], height[:, 0]
    # Centre-crop fallback (no valid attempt): the largest window whose aspect ratio is clamped into crop_ratio.
    in_ratio = width / height
    fw = np.where(in_ratio < aug.crop_ratio[0], width, np.where(in_ratio > aug.crop_ratio[1],
                                                                  np.round(height * aug.crop_ratio[1]), width))
    fh = np.where(in_ratio < aug.crop_ratio[0], np.round(width / aug.crop_ratio[0]), height)
    found = ok.any(1)
    cw, ch = np.where(found, cw, fw), np.where(found, ch, fh)
    # randint(0, H - h + 1) from one uniform draw: floor(u * (H - h + 1)) is uniform over 0..H-h.
    top = np.where(found, np.floor(u_top * (height - ch + 1)), (height - ch) // 2)
    left = np.where(found, np.floor(u_left * (width - cw + 1)), (width - cw) // 2)
    out = np.stack([top, left, ch, cw], 1).astype(np.int64)
    unknown = np.array([s is None for s in sizes], dtype=bool)
    out[unknown] = (0, 0, -1, -1)
    return out


def _factor(rng: np.random.Generator, n: int, strength: float) -> np.ndarray:
    """torchvision ColorJitter's factor range [max(0, 1 - s), 1 + s]."""
    return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=n)


def draw_view(sizes: list[Size | None], aug: AugmentConfig, num_patches: int, rng: np.random.Generator) -> ViewParams:
    """One view's parameters for samples of the given decoded (width, height) sizes."""
    n = len(sizes)
    win = crop_windows(sizes, aug, rng)
    # Draw order is part of the format: changing it changes every run's augmentations.
    mirror = rng.random(n) < aug.flip_p
    jitter = rng.random(n) < aug.jitter_p
    brightness, contrast, saturation = (_factor(rng, n, s) for s in (aug.brightness, aug.contrast, aug.saturation))
    hue = rng.uniform(-aug.hue * 360.0, aug.hue * 360.0, size=n)
    gray = rng.random(n) < aug.grayscale_p
    blur = rng.random(n) < aug.blur_p
    sigma = rng.uniform(aug.blur_sigma[0], aug.blur_sigma[1], size=n)
    mask_keys = rng.random((n, num_patches), dtype=np.float32)

    wh = np.array([s if s is not None else (1, 1) for s in sizes], dtype=np.float64).reshape(n, 2)
    hw = wh[:, ::-1]
    start = win[:, :2] / hw
    end = (win[:, :2] + win[:, 2:]) / hw
    unknown = win[:, 2] < 0
    start[unknown], end[unknown] = 0.0, 1.0

    def on(mask: np.ndarray, value: np.ndarray, identity: float) -> np.ndarray:
        return np.where(mask, value, identity).astype(np.float32)

    return ViewParams(
        roi_start=start.astype(np.float32), roi_end=end.astype(np.float32), mirror=mirror.astype(np.int32),
        brightness=on(jitter, brightness, 1.0), contrast=on(jitter, contrast, 1.0),
        # Grayscale after the jitter, as torchvision's RandomGrayscale follows ColorJitter: saturation 0 wins.
        saturation=on(jitter, saturation, 1.0) * ~gray, hue=on(jitter, hue, 0.0),
        sigma=on(blur, sigma, NO_BLUR_SIGMA), mask_keys=mask_keys, crop_hw=win[:, 2:], jitter=jitter, gray=gray,
        blur=blur)


def draw_batch(sizes: list[Size | None], aug: AugmentConfig, num_views: int, num_patches: int, seed: int, rank: int,
               batch_index: int) -> list[ViewParams]:
    """All views of one batch; view v uses batch_rng(seed, rank, batch_index, v) and nothing else."""
    return [draw_view(sizes, aug, num_patches, batch_rng(seed, rank, batch_index, v)) for v in range(num_views)]


# ViewParams field -> its number of columns in a view's packed parameter array (pack_params): one float32 row per
# sample; every view's rows are fed as ONE argument input (augment.feed_params) and sliced inside the graph. One
# feed_input per batch instead of one per field and view: each call costs the loader's thread tens of microseconds,
# and that thread is the training process's.
_CROP = {"roi_start": 2, "roi_end": 2, "mirror": 1}
_COLOUR = {"brightness": 1, "contrast": 1, "saturation": 1, "hue": 1}
_BLUR = {"sigma": 1}


def param_fields(aug: AugmentConfig) -> dict[str, int]:
    """The parameters one view needs: stages with probability 0 are left out of the graph (the mae preset)."""
    fields = dict(_CROP)
    if aug.jitter_p > 0 or aug.grayscale_p > 0:
        fields.update(_COLOUR)
    if aug.blur_p > 0:
        fields.update(_BLUR)
    return fields


def param_columns(aug: AugmentConfig) -> dict[str, slice]:
    """Field -> its columns in the packed array."""
    out, start = {}, 0
    for field, width in param_fields(aug).items():
        out[field], start = slice(start, start + width), start + width
    return out


def pack_params(aug: AugmentConfig, views: list[ViewParams]) -> np.ndarray:
    """One batch's host-drawn parameters -> [V, n, K] float32, row i of view v holding sample i's (param_columns)."""
    cols = param_columns(aug)
    packed = np.empty((len(views), len(views[0].mirror), max(c.stop for c in cols.values())), np.float32)
    for v, params in enumerate(views):
        for field, c in cols.items():
            packed[v, :, c] = np.asarray(getattr(params, field), np.float32).reshape(len(params.mirror), -1)
    return packed
