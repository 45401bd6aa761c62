"""Two-view augmentation throughput: the DALI pipeline vs a plain Pillow + torch DataLoader doing the same work.

    python -m bench.pipeline                     # CPU DALI here; DALI on the GPU where one is present
    python -m bench.pipeline --images 256 --passes 3 --size 224
    python -m bench.pipeline --images 2048 --batch 256 --local --json out.json   # bench/gpu_check.sh: no S3 server

The DALI figure is the loader's train pipeline, host-side parameter drawing (view_params.py) included. Both sides
decode the same in-memory JPEGs (web-like photos, 320-512 px, from skimage.data) and make two views with
the CAN augmentation of CAN_SPEC.md at --size px. Each figure is the median of --passes timed passes after one warm-up
pass. Also measured in the same run: the whole loader (build_loader: worker processes streaming from the loopback S3
server, or from local tars with --local, + DALI) and DALI's own fn.readers.webdataset over the same shards, to compare
the two reading paths.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from pipeline import augment
from pipeline.config import AugmentConfig, DataConfig
from pipeline.loader import build_loader
from pipeline.validate import inspect_image
from pipeline.view_params import draw_batch, pack_params

MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def web_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        im = Image.fromarray(photos[i % len(photos)])
        w, h = int(rng.integers(320, 513)), int(rng.integers(320, 513))
        buf = io.BytesIO()
        im.resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=int(rng.integers(75, 95)))
        out.append(buf.getvalue())
    return out


# ----- the Pillow + torch baseline: the same stages, one sample at a time in DataLoader workers ---------------------
def _pil_view(im: Image.Image, size: int, a: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    w, h = im.size
    for _ in range(10):  # RandomResizedCrop's rejection sampling
        area = w * h * rng.uniform(*a.crop_scale)
        ratio = np.exp(rng.uniform(np.log(a.crop_ratio[0]), np.log(a.crop_ratio[1])))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw, ch, x, y = w, h, 0, 0
    v = im.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    if rng.random() < a.flip_p:
        v = v.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < a.jitter_p:
        v = ImageEnhance.Brightness(v).enhance(rng.uniform(max(0, 1 - a.brightness), 1 + a.brightness))
        v = ImageEnhance.Contrast(v).enhance(rng.uniform(max(0, 1 - a.contrast), 1 + a.contrast))
        v = ImageEnhance.Color(v).enhance(rng.uniform(max(0, 1 - a.saturation), 1 + a.saturation))
        hsv = np.array(v.convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-a.hue, a.hue) * 255)) % 256
        v = Image.fromarray(hsv, "HSV").convert("RGB")
    if rng.random() < a.grayscale_p:
        v = v.convert("L").convert("RGB")
    if rng.random() < a.blur_p:
        v = v.filter(ImageFilter.GaussianBlur(rng.uniform(*a.blur_sigma)))
    x = np.asarray(v, np.float32).transpose(2, 0, 1) / 255.0
    return (x - MEAN) / STD


class PilTwoViews(torch.utils.data.Dataset):
    def __init__(self, jpegs: list[bytes], size: int, aug: AugmentConfig, num_patches: int):
        self.jpegs, self.size, self.aug, self.num_patches = jpegs, size, aug, num_patches

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int):
        rng = np.random.default_rng()
        im = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        views = [torch.from_numpy(_pil_view(im, self.size, self.aug, rng)) for _ in range(2)]
        return views[0], views[1], torch.rand(self.num_patches), torch.rand(self.num_patches)


def time_pil(jpegs, size, aug, batch, workers, passes) -> list[float]:
    ds = PilTwoViews(jpegs, size, aug, (size // 16) ** 2)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
    rates = []
    for p in range(passes + 1):
        t0 = time.perf_counter()
        n = sum(b[0].shape[0] for b in dl)
        if p > 0:  # the first pass warms workers and caches
            rates.append(n / (time.perf_counter() - t0))
    return rates


def time_dali(jpegs, size, aug, batch, threads, passes, device_id) -> list[float]:
    """The loader's train pipeline as the loader runs it (2 batches in flight in DALI's pipelined executor),
    host-side parameter drawing included (sizes come from the reader's header parse); one continuous stream of
    batches over passes + 1 passes, each timed."""
    pipe = augment.train_pipeline(batch, size, 2, aug, device_id, threads, 2)
    arrays = [np.frombuffer(j, np.uint8) for j in jpegs]
    sizes = [inspect_image(j, "jpeg", "header")[1] for j in jpegs]
    starts = list(range(0, len(arrays) - batch + 1, batch))
    stream = [i for _ in range(passes + 1) for i in starts]

    def feed(n: int) -> None:
        i = stream[n]
        augment.feed_images(pipe, arrays[i : i + batch], [len(a) for a in arrays[i : i + batch]])
        augment.feed_params(pipe, pack_params(aug, draw_batch(sizes[i : i + batch], aug, 2, (size // 16) ** 2, 0, 0, n)))

    feed(0)
    feed(1)
    pipe.schedule_run()  # the first call runs both fed iterations
    rates, fed = [], 2
    for p in range(passes + 1):
        t0 = time.perf_counter()
        for _ in starts:
            out = pipe.share_outputs()
            pipe.release_outputs()
            if fed < len(stream):
                feed(fed)
                fed += 1
                pipe.schedule_run()
        if device_id is not None:
            out[0].as_cpu()  # wait for the GPU work
        if p > 0:  # the first pass warms up
            rates.append(len(starts) * batch / (time.perf_counter() - t0))
    return rates


def time_loader(prefix, size, batch, threads, passes, n_images, device, workers) -> list[float]:
    cfg = DataConfig(shards=prefix, batch_size=batch, img_size=size, workers=workers, shuffle_buffer=batch * 2,
                     dali_threads=threads, device=device, steps_per_epoch=max(1, n_images // batch))
    loader = build_loader(cfg, 0, 1, torch.device(device))
    rates = []
    for p in range(passes + 1):
        t0 = time.perf_counter()
        n = sum(len(b["keys"]) for b in loader)
        if p > 0:
            rates.append(n / (time.perf_counter() - t0))
    loader.close()
    return rates


def _dali_random_view(img, size: int, aug: AugmentConfig):
    """The same augmentation with DALI's own random operators: DALI's reader has no host in the loop to draw them
    (the loader does not use this: DALI's operator RNG state cannot be checkpointed, see pipeline/view_params.py)."""
    from nvidia.dali import fn, types

    def factor(on, s):
        return 1.0 + on * fn.random.uniform(range=[max(0.0, 1.0 - s) - 1.0, s])

    x = fn.random_resized_crop(img, size=[size, size], random_area=list(aug.crop_scale),
                               random_aspect_ratio=list(aug.crop_ratio))
    on = fn.random.coin_flip(probability=aug.jitter_p)
    x = fn.color_twist(x, brightness=factor(on, aug.brightness), contrast=factor(on, aug.contrast),
                       saturation=factor(on, aug.saturation) * (1 - fn.random.coin_flip(probability=aug.grayscale_p)),
                       hue=on * fn.random.uniform(range=[-aug.hue * 360.0, aug.hue * 360.0]))
    blur = fn.random.coin_flip(probability=aug.blur_p)
    x = fn.gaussian_blur(x, sigma=blur * fn.random.uniform(range=list(aug.blur_sigma)) + (1 - blur) * 0.01)
    return fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(probability=aug.flip_p), mean=list(aug.mean),
                                    std=list(aug.std), dtype=types.FLOAT, output_layout="CHW")


def time_dali_webdataset(tar_paths, size, aug, batch, threads, passes, device_id, n_images) -> list[float]:
    """DALI's own reader (index files beside the tars) feeding the same augmentation."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=batch, num_threads=threads, device_id=device_id, seed=0)
    with pipe:
        jpg = fn.readers.webdataset(paths=tar_paths, index_paths=[p[:-4] + ".idx" for p in tar_paths], ext=["jpg"],
                                    random_shuffle=True, initial_fill=batch * 2, name="reader")
        img = (fn.decoders.image(jpg, device="cpu") if device_id is None
               else fn.decoders.image(jpg, device="mixed"))
        pipe.set_outputs(_dali_random_view(img, size, aug), _dali_random_view(img, size, aug))
    pipe.build()
    rates = []
    for p in range(passes + 1):
        t0 = time.perf_counter()
        for _ in range(max(1, n_images // batch)):
            out = pipe.run()
            if device_id is not None:
                out[0].as_cpu()
        if p > 0:
            rates.append(batch * max(1, n_images // batch) / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="DataLoader workers = DALI threads")
    ap.add_argument("--loader-workers", type=int, default=2, help="the loader's worker processes")
    ap.add_argument("--local", action="store_true", help="the loader reads local tars (no S3 server needed)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_id = 0 if device == "cuda" else None
    aug = AugmentConfig()
    jpegs = web_like_jpegs(args.images)
    print(f"{args.images} web-like JPEGs (320-512 px), two {args.size} px views each, batch {args.batch}, "
          f"{args.workers} CPU workers/threads, DALI on {device}; median of {args.passes} passes after a warm-up")
    results = {}
    results["dali"] = time_dali(jpegs, args.size, aug, args.batch, args.workers, args.passes, device_id)
    results["pil"] = time_pil(jpegs, args.size, aug, args.batch, args.workers, args.passes)

    from contextlib import nullcontext

    from pipeline.ingest.writer import write_shard
    from tools import local_s3

    with (nullcontext() if args.local else local_s3.serve()) as s3, tempfile.TemporaryDirectory() as tmp:
        prefix = tmp + "/ds" if args.local else s3.make_bucket("bench-pipeline") + "/ds"
        per = max(1, args.images // 4)
        for s in range(4):
            samples = [(f"s{s}_{i}", {"jpg": j, "cls": b"0"}) for i, j in enumerate(jpegs[s * per : (s + 1) * per])]
            write_shard(f"{prefix}/shard-{s:06d}.tar", samples)
            if not args.local:
                write_shard(f"{tmp}/shard-{s:06d}.tar", samples)
        name = "loader_local" if args.local else "loader_s3"
        results[name] = time_loader(prefix, args.size, args.batch, args.workers, args.passes, args.images, device,
                                    args.loader_workers)
        local = tmp + "/ds" if args.local else tmp
        tars = [f"{local}/shard-{s:06d}.tar" for s in range(4)]
        results["dali_webdataset_local"] = time_dali_webdataset(tars, args.size, aug, args.batch, args.workers,
                                                                args.passes, device_id, args.images)
    for name, rates in results.items():
        print(f"{name:24s} {statistics.median(rates):8.1f} two-view images/s   (passes: "
              + ", ".join(f"{r:.1f}" for r in rates) + ")")
    ratio = statistics.median(results["dali"]) / statistics.median(results["pil"])
    print(f"DALI / Pillow+DataLoader: {ratio:.2f}x")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": device, "images": args.images, "batch": args.batch, "size": args.size,
                       "two_view_images_per_s": {k: statistics.median(v) for k, v in results.items()},
                       "passes": results, "dali_over_pil": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
