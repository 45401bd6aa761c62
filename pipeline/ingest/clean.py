"""Decode, validate and normalise one image: bytes in, a stored JPEG (or a reasoned rejection) out.

Order matters for cost: size limits are checked from the header before any pixel is decoded (a 100000x100000
PNG costs nothing), and every input is decoded exactly once. A JPEG larger than the stored size is decoded at a
reduced DCT scale: libjpeg scales the DCT by 1/2, 1/4 or 1/8, picking the smallest scale whose result still covers
the target on both sides (Pillow's draft() contract: never smaller than asked), so the shorter side stays
>= max_shorter_side before the final resize and no detail the stored image could hold is lost. That skips most
of the IDCT, upsampling and colour conversion, and leaves a resize of factor < 2, done by OpenCV. libjpeg-turbo
also has 3/8, 5/8, 6/8 and 7/8, not used: their IDCTs have no SIMD code, so on bench/ingest.py's photos a 5/8 or
6/8 decode costs more than a full one and 3/8 the same as 1/2 (the Huffman decoding, ~75% of a 1/2 decode, does
not shrink with the scale); and Pillow's draft offers only 1/2^k, so the two paths would store different bytes.
An upright colour JPEG (the common case) never touches Pillow (`_clean_plain_jpeg`: its header read by one walk
of the segments, decoded by simplejpeg, resized and encoded by OpenCV); other formats, EXIF-rotated, grey and
CMYK JPEGs go through Pillow. Both paths give the same bytes for the same JPEG (libjpeg-turbo, the same scale,
resize and encoder settings; a test checks it). A source JPEG that is RGB, needs no EXIF rotation and no resize
is stored byte for byte (after its one full decode proved it intact).

`pixel_hash` (exact-duplicate identity) hashes the pixels that are stored (in BGR order, whichever library decoded
them), before JPEG encoding, with their size: deterministic for given source bytes, and equal for two files whose
bytes differ but whose pixels do not (EXIF stripped, Huffman tables optimised, progressive re-encoding, a PNG saved
from a decoded JPEG). BLAKE3, truncated to 16 bytes: a cryptographic hash (a crafted collision could otherwise
drop a chosen image as a "duplicate"), ~0.24 ms for the ~1 MB of pixels of a 512 px image against ~0.8 ms for
SHA-256 with SHA extensions. Hashing the stored JPEG bytes instead (~0.1 ms) was measured and not taken: a JPEG
stored byte for byte would then match only byte-identical copies, not the cases above. Caveat: the same picture as
a large JPEG and as a PNG can differ in those pixels because only the JPEG is decoded at a reduced scale; the
perceptual hash (`--dedup near`) catches that case.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from blake3 import blake3
from PIL import Image, ImageOps

from pipeline.ingest.config import CleanConfig
from pipeline.ingest.jpeg_header import JpegHeader, read_jpeg_header
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
    pixel_hash: bytes  # 16 bytes: BLAKE3 of the stored pixels and size, truncated (b"" without dedup)
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
    header = read_jpeg_header(data)
    if header is not None and header.components == 3 and header.orientation == 1:
        cleaned = _clean_plain_jpeg(data, header, cfg, dedup)
        if cleaned is not None:
            return cleaned
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
            rgb = Image.fromarray(_resize(np.asarray(rgb), (tw, th)))
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=cfg.quality)
        stored = buf.getvalue()
    pixel_hash = _pixel_hash(cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR)) if dedup != "none" else b""
    return CleanedImage(stored, rgb.width, rgb.height, w, h, pixel_hash, phash(rgb) if dedup == "near" else 0, copy)


def _clean_plain_jpeg(data: bytes, header: JpegHeader, cfg: CleanConfig, dedup: str) -> CleanedImage | None:
    """The common case, an upright colour JPEG, from bytes to bytes without Pillow: decoded by simplejpeg
    (libjpeg-turbo's TurboJPEG API: the same pixels as cv2.imdecode, ~4% less CPU on bench/ingest.py's photos) at
    the scale Pillow's draft picks, straight into a numpy array that OpenCV resizes and encodes (Pillow's path
    copies the pixels three times). Same stored bytes as Pillow's path. None when libjpeg-turbo refuses it:
    Pillow's path then says why."""
    w, h = header.width, header.height
    _check_header(w, h, cfg)
    if not header.complete:
        raise Rejected("truncated", "the JPEG data ends before its end-of-image marker")
    target = target_size(w, h, cfg.max_shorter_side)
    copy = target == (w, h) and not cfg.reencode
    scale = _dct_scale((w, h), target)
    size = (-(-w // scale), -(-h // scale))
    try:  # strict=False: libjpeg's warnings (e.g. extraneous bytes) pass, as in Pillow and OpenCV
        bgr = simplejpeg.decode_jpeg(data, "BGR", min_width=size[0], min_height=size[1], strict=False)
    except ValueError:
        return None
    if (bgr.shape[1], bgr.shape[0]) != size:
        return None
    if size != target:
        bgr = _resize(bgr, target)
    stored = data if copy else cv2.imencode(".jpg", bgr, (cv2.IMWRITE_JPEG_QUALITY, cfg.quality))[1].tobytes()
    pixel_hash = _pixel_hash(bgr) if dedup != "none" else b""
    ph = phash(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))) if dedup == "near" else 0
    return CleanedImage(stored, target[0], target[1], w, h, pixel_hash, ph, copy)


def _dct_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
    """Pillow's draft rule: the largest of 8, 4, 2, 1 that the size divided by the target still reaches."""
    fit = min(size[0] // target[0], size[1] // target[1])
    return next(s for s in (8, 4, 2, 1) if fit >= s)


def _pixel_hash(bgr: np.ndarray) -> bytes:
    """BLAKE3 of the stored pixels (BGR order, whichever library decoded them) and their size, 16 bytes."""
    digest = blake3(b"px%dx%d:" % (bgr.shape[1], bgr.shape[0]))
    digest.update(np.ascontiguousarray(bgr))
    return digest.digest(length=16)


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's SIMD resize of an [H, W, C] array to size (width, height). After a draft decode the factor left is < 2,
    where bilinear interpolation does not alias and costs ~0.8 ms for a 512 px image against ~9.5 ms for Pillow's
    bicubic (2 dB lower PSNR before encoding, 40.9 vs 42.9 dB against a full-decode Lanczos reference, on
    bench/ingest.py's photos); larger factors (PNGs and other formats, no DCT scaling) are area-averaged, which
    never aliases."""
    interpolation = cv2.INTER_AREA if pixels.shape[1] >= 2 * size[0] else cv2.INTER_LINEAR
    return cv2.resize(pixels, size, interpolation=interpolation)


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
