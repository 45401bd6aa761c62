"""A labelled set of real photos that ship inside scikit-image and scikit-learn (no download): each class is one
photo, each image a random crop of it, grey, downscaled to the bench's size. Telling which photo a small grey crop
comes from is a texture task, with more room above random features than 32 px digits have.

Training and held-out crops come from disjoint parts of each photo (held-out: the rightmost quarter; training: the
rest), so no held-out crop overlaps a training one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Ten photos that load offline (skimage.data's bundled files, sklearn's load_sample_images), as distinct scenes and
# textures as those packages have: no two views of one object (skimage's cat and chelsea are one photo).
PHOTOS = ("brick", "grass", "gravel", "coins", "camera", "astronaut", "chelsea", "coffee", "china", "flower")
CROP = (48, 96)  # side of a crop before downscaling, px (the photos are 300-640 px)
HELD_OUT = 0.25  # the rightmost share of each photo's width that the held-out crops come from


def load_photo(name: str) -> np.ndarray:
    """(H, W) uint8 grey."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        rgb = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        rgb = getattr(skimage.data, name)()
    img = Image.fromarray(rgb)
    return np.asarray(img.convert("L") if img.mode != "L" else img)


def random_crops(photo: np.ndarray, x_range: tuple[int, int], n: int, img_size: int,
                 rng: np.random.Generator) -> list[Image.Image]:
    """`n` square crops of side CROP lying wholly within columns x_range, each downscaled to img_size (box filter)."""
    h = photo.shape[0]
    out = []
    for _ in range(n):
        side = int(rng.integers(CROP[0], CROP[1] + 1))
        x = int(rng.integers(x_range[0], x_range[1] - side + 1))
        y = int(rng.integers(0, h - side + 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side])
        out.append(crop.resize((img_size, img_size), Image.BOX).convert("RGB"))
    return out


def write_photo_dumps(root: Path, img_size: int, seed: int, train_per_class: int = 140,
                      val_per_class: int = 40) -> dict[str, Path]:
    """ROOT/{train,val}/{class}/NNNN.png as bench.learning.write_digit_dumps (class = index in PHOTOS): 1,400
    training and 400 held-out crops by default."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(PHOTOS):
        photo = load_photo(name)
        split_x = int(photo.shape[1] * (1 - HELD_OUT))
        for split, x_range, n in (("train", (0, split_x), train_per_class),
                                  ("val", (split_x, photo.shape[1]), val_per_class)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(random_crops(photo, x_range, n, img_size, rng)):
                crop.save(folder / f"{label:02d}{i:03d}.png")  # lossless: the shard writer makes the one JPEG
    return {"train": root / "train", "val": root / "val"}
