"""64-bit DCT perceptual hash (the pHash of Zauner 2010, as popularised by imagehash), with numpy/scipy only.

Greyscale -> 32x32 box-averaged thumbnail -> 2-D DCT-II -> the 8x8 lowest frequencies -> one bit per coefficient,
set where it exceeds their median. Low frequencies survive re-encoding, resizing and small colour shifts, so
near-duplicates differ in a handful of bits while unrelated images differ in about 32.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn

_THUMB = 32
_LOW = 8


def phash(img: Image.Image) -> int:
    """pHash of `img` (any mode) as an unsigned 64-bit int; bit 63 is coefficient (0, 0)."""
    grey = img.convert("L").resize((_THUMB, _THUMB), Image.Resampling.BOX)
    coeffs = dctn(np.asarray(grey, dtype=np.float64), type=2)[:_LOW, :_LOW]
    bits = (coeffs > np.median(coeffs)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
