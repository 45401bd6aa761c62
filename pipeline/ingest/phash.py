"""64-bit DCT perceptual hash (the pHash of Zauner 2010, as popularised by imagehash), with numpy only.

32x32 box-averaged thumbnail -> greyscale -> 2-D DCT-II -> the 8x8 lowest frequencies -> one bit per coefficient,
set where it exceeds their median. Low frequencies survive re-encoding, resizing and small colour shifts, so
near-duplicates differ in a handful of bits while unrelated images differ in about 32. The thumbnail comes first
(box averaging and the luma weights are both linear, so the order only moves rounding) and is made by an integer
Image.reduce then a box resize (reducing_gap): the greyscale conversion touches 1,024 pixels instead of all of them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_THUMB = 32
_LOW = 8
# The 8 lowest rows of the unnormalised DCT-II matrix (scipy.fft.dct's convention): coefficients = D @ X @ D.T.
# Two small matmuls instead of scipy.fft, whose import alone costs each worker process about half a second.
_DCT = 2 * np.cos(np.pi * np.outer(np.arange(_LOW), 2 * np.arange(_THUMB) + 1) / (2 * _THUMB))


def phash(img: Image.Image) -> int:
    """pHash of `img` (any mode) as an unsigned 64-bit int; bit 63 is coefficient (0, 0)."""
    if img.mode not in ("L", "RGB"):  # palette and 1-bit images would be resized with NEAREST
        img = img.convert("RGB")
    grey = img.resize((_THUMB, _THUMB), Image.Resampling.BOX, reducing_gap=2.0).convert("L")
    coeffs = _DCT @ np.asarray(grey, dtype=np.float64) @ _DCT.T
    bits = (coeffs > np.median(coeffs)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
