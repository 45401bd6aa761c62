"""Decode, validate and normalise one image: bytes in, a stored JPEG (or a reasoned rejection) out.

Order matters for cost: size limits are checked from the header before any pixel is decoded (a 100000x100000
PNG costs nothing), and every input is decoded exactly once. A JPEG larger than the stored size is decoded in
draft mode: libjpeg scales the DCT by 1/2, 1/4 or 1/8, picking the smallest scale whose result still covers the
target on both sides (Pillow's draft() contract: never smaller than asked), so the shorter side stays
>= max_shorter_side before the final resize and no detail the stored image could hold is lost. That skips most
of the IDCT, upsampling and colour conversion, and leaves a resize of factor < 2, done by OpenCV (`_resize`). A source JPEG that is RGB,
needs no EXIF rotation and no resize is stored byte for byte (after its one full decode proved it intact).

`pixel_hash` (exact-duplicate identity) hashes the RGB pixels that are stored, before JPEG encoding, with their
size: deterministic for given source bytes. SHA-256, truncated to 16 bytes, because CPUs with SHA extensions run
it 2-3x faster than hashlib's portable BLAKE2b on the ~1 MB of pixels per image. Caveat: the same picture as a
large JPEG and as a PNG can differ in those pixels because only the JPEG is draft-decoded; the perceptual hash
(`--dedup near`) catches that case.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from pipeline.ingest.config import CleanConfig
from pipeline.ingest.phash import phash

# Transparent pixels are composited onto white: fixed, so the same RGBA input always gives the same RGB output.
BACKGROUND = (255, 255, 255)
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# Pillow's filter for a final resize: the benchmark floor's (bench/ingest.py). tools/shard.py resizes with OpenCV.
RESAMPLE = Image.Resampling.BICUBIC
cv2.setNumThreads(1)  # one image per process at a time: the workers are the parallelism


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail[:300]


@dataclass(frozen=True)
class CleanedImage:
    jpeg: bytes  # stored bytes
    width: int  # stored size
    height: int
    original_width: int  # header size, before EXIF rotation
    original_height: int
    pixel_hash: bytes  # 16 bytes: SHA-256 of stored RGB pixels and size, truncated (b"" without dedup)
    phash: int  # 64-bit perceptual hash of the stored pixels (0 unless dedup is "near")
    copied: bool  # True when `jpeg` is the source file unchanged


def target_size(width: int, height: int, max_shorter_side: int) -> tuple[int, int]:
    """Size with the shorter side at most `max_shorter_side` (0 = unlimited), aspect kept, never upscaled."""
    short = min(width, height)
    if max_shorter_side <= 0 or short <= max_shorter_side:
        return width, height
    scale = max_shorter_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def clean_image(data: bytes, cfg: CleanConfig, dedup: str = "near") -> CleanedImage:
    """Raises Rejected(reason, detail) for anything that must not be stored. Only the hashes `dedup` needs are
    computed ("none": neither, pixel_hash b"" and phash 0; "exact": pixel_hash; "near": both)."""
    if not data:
        raise Rejected("empty", "zero bytes")
    # Pillow's own bomb guard at our limit; we also check the header below, so this only backs it up.
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001 - anything Pillow cannot identify is a rejection, not a crash
        raise Rejected("undecodable", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    _check_header(w, h, cfg)
    orientation = _orientation(img)
    tw, th = target_size(w, h, cfg.max_shorter_side)
    copy = img.format == "JPEG" and img.mode == "RGB" and orientation == 1 and (tw, th) == (w, h) and not cfg.reencode
    if img.format == "JPEG" and (tw, th) != (w, h):
        img.draft("RGB", (tw, th))  # decodes at the smallest 1/2^k scale still >= the target size
    _load(img)
    if copy:
        rgb, stored = img, data
    else:
        rgb = _to_rgb(_apply_orientation(img, orientation))
        if orientation in _ROTATING_ORIENTATIONS:
            tw, th = th, tw
        if rgb.size != (tw, th):
            rgb = _resize(rgb, (tw, th))
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=cfg.quality)
        stored = buf.getvalue()
    pixel_hash = b""
    if dedup != "none":
        digest = hashlib.sha256(b"px%dx%d:" % rgb.size)
        digest.update(rgb.tobytes())
        pixel_hash = digest.digest()[:16]
    return CleanedImage(stored, rgb.width, rgb.height, w, h, pixel_hash, phash(rgb) if dedup == "near" else 0, copy)


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenCV's SIMD resize. After a draft decode the factor left is < 2, where bilinear interpolation does not
    alias and costs ~0.8 ms for a 512 px image against ~9.5 ms for Pillow's bicubic (2 dB lower PSNR before
    encoding, 40.9 vs 42.9 dB against a full-decode Lanczos reference, on bench/ingest.py's photos); larger factors
    (PNGs and other formats, no DCT scaling) are area-averaged, which never aliases."""
    interpolation = cv2.INTER_AREA if img.width >= 2 * size[0] else cv2.INTER_LINEAR
    return Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=interpolation))


def _check_header(w: int, h: int, cfg: CleanConfig) -> None:
    if w * h > cfg.max_pixels:
        raise Rejected("too_many_pixels", f"{w}x{h}")
    if min(w, h) < cfg.min_side:
        raise Rejected("too_small", f"{w}x{h}")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        raise Rejected("extreme_aspect", f"{w}x{h}")


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block means "no rotation", not a rejected image
        return 1
    return value if 1 <= value <= 8 else 1


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated / corrupt pixel data
        reason = "truncated" if "truncat" in str(e) or "broken data stream" in str(e) else "decode_error"
        raise Rejected(reason, f"{type(e).__name__}: {e}") from None


def _apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    if orientation == 1:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001
        raise Rejected("decode_error", f"EXIF transpose failed: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16/32-bit integer greys are rescaled, alpha composited onto BACKGROUND."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 255.0 if img.mode == "F" else 65535.0
        arr = np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")
