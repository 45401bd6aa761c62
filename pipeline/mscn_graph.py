"""MSCN in the DALI graph: the high-pass filter and the pixel masks, on the pipeline's device (GPU or CPU).

High-pass (MSCN Sec. 4.3): x - GaussianBlur(x, sigma), in float, so masked (zero) and noise-filled areas leave no
parasitic edges for the ConvNet's first layer. A flat region comes out exactly 0, the "null information" value.

Masks: the host draws tiny inputs per masked copy (mscn_params.py: a [g, g, 3] cell grid and a focal box as row and
column spans); DALI upsamples the grid with nearest-neighbour resize and multiplies by the spans (broadcast), giving
keep [3, S, S] uint8 (1 = visible). Masks are built in output coordinates, after the flip, so they line up with the
view as handed out. The noise fill (view where keep, N(0, std) elsewhere) happens on the device in torch
(mscn_fill.py): DALI's random operators take only a build-time seed, which a resumed run cannot restore.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from pipeline.config import MSCNMaskConfig
from pipeline.dali_calls import feed_array
from pipeline.mscn_params import MaskParams, num_copies

_MASK_FIELDS = ("grid", "rows", "cols")  # MaskParams fields fed per copy, all [.., .., 3] uint8 HWC


def highpass(x, sigma: float):
    """x [H, W, 3] (any type) -> float [H, W, 3]: x minus its Gaussian blur (DALI's kernel, reflect-101 borders)."""
    return x - fn.gaussian_blur(x, sigma=sigma, dtype=types.FLOAT)


def mask_input_name(view: int, copy: int, field: str) -> str:
    return f"view{view}_mask{copy}_{field}"


def keep_mask(view: int, copy: int, size: int, on_gpu: bool):
    """One copy's pixel mask from its fed inputs: [3, S, S] uint8, 1 = keep (visible), 0 = masked."""
    src = {f: fn.external_source(name=mask_input_name(view, copy, f), dtype=types.UINT8, ndim=3, layout="HWC")
           for f in _MASK_FIELDS}
    if on_gpu:
        src = {f: node.gpu() for f, node in src.items()}
    # Nearest neighbour keeps the cells hard-edged and the values 0/1; antialias would blend when downscaling.
    grid = fn.resize(src["grid"], size=[size, size], interp_type=types.INTERP_NN, antialias=False)
    keep = grid * src["rows"] * src["cols"]  # [S,S,3] * [S,1,3] * [1,S,3]: grid cells inside the focal box
    return fn.transpose(keep, perm=[2, 0, 1])


def keep_masks(cfg: MSCNMaskConfig, num_views: int, size: int, on_gpu: bool) -> list:
    """All copies' masks in output order: view 1's num_masks copies, then view 2's one."""
    return [keep_mask(v, c, size, on_gpu) for v in range(num_views) for c in range(num_copies(cfg, v))]


def feed_masks(pipe: Pipeline, parts: list[list[list[MaskParams]]]) -> None:
    """Feed one iteration's host-drawn masks before pipe.run(): per batch of the iteration, [view][copy] as
    mscn_params.draw_batch_masks gives them; each input gets the batches' samples one after the other."""
    for v, copies in enumerate(parts[0]):
        for c in range(len(copies)):
            for f in _MASK_FIELDS:
                arrays = [getattr(part[v][c], f) for part in parts]
                feed_array(pipe, mask_input_name(v, c, f), arrays[0] if len(arrays) == 1 else np.concatenate(arrays),
                           "HWC")
