"""Reject bytes DALI would choke on, before they reach it, and read each image's size on the way.

DALI fails the whole iteration on one undecodable JPEG (the decoder raises, the batch is lost), so the reader checks
each sample in Python first: JPEG markers (SOI at the start, EOI near the end: truncated uploads are the common web
fault), then a cheap PIL parse. "decode" mode also decodes at 1/8 scale (libjpeg DCT scaling, PIL's draft mode),
which catches corrupt entropy-coded data for a few percent of a full decode's cost.

The size (width, height as DALI will decode it, i.e. after EXIF orientation) comes from the same header parse: the
host draws each view's crop window in pixels from it (view_params.py), as torchvision's RandomResizedCrop does.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 mean the stored image is transposed, and DALI's decoder rotates it back
_TRANSPOSED = (5, 6, 7, 8)

Size = tuple[int, int]  # (width, height) in pixels, as decoded


def _display_size(im: Image.Image) -> Size:
    w, h = im.size
    try:
        if im.getexif().get(_ORIENTATION) in _TRANSPOSED:
            return h, w
    except Exception:  # a broken EXIF block: DALI ignores it too, so the stored size is what gets decoded
        pass
    return w, h


def inspect_jpeg(data: bytes, mode: str = "decode") -> tuple[str | None, Size | None]:
    """(skip reason or None, decoded (width, height) or None when the header cannot be read).
    mode: "decode" (markers, header, 1/8-scale decode), "header" (markers, header), "none" (accept everything; the
    size is still read when the header parses)."""
    if mode != "none" and (len(data) < 128 or not data.startswith(_SOI) or _EOI not in data[-64:]):
        # EOI may be followed by padding some encoders append, so look for it in the tail rather than at the last byte.
        return "bad_jpeg", None
    size = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; that is not our fault to report
            with Image.open(io.BytesIO(data)) as im:
                size = _display_size(im)
                if mode == "none":
                    return None, size
                if im.format != "JPEG":
                    return "bad_jpeg", None
                if mode == "decode":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
                else:
                    im.verify()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) for corrupt data
        return (None, size) if mode == "none" else ("decode_error", None)
    return None, size


def check_jpeg(data: bytes, mode: str = "decode") -> str | None:
    """Returns None when the bytes look decodable, else the skip reason ("bad_jpeg" or "decode_error")."""
    return inspect_jpeg(data, mode)[0]


def check_jpeg_full(data: bytes) -> bool:
    """Full-size decode: used only to find the culprit after DALI rejected a batch."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
        return check_jpeg(data) is None
    except Exception:
        return False
