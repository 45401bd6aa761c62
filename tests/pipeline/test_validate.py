"""The loader's JPEG header check without Pillow (validate.inspect_image's segment walk) gives Pillow's verdict and
size on the kinds of JPEG it serves, leaves the rest to Pillow, and lets through only files that Pillow's own parsing
refuses but DALI's decoder decodes (checked with DALI itself, on the CPU: its own JPEG parser runs before libjpeg)."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image
from skimage import data as skdata

from pipeline import validate
from pipeline.validate import _inspect_with_pillow, inspect_image


def _jpeg(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_orientation(value: int) -> bytes:
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, value, 0)
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd + b"\0\0\0\0"


def _with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """`data` with a segment inserted after its start-of-image marker."""
    return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def _cut_dqt(data: bytes) -> bytes:
    """The first quantization-table segment one byte longer than its tables (Pillow's open refuses it)."""
    pos = data.index(b"\xff\xdb")
    length = int.from_bytes(data[pos + 2:pos + 4], "big")
    return data[:pos + 2] + struct.pack(">H", length + 1) + data[pos + 4:pos + 2 + length] + b"\0" + data[pos + 2 + length:]


def _dali_decodes(data: bytes) -> bool:
    """Whether DALI's image decoder (CPU) takes `data`: one pipeline of batch 1 per call (a failed one is broken)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        return fn.decoders.image(fn.external_source(name="x", dtype=types.UINT8, ndim=1), device="cpu")

    pipe = decode()
    pipe.build()
    pipe.feed_input("x", [np.frombuffer(data, np.uint8)])
    try:
        pipe.run()
    except RuntimeError:
        return False
    return True


def _long_scan_header(data: bytes) -> bytes:
    """The start-of-scan segment's length set past the end of the file (libjpeg: "Bogus marker length")."""
    pos = data.index(b"\xff\xda")
    return data[:pos + 2] + struct.pack(">H", 0xFFF0) + data[pos + 4:]


def test_the_jpeg_header_walk_gives_pillows_verdict_and_size():
    photo = Image.fromarray(skdata.chelsea())  # 451 x 300
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    plain = _jpeg(photo, quality=90)
    walked = {  # the walk answers these itself: (reason, size)
        "rgb": (plain, (451, 300)),
        "grey": (_jpeg(photo.convert("L")), (451, 300)),
        "progressive": (_jpeg(photo, progressive=True), (451, 300)),
        "exif 6": (_jpeg(photo, exif=_exif_orientation(6)), (300, 451)),  # DALI decodes it rotated
        "exif 1": (_jpeg(photo, exif=_exif_orientation(1)), (451, 300)),
        "restart markers": (_jpeg(photo, restart_marker_blocks=4), (451, 300)),
    }
    deferred = {  # Pillow decides these: the walk does not follow them as Pillow does
        "cmyk": _jpeg(photo.convert("CMYK")),
        "xmp orientation": _jpeg(photo, xmp=xmp),
        "mpo": _jpeg(photo, "MPO", save_all=True, append_images=[photo]),
        "reserved marker": _with_segment(plain, 0x02, b"ab"),
        "jpg marker": _with_segment(plain, 0xC8, b"ab"),
        "cut quantization table": _cut_dqt(plain),
        "scan header past the end": _long_scan_header(plain),
        "tem marker": plain[:2] + b"\xff\x01" + plain[2:],  # libjpeg steps over it; DALI's parser refuses it
    }
    let_through = {  # Pillow's open refuses these, DALI decodes them
        "cut adobe segment": _with_segment(plain, 0xEE, b"Adobe"),
        "cut jfif segment": _with_segment(plain, 0xE0, b"JFIF\0\1"),
    }
    for mode in ("header", "none"):
        for name, (data, size) in walked.items():
            assert inspect_image(data, "jpeg", mode) == (None, size) == _inspect_with_pillow(data, "jpeg", mode), name
        for name, data in deferred.items():
            assert inspect_image(data, "jpeg", mode) == _inspect_with_pillow(data, "jpeg", mode), (name, mode)
    assert inspect_image(deferred["xmp orientation"], "jpeg", "header") == (None, (300, 451))
    for name, data in let_through.items():
        assert _inspect_with_pillow(data, "jpeg", "header") == ("decode_error", None), name
        assert inspect_image(data, "jpeg", "header") == (None, (451, 300)), name
        assert _dali_decodes(data), name
    for name in ("reserved marker", "cut quantization table", "scan header past the end", "tem marker"):
        assert inspect_image(deferred[name], "jpeg", "header") == ("decode_error", None), name
    # Pillow reads no length after 0xC8 and steps over its bytes as junk: taken, as the walk could not tell
    assert inspect_image(deferred["jpg marker"], "jpeg", "header") == (None, (451, 300))
    assert _dali_decodes(plain) and not _dali_decodes(deferred["tem marker"])  # why TEM is Pillow's to refuse
    assert inspect_image(plain[:len(plain) // 2], "jpeg", "header") == ("bad_image", None)  # truncated upload


def test_common_jpegs_never_reach_pillow(monkeypatch):
    photo = Image.fromarray(skdata.chelsea())
    samples = [_jpeg(photo), _jpeg(photo.convert("L")), _jpeg(photo, exif=_exif_orientation(8))]
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(validate.Image, "open", counting_open)
    assert [inspect_image(d, "jpeg", "header")[1] for d in samples] == [(451, 300), (451, 300), (300, 451)]
    assert not opened
    assert inspect_image(samples[0], "jpeg", "decode") == (None, (451, 300)) and len(opened) == 1  # decodes, Pillow
