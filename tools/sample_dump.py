"""Build an uncurated image dump from the real photos that scikit-image and scikit-learn ship inside their packages.

Nothing is downloaded: the ~20 source photos are random-cropped, rescaled, rotated, colour-shifted and re-encoded
(JPEG of varying quality, PNG, greyscale, RGBA) into as many images as asked, into nested folders the way a scrape
lands on disk. Like a real dump, it also holds junk: truncated files, text files named .jpg, empty files, tiny
thumbnails and exact duplicates. `make demo` shards this when no DUMP is given.

    python -m tools.sample_dump OUT_DIR [--count 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Photos that load from the installed packages alone (others in skimage.data need a download).
_SKIMAGE_PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "hubble_deep_field", "immunohistochemistry",
    "moon", "colorwheel", "retina", "grass", "gravel", "brick", "clock", "horse", "logo",
)


@dataclass(frozen=True)
class DumpSummary:
    images: int
    broken: int
    duplicates: int
    tiny: int

    @property
    def files(self) -> int:
        return self.images + self.broken + self.duplicates + self.tiny


def source_photos() -> list[Image.Image]:
    """The packaged photos as RGB or L PIL images."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in _SKIMAGE_PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        photos.append(Image.fromarray(arr))
    photos.extend(Image.fromarray(a) for a in load_sample_images().images)
    return photos


def _variant(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop, rescale, rotation and colour shift of one photo: a plausible distinct web image."""
    img = photo.convert("RGB") if photo.mode not in ("RGB", "L") else photo
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch))
    scale = rng.uniform(0.5, 1.6)
    img = img.resize((max(80, int(cw * scale)), max(80, int(ch * scale))), Image.BICUBIC)
    if rng.random() < 0.3:
        img = img.rotate(rng.choice([90, 180, 270, rng.uniform(-20, 20)]), expand=True)
    if img.mode == "RGB" and rng.random() < 0.5:
        gains = np.array([rng.uniform(0.7, 1.3) for _ in range(3)], dtype=np.float32)
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) * gains, 0, 255).astype(np.uint8))
    return img


def _encode(img: Image.Image, rng: random.Random) -> tuple[bytes, str]:
    buf = io.BytesIO()
    r = rng.random()
    if r < 0.75:
        img.convert("RGB").save(buf, "JPEG", quality=rng.randint(60, 95))
        return buf.getvalue(), "jpg"
    if r < 0.85:
        img.convert("L").save(buf, "PNG")
        return buf.getvalue(), "png"
    if r < 0.95:
        img.convert("RGBA").save(buf, "PNG")
        return buf.getvalue(), "png"
    img.convert("RGB").save(buf, "WEBP", quality=80)
    return buf.getvalue(), "webp"


def make_sample_dump(out_dir: str | Path, count: int = 1000, seed: int = 0) -> DumpSummary:
    """Write `count` distinct images plus about 3% junk (broken, duplicate, tiny files) under out_dir."""
    out = Path(out_dir)
    rng = random.Random(seed)
    photos = source_photos()
    written: list[Path] = []
    for i in range(count):
        data, ext = _encode(_variant(photos[i % len(photos)], rng), rng)
        path = out / f"batch{i // 250:02d}" / f"{rng.choice(['img', 'IMG', 'photo', 'dl'])}_{i:05d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)

    junk = out / "misc"
    junk.mkdir(parents=True, exist_ok=True)
    n_junk = max(3, count // 100)
    for j in range(n_junk):
        good = written[rng.randrange(len(written))].read_bytes()
        (junk / f"truncated_{j}.jpg").write_bytes(good[: len(good) // 3])
    (junk / "notes.jpg").write_bytes(b"this is a text file with an image's name\n")
    (junk / "empty.jpg").write_bytes(b"")
    broken = n_junk + 2
    for j in range(n_junk):
        src = written[rng.randrange(len(written))]
        (junk / f"copy_{j}{src.suffix}").write_bytes(src.read_bytes())
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buf, "JPEG")
    (junk / "thumb.jpg").write_bytes(buf.getvalue())
    return DumpSummary(images=count, broken=broken, duplicates=n_junk, tiny=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    summary = make_sample_dump(args.out_dir, args.count, args.seed)
    print(f"wrote {summary.files} files under {args.out_dir}: {summary.images} images, {summary.broken} broken, "
          f"{summary.duplicates} exact duplicates, {summary.tiny} too small")


if __name__ == "__main__":
    main()
