"""A generated dump of nasty inputs, each with the verdict ingest must reach (KEEP or a rejection reason)."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from skimage import data as skdata

KEEP = "keep"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny IDAT: decoding it would need terabytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def build_corpus(root: Path) -> tuple[list[str], dict[str, str]]:
    """Write the dump under `root`; returns (SOURCE arguments, {source-identity suffix: expected verdict})."""
    astronaut = Image.fromarray(skdata.astronaut())  # 512x512 RGB
    chelsea = Image.fromarray(skdata.chelsea())  # 451x300
    coffee = Image.fromarray(skdata.coffee())  # 600x400
    rocket = Image.fromarray(skdata.rocket())  # 427x640
    dump = root / "dump"
    (dump / "nested" / "deeper").mkdir(parents=True)
    files: dict[str, tuple[bytes, str]] = {
        "nested/astronaut.jpg": (_encode(astronaut, "JPEG", quality=92), KEEP),
        "nested/deeper/astronaut_copy.jpg": (_encode(astronaut, "JPEG", quality=92), "duplicate_exact"),
        "big_coffee.jpg": (_encode(coffee.resize((1800, 1200)), "JPEG", quality=90), KEEP),
        "chelsea.png": (_encode(chelsea, "PNG"), KEEP),
        "chelsea_same_pixels.png": (_encode(chelsea, "PNG", compress_level=1), "duplicate_exact"),
        "chelsea_recompressed.jpg": (_encode(chelsea, "JPEG", quality=60), "keep_or_near"),
        "truncated.jpg": (_encode(rocket, "JPEG", quality=90)[:8000], "truncated"),
        "cmyk.jpg": (_encode(coffee.convert("CMYK"), "JPEG"), KEEP),
        "grey16.png": (_encode(Image.fromarray((np.arange(200 * 150, dtype=np.uint16) * 2).reshape(150, 200)), "PNG"), KEEP),
        "palette_alpha.png": (_palette_with_transparency(), KEEP),
        "animated.gif": (_animated_gif(), KEEP),
        "rotated.jpg": (_exif_rotated(rocket), KEEP),
        "one_pixel.png": (_encode(Image.new("RGB", (1, 1), "red"), "PNG"), "too_small"),
        "not_an_image.jpg": (b"this is plain text pretending to be a JPEG\n" * 10, "undecodable"),
        "empty.jpg": (b"", "empty"),
        "bomb.png": (_bomb_png(100_000, 100_000), "too_many_pixels"),
        "banner.png": (_encode(Image.new("RGB", (1200, 100), "blue"), "PNG"), "extreme_aspect"),
    }
    expected = {}
    for rel, (data, verdict) in files.items():
        (dump / rel).write_bytes(data)
        expected[f"dump/{rel}"] = verdict
    hostile = root / "hostile.tar"
    with tarfile.open(hostile, "w") as tar:
        for name, img in (("../escape.jpg", rocket), ("/etc/absolute.jpg", rocket.rotate(90, expand=True))):
            blob = _encode(img, "JPEG")
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    expected.update({"hostile.tar::../escape.jpg": KEEP, "hostile.tar::/etc/absolute.jpg": KEEP,
                     "hostile.tar::link.jpg": "not_a_regular_file"})
    with zipfile.ZipFile(root / "archive.zip", "w") as archive:
        archive.writestr("../zipped.png", _encode(chelsea.rotate(90, expand=True), "PNG"))
        archive.writestr("folder/", b"")
        archive.writestr("folder/garbage.jpg", b"\xff\xd8\xff garbage")
    expected.update({"archive.zip::../zipped.png": KEEP, "archive.zip::folder/garbage.jpg": "undecodable"})
    table = pa.table({
        "id": ["p0", "p1", "p2"],
        "image": [_encode(astronaut.transpose(Image.FLIP_LEFT_RIGHT), "JPEG"), _encode(coffee.rotate(180), "PNG"), b"\x00junk"],
        "caption": ["a flipped astronaut", "coffee upside down", None],
        "label": [3, 7, 1],
    })
    pq.write_table(table, root / "labelled.parquet")
    expected.update({"labelled.parquet#id=p0": KEEP, "labelled.parquet#id=p1": KEEP,
                     "labelled.parquet#id=p2": "undecodable"})
    return [str(dump), str(hostile), str(root / "archive.zip"), str(root / "labelled.parquet")], expected


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (120, 90), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (30, 20, 90, 70))
    return _encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (100, 80), c) for c in ("red", "green", "blue")]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _exif_rotated(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return _encode(img, "JPEG", exif=exif.tobytes())
