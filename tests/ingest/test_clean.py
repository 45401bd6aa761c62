"""clean_image and phash invariants: limits checked from the header, draft decode sizes, pHash distances."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from pipeline.ingest.clean import Rejected, clean_image, target_size
from pipeline.ingest.config import CleanConfig
from pipeline.ingest.phash import _DCT, hamming, phash


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


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


def test_opencv_path_equals_pillow_path_and_keeps_the_truncated_verdict(monkeypatch):
    """An upright colour JPEG goes through OpenCV alone; its stored bytes and pixel hash must be those of the
    Pillow path, a cut file must still be "truncated" (OpenCV would decode it grey), and data appended after the
    end-of-image marker must not count as damage."""
    from pipeline.ingest import clean

    data = _jpeg(Image.fromarray(skdata.astronaut()).resize((1200, 900)), quality=90)
    fast = clean_image(data, CleanConfig(), "exact")
    monkeypatch.setattr(clean, "_clean_plain_jpeg", lambda *args: None)
    slow = clean_image(data, CleanConfig(), "exact")
    monkeypatch.undo()
    assert (fast.width, fast.height) == (683, 512)
    assert fast.jpeg == slow.jpeg and fast.pixel_hash == slow.pixel_hash
    for cut in (len(data) // 2, len(data) - 2):
        assert clean._jpeg_complete(data[:cut]) is False  # checked before OpenCV, whose versions differ here
        with pytest.raises(Rejected) as info:
            clean_image(data[:cut], CleanConfig())
        assert info.value.reason == "truncated"
    assert clean._jpeg_complete(data + b"\xff\xd8 appended picture") is True
    assert clean_image(data + b"\xff\xd8 appended picture", CleanConfig(), "exact").jpeg == fast.jpeg
