"""Reject bytes DALI would choke on, before they reach it, and read each image's size and format on the way.

DALI's decoder takes JPEG, PNG, WebP, TIFF, JPEG 2000 and BMP (nvImageCodec: JPEG and JPEG 2000 on the GPU, the
others on the CPU; checked on this project's CPU pipeline for each format), and fails the whole iteration on one
undecodable image, so the reader checks each sample in Python first, as cheaply for every format as for JPEGs:
1. structure: the format's signature at the start, and where the format allows it a check of the end that catches
   truncated uploads (the common web fault): JPEG's EOI marker, PNG's IEND chunk, WebP's RIFF length, JPEG 2000's
   end-of-codestream marker, BMP's file size;
2. a header parse (format family, size; no pixel decode): for a colour or grey JPEG, the common case, one walk of
   its segments (pipeline/ingest/jpeg_header.py, ~10 us; what the ingest's cleaning reads too), which leaves to
   Pillow what it does not follow as Pillow does; Pillow's open for the rest (CPU per sample in a loader worker
   went from 164-229 to 110-115 us). Both agree on the size, and the walk refuses or defers every file that
   Pillow's open refuses and DALI refuses too; it lets through a few that only Pillow's own parsing refuses (a cut
   JFIF, ICC, Photoshop or Adobe APP segment), which DALI decodes;
3. "decode" mode only: a decode, at 1/8 scale for JPEG (libjpeg DCT scaling, PIL's draft mode: a few percent of a full
   decode), in full for the others.

The size (width, height as DALI will decode it, i.e. after EXIF orientation) comes from the header parse: the host
draws each view's crop window in pixels from it (view_params.py), as torchvision's RandomResizedCrop does.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from pipeline.ingest.jpeg_header import read_jpeg_header

# Tar member extension -> format. img2dataset writes jpg, png or webp (--encode_format).
FORMATS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp", "tif": "tiff", "tiff": "tiff",
           "jp2": "jpeg2000", "j2k": "jpeg2000", "jpx": "jpeg2000", "bmp": "bmp"}
# PIL's format name for each family (a .jpg that is really a PNG is rejected: DALI would decode it, but the
# writer lied, and the counters should say so).
_PIL_FORMATS = {"jpeg": {"JPEG", "MPO"}, "png": {"PNG"}, "webp": {"WEBP"}, "tiff": {"TIFF"},
                "jpeg2000": {"JPEG2000"}, "bmp": {"BMP"}}
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 mean the stored image is transposed, and DALI's decoder rotates it back
_TRANSPOSED = (5, 6, 7, 8)
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_CODESTREAM = b"\xff\x4f\xff\x51"

Size = tuple[int, int]  # (width, height) in pixels, as decoded


def _intact(data: bytes, fmt: str) -> bool:
    """The format's signature, and its end where the format lets us see truncation."""
    if fmt == "jpeg":  # EOI may be followed by padding some encoders append: look for it in the tail
        return len(data) >= 128 and data.startswith(b"\xff\xd8") and b"\xff\xd9" in data[-64:]
    if fmt == "png":
        return data.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in data[-16:]
    if fmt == "webp":  # RIFF <little-endian length of what follows the first 8 bytes> WEBP
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 8 + int.from_bytes(data[4:8], "little")
    if fmt == "tiff":  # IFD offsets can point anywhere: no cheap end check
        return data[:4] in (b"II*\x00", b"MM\x00*")
    if fmt == "jpeg2000":  # the codestream is the last box of a .jp2, so its EOC marker ends the file
        return (data.startswith(_JP2_SIGNATURE) or data.startswith(_J2K_CODESTREAM)) and b"\xff\xd9" in data[-16:]
    if fmt == "bmp":
        return data[:2] == b"BM" and len(data) >= int.from_bytes(data[2:6], "little")
    raise ValueError(f"unknown image format {fmt!r}")


def _display_size(im: Image.Image) -> Size:
    w, h = im.size
    try:
        if im.getexif().get(_ORIENTATION) in _TRANSPOSED:
            return h, w
    except Exception:  # a broken EXIF block: DALI ignores it too, so the stored size is what gets decoded
        pass
    return w, h


def inspect_image(data: bytes, fmt: str, mode: str = "decode") -> tuple[str | None, Size | None]:
    """(skip reason or None, decoded (width, height) or None when the header cannot be read).

    fmt: a value of FORMATS. mode: "decode" (structure, header, a decode), "header" (structure, header), "none"
    (accept everything; the size is still read when the header parses). Reasons: "bad_image" (structure or format
    wrong), "decode_error" (the header or the decode failed)."""
    if mode != "none" and not _intact(data, fmt):
        return "bad_image", None
    if fmt == "jpeg" and mode != "decode":
        header = read_jpeg_header(data)
        if header is not None and header.components in (1, 3):  # Pillow's L and RGB; CMYK and the odd go below
            transposed = header.orientation in _TRANSPOSED
            return None, (header.height, header.width) if transposed else (header.width, header.height)
    return _inspect_with_pillow(data, fmt, mode)


def _inspect_with_pillow(data: bytes, fmt: str, mode: str) -> tuple[str | None, Size | None]:
    size = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; that is not our fault to report
            with Image.open(io.BytesIO(data)) as im:
                size = _display_size(im)
                if mode == "none":
                    return None, size
                if im.format not in _PIL_FORMATS[fmt]:
                    return "bad_image", None
                if mode == "decode":
                    if fmt == "jpeg":
                        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) for corrupt data
        return (None, size) if mode == "none" else ("decode_error", None)
    return None, size


def decodes_fully(data: bytes) -> bool:
    """A full-size PIL decode: used only to find the culprit after DALI rejected a batch."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
        return True
    except Exception:
        return False
