"""The loader on the GPU: DALI's mixed decode (nvImageCodec: nvJPEG for JPEG, the CPU for PNG and WebP) and GPU
augmentation give the CPU path's batches, pixel for pixel up to decoder and resampling rounding."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.loader import build_loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: DALI's mixed decode and GPU operators run on a GPU only")


FORMATS = (("jpg", "JPEG", {"quality": 95}), ("png", "PNG", {}), ("webp", "WEBP", {"lossless": True}))


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> str:
    """Two local shards of smooth 96x128 images (gradients + blocks: decoders agree closely on them), with labels,
    JPEG, PNG and WebP in turn (img2dataset writes any of the three)."""
    from pipeline.ingest.writer import write_shard

    root = tmp_path_factory.mktemp("gpu_shards")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128]
    for s in range(2):
        samples = []
        for i in range(16):
            img = np.stack([(xx * 2 + 40 * c + rng.integers(0, 60)) % 256 for c in range(3)], -1).astype(np.uint8)
            img[(yy // 32 + xx // 32) % 2 == 0] //= 2
            ext, fmt, kw = FORMATS[i % 3]
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=fmt, **kw)
            samples.append((f"s{s}i{i:03d}", {ext: buf.getvalue(), "cls": str(i % 3).encode()}))
        write_shard(str(root / f"shard-{s:06d}.tar"), samples)
    return str(root) + "/"


def _first(cfg: DataConfig, device: torch.device, n: int = 1) -> tuple[dict | list[dict], dict]:
    loader = build_loader(cfg, 0, 1, device)
    try:
        batches = list(itertools.islice(loader, n))
        return (batches[0] if n == 1 else batches), loader.counters()
    finally:
        loader.close()


def test_train_batches_on_cuda_equal_the_cpu_ones(photo_shards):
    """Every random number of a batch is host-drawn from (seed, rank, batch index), so the GPU pipeline crops, jitters,
    blurs and flips exactly as the CPU one: the views agree pixel for pixel up to rounding (the colour twist and the
    blur amplify the decoders' differences a little), in the rank's own GPU, as DLPack tensors torch owns. Both
    batches of the first DALI iteration (batches_per_iteration 2): the second is a slice of the iteration's outputs."""
    cfg = DataConfig(shards=photo_shards, batch_size=8, img_size=64, patch_size=8, workers=1, dali_threads=2,
                     shuffle_buffer=0, device="cuda", batches_per_iteration=2)
    gpus, counters = _first(cfg, torch.device("cuda", torch.cuda.current_device()), 2)
    cpus, _ = _first(cfg.with_(device="cpu"), torch.device("cpu"), 2)
    assert gpus[0]["keys"] != gpus[1]["keys"]
    for gpu, cpu in zip(gpus, cpus, strict=True):
        assert gpu["keys"] == cpu["keys"]
        for key in ("view1", "view2", "mask_keys1", "mask_keys2", "labels"):
            assert gpu[key].device.type == "cuda", key
            assert gpu[key].shape == cpu[key].shape and gpu[key].dtype == cpu[key].dtype, key
            assert gpu[key].is_contiguous(), key
        assert torch.equal(gpu["mask_keys1"].cpu(), cpu["mask_keys1"])
        assert torch.equal(gpu["labels"].cpu(), cpu["labels"])
        for key in ("view1", "view2"):
            diff = (gpu[key].cpu() - cpu[key]).abs()
            assert diff.mean() < 0.05 and diff.max() < 1.0, (key, diff.mean().item(), diff.max().item())
    assert counters["format_jpeg"] > 0 and counters["format_png"] > 0 and counters["format_webp"] > 0


def test_eval_mixed_decode_matches_cpu_decode(photo_shards):
    """Eval has no randomness: nvJPEG + GPU resize vs libjpeg-turbo + CPU resize differ only by decoder rounding."""
    cfg = DataConfig(shards=photo_shards, mode="eval", batch_size=8, img_size=64, patch_size=8, workers=1,
                     dali_threads=2, device="cuda")
    gpu, _ = _first(cfg, torch.device("cuda", torch.cuda.current_device()))
    cpu, _ = _first(cfg.with_(device="cpu"), torch.device("cpu"))
    assert gpu["keys"] == cpu["keys"] and gpu["view1"].device.type == "cuda"
    diff = (gpu["view1"].cpu() - cpu["view1"]).abs()
    # 0.1 in normalised units is about 6 grey levels: IDCT / chroma upsampling differences, not a different image.
    assert diff.mean() < 0.03 and diff.max() < 0.5, (diff.mean().item(), diff.max().item())
