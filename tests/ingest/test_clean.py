"""clean_image and phash invariants: limits checked from the header, draft decode sizes, the fast JPEG path's
agreement with Pillow's, pHash distances."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from pipeline.ingest.clean import Rejected, clean_image, target_size
from pipeline.ingest.config import CleanConfig
from pipeline.ingest.jpeg_header import read_jpeg_header
from pipeline.ingest.phash import _DCT, hamming, phash


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    return _save(img, "JPEG", **kw)


def test_target_size_never_upscales():
    assert target_size(300, 200, 512) == (300, 200)
    assert target_size(2048, 1024, 512) == (1024, 512)
    assert target_size(2048, 1024, 0) == (2048, 1024)


def test_draft_decode_stores_exact_target_size_and_is_deterministic():
    big = Image.fromarray(skdata.astronaut()).resize((2000, 1500))
    data = _jpeg(big, quality=90)
    a, b = clean_image(data, CleanConfig()), clean_image(data, CleanConfig())
    assert (a.width, a.height) == (683, 512) and not a.copied
    assert a.jpeg == b.jpeg and a.pixel_hash == b.pixel_hash


def test_draft_decode_keeps_quality_of_a_full_decode():
    """DCT scaling (here 1/4) then bicubic stays close to full decode + Lanczos, at the exact target size."""
    big = Image.fromarray(skdata.coffee()).resize((2200, 2100), Image.Resampling.BICUBIC)
    data = _jpeg(big, quality=95)
    stored = Image.open(io.BytesIO(clean_image(data, CleanConfig()).jpeg)).convert("RGB")
    assert stored.size == (536, 512)
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize(stored.size, Image.Resampling.LANCZOS)
    mse = np.mean((np.asarray(stored, np.float64) - np.asarray(reference, np.float64)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 35


def test_reencode_flag_disables_byte_copy():
    data = _jpeg(Image.fromarray(skdata.chelsea()))
    assert clean_image(data, CleanConfig()).jpeg == data
    assert clean_image(data, CleanConfig(reencode=True)).jpeg != data


@pytest.mark.parametrize("size,reason", [((50, 200), "too_small"), ((600, 100), "extreme_aspect")])
def test_limits(size, reason):
    with pytest.raises(Rejected) as info:
        clean_image(_jpeg(Image.new("RGB", size)), CleanConfig())
    assert info.value.reason == reason


def test_phash_separates_near_from_different():
    cat = Image.fromarray(skdata.chelsea())
    assert hamming(phash(cat), phash(cat.resize((200, 133)))) <= 4
    assert hamming(phash(cat), phash(Image.fromarray(skdata.coffee()))) > 16


def test_phash_dct_matches_scipy_reference():
    from scipy.fft import dctn

    thumb = np.random.default_rng(0).integers(0, 256, (32, 32)).astype(np.float64)
    assert np.allclose(_DCT @ thumb @ _DCT.T, dctn(thumb, type=2)[:8, :8])


def _fast_and_pillow(data: bytes, cfg: CleanConfig, monkeypatch) -> tuple:
    """clean_image of `data` as it runs, and with the fast JPEG path switched off (Pillow's path decides)."""
    from pipeline.ingest import clean

    fast = clean_image(data, cfg, "exact")
    with monkeypatch.context() as patch:
        patch.setattr(clean, "_clean_plain_jpeg", lambda *args: None)
        return fast, clean_image(data, cfg, "exact")


def test_fast_jpeg_path_equals_pillow_path_and_keeps_the_truncated_verdict(monkeypatch):
    """An upright colour JPEG skips Pillow (header walk, simplejpeg decode, OpenCV resize and encode); its stored
    bytes and pixel hash must be those of the Pillow path, a cut file must still be "truncated" (libjpeg-turbo
    would fill it grey), and data appended after the end-of-image marker must not count as damage."""
    data = _jpeg(Image.fromarray(skdata.astronaut()).resize((1200, 900)), quality=90)
    fast, slow = _fast_and_pillow(data, CleanConfig(), monkeypatch)
    assert (fast.width, fast.height) == (683, 512)
    assert fast.jpeg == slow.jpeg and fast.pixel_hash == slow.pixel_hash
    for cut in (len(data) // 2, len(data) - 2):
        assert read_jpeg_header(data[:cut]).complete is False  # judged before decoding: decoders differ here
        with pytest.raises(Rejected) as info:
            clean_image(data[:cut], CleanConfig())
        assert info.value.reason == "truncated"
    assert read_jpeg_header(data + b"\xff\xd8 appended picture").complete is True
    assert clean_image(data + b"\xff\xd8 appended picture", CleanConfig(), "exact").jpeg == fast.jpeg


def _exif(order: str, entries: list[tuple[int, int, int, int]]) -> bytes:
    """A TIFF block with one IFD of (tag, type, count, value) entries, as it follows "Exif\\0\\0" in APP1."""
    e = "<" if order == "little" else ">"
    ifd = struct.pack(e + "H", len(entries)) + b"".join(struct.pack(e + "HHIHH", *entry, 0) for entry in entries)
    return (b"II*\0" if order == "little" else b"MM\0*") + struct.pack(e + "I", 8) + ifd + b"\0\0\0\0"


def test_jpeg_header_reads_orientation_as_pillow_does_and_defers_the_unusual():
    """The header walk agrees with Pillow's getexif on plain EXIF blocks in both byte orders, rotated ones still get
    rotated, and an EXIF block it does not follow (orientation stored as LONG) leaves the decision to Pillow."""
    from pipeline.ingest.clean import _orientation

    photo = Image.fromarray(skdata.chelsea())  # 451x300: stored byte for byte when upright
    width_tag = (0x0100, 3, 1, 451)  # an unrelated tag before the orientation, as cameras write it
    for order in ("little", "big"):
        for value in (1, 6):
            data = _jpeg(photo, quality=90, exif=b"Exif\0\0" + _exif(order, [width_tag, (0x0112, 3, 1, value)]))
            assert read_jpeg_header(data).orientation == value == _orientation(Image.open(io.BytesIO(data)))
            cleaned = clean_image(data, CleanConfig(), "exact")
            assert (cleaned.width, cleaned.height) == ((451, 300) if value == 1 else (300, 451))
            assert cleaned.copied == (value == 1)
    assert read_jpeg_header(_jpeg(photo)).orientation == 1  # no EXIF at all
    odd = _jpeg(photo, exif=b"Exif\0\0" + _exif("little", [(0x0112, 4, 1, 6)]))
    assert read_jpeg_header(odd) is None and _orientation(Image.open(io.BytesIO(odd))) == 6
    assert (clean_image(odd, CleanConfig(), "exact").width, clean_image(odd, CleanConfig()).height) == (300, 451)


def _xmp(attribute: bytes) -> bytes:
    """An XMP packet whose one rdf:Description carries `attribute`, as editors write it."""
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
            b'xmlns:hdrgm="http://ns.adobe.com/hdr-gain-map/1.0/" ' + attribute + b"/></rdf:RDF></x:xmpmeta>")


def test_jpeg_header_defers_xmp_orientation_and_extra_frames_to_pillow(monkeypatch):
    """What Pillow reads beyond EXIF, the fast path must store alike: XMP's tiff:Orientation counts when EXIF has no
    orientation tag (files from editors that strip EXIF but keep XMP), and a JPEG with an MPF index of several frames
    is an MPO to Pillow, re-encoded so its extra frames are not stored, unless its XMP says Ultra HDR (hdrgm), which
    Pillow opens as a JPEG and stores byte for byte."""
    photo = Image.fromarray(skdata.chelsea())  # 451x300: stored byte for byte when upright
    frames = {"save_all": True, "append_images": [photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]}
    rotated = _xmp(b'tiff:Orientation="6"')
    no_tag, upright = (b"Exif\0\0" + _exif("little", [entry]) for entry in [(0x0100, 3, 1, 451), (0x0112, 3, 1, 1)])
    cases = {  # name: (bytes, stored size at max_shorter_side 512, stored byte for byte)
        "xmp 6": (_jpeg(photo, xmp=rotated), (300, 451), False),
        "exif without orientation, xmp 6": (_jpeg(photo, exif=no_tag, xmp=rotated), (300, 451), False),
        "exif 1, xmp 6": (_jpeg(photo, exif=upright, xmp=rotated), (451, 300), True),  # EXIF's tag wins
        "mpo": (_save(photo, "MPO", **frames), (451, 300), False),
        "ultra hdr": (_save(photo, "MPO", xmp=_xmp(b'hdrgm:Version="1.0"'), **frames), (451, 300), True),
    }
    for name, (data, size, copied) in cases.items():
        for cfg in (CleanConfig(), CleanConfig(max_shorter_side=256)):
            fast, slow = _fast_and_pillow(data, cfg, monkeypatch)
            assert (fast.jpeg, fast.pixel_hash) == (slow.jpeg, slow.pixel_hash), (name, cfg.max_shorter_side)
        assert ((fast.width, fast.height), fast.copied) == (target_size(*size, 256), False)
        cleaned = clean_image(data, CleanConfig(), "none")
        assert ((cleaned.width, cleaned.height), cleaned.copied) == (size, copied), name
    # Only what Pillow would read differently leaves the fast path: an Ultra HDR file and an upright EXIF tag stay.
    assert read_jpeg_header(cases["ultra hdr"][0]) is not None and read_jpeg_header(cases["exif 1, xmp 6"][0])


def test_a_tem_marker_is_rejected_as_dali_refuses_it():
    """TEM (0xFF01) has no length and libjpeg steps over it, but DALI's own JPEG parser fails the whole batch on it:
    the header walk leaves it to Pillow, which refuses it, so such a file is rejected, never stored."""
    data = _jpeg(Image.fromarray(skdata.chelsea()), quality=90)
    tem = data[:2] + b"\xff\x01" + data[2:]
    assert read_jpeg_header(tem) is None
    with pytest.raises(Rejected) as info:
        clean_image(tem, CleanConfig(), "exact")
    assert info.value.reason == "undecodable"
