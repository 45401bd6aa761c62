"""Reject bytes DALI would choke on, before they reach it.

DALI fails the whole iteration on one undecodable JPEG (the decoder raises, the batch is lost), so the reader checks
each sample in Python first: JPEG markers (SOI at the start, EOI near the end: truncated uploads are the common web
fault), then a cheap PIL parse. "decode" mode also decodes at 1/8 scale (libjpeg DCT scaling, PIL's draft mode),
which catches corrupt entropy-coded data for a few percent of a full decode's cost.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"


def check_jpeg(data: bytes, mode: str = "decode") -> str | None:
    """Returns None when the bytes look decodable, else the skip reason ("bad_jpeg" or "decode_error").
    mode: "decode" (markers, header, 1/8-scale decode), "header" (markers, header), "none" (accept everything)."""
    if mode == "none":
        return None
    # EOI may be followed by padding some encoders append, so look for it in the tail rather than at the last byte.
    if len(data) < 128 or not data.startswith(_SOI) or _EOI not in data[-64:]:
        return "bad_jpeg"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; that is not our fault to report
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "JPEG":
                    return "bad_jpeg"
                if mode == "decode":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
                else:
                    im.verify()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) for corrupt data
        return "decode_error"
    return None


def check_jpeg_full(data: bytes) -> bool:
    """Full-size decode: used only to find the culprit after DALI rejected a batch."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
        return check_jpeg(data) is None
    except Exception:
        return False
