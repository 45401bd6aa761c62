"""MSCN masks, drawn on the host: a pure function of (seed, rank, batch index, view, masked copy).

As view_params.py, every random number comes from a generator keyed by the batch's place in the stream,
np.random.default_rng([seed, rank, batch_index, view, MSCN_STREAM, copy]), so a resumed run redraws the same masks.
The extra key elements keep these draws apart from view_params.py's ([seed, rank, batch_index, view]), whose stream
MSCN leaves untouched. What is drawn is small: a cell grid (img_size / grid_cell squared, per channel) and a focal box
per channel, as row and column spans. DALI turns them into pixel masks (mscn_graph.py); the noise that fills the
masked pixels is drawn on the device from `noise_seed` (mscn_fill.py).

Every draw is made for every sample whatever the probabilities are (a fixed count in a fixed order), so the stream of
numbers never depends on which mask type a sample got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import MSCNMaskConfig

MSCN_STREAM = 1  # view_params.py's generators are keyed by 4 ints; these by 6, so the two never coincide


@dataclass
class MaskParams:
    """One masked copy of one view, for n samples. uint8 masks: 1 = keep (visible), 0 = masked (noise-filled).

    grid: [n, g, g, 3] cell grid, g = ceil(img_size / grid_cell); all 1 for a focal sample.
    rows: [n, S, 1, 3], cols: [n, 1, S, 3]: the kept focal box's row and column spans per channel; all 1 for a grid
        sample. The pixel mask is keep[y, x, c] = grid[j(y), j(x), c] * rows[y, 0, c] * cols[0, x, c],
        j(y) = floor((y + 0.5) * g / S) (nearest-neighbour upsampling; cells of grid_cell px when S divides).
    focal, independent: [n] bool: a focal mask (else grid); three per-channel masks (else one shared by the channels).
    box: [n, 3, 4] int (top, left, height, width) per channel, (0, 0, S, S) for a grid sample (previews, tests).
    noise_seed: seed of the torch generator that draws this copy's noise fill (one per copy and batch).
    """

    grid: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    focal: np.ndarray
    independent: np.ndarray
    box: np.ndarray
    noise_seed: int

    def take(self, idx: list[int]) -> "MaskParams":
        """The masks of samples idx only (a batch that lost a sample DALI rejected keeps the others' draws)."""
        arrays = {k: v[idx] for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        return MaskParams(**arrays, noise_seed=self.noise_seed)


def mask_rng(seed: int, rank: int, batch_index: int, view: int, copy: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, batch_index, view, MSCN_STREAM, copy])


def num_copies(cfg: MSCNMaskConfig, view: int) -> int:
    """Masked copies of view `view` (0-based): multi-masks are made of view 1 only (the model's views_extra)."""
    return cfg.num_masks if view == 0 else 1


def focal_boxes(n: int, size: int, keep_area: float, ratio: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """[n, 3, 4] int (top, left, height, width): boxes of area ~keep_area * size^2, aspect w/h log-uniform in ratio,
    placed uniformly inside the size x size view (a random crop without resizing)."""
    area = keep_area * size * size
    log_r = np.log(np.asarray(ratio, dtype=np.float64))
    aspect = np.exp(rng.uniform(log_r[0], log_r[1], size=(n, 3)))
    u_top, u_left = rng.random((n, 3)), rng.random((n, 3))
    w = np.clip(np.round(np.sqrt(area * aspect)), 1, size)
    h = np.clip(np.round(area / w), 1, size)
    w = np.clip(np.round(area / h), 1, size)  # a box clamped to the view's height widens to keep its area
    top = np.floor(u_top * (size - h + 1))
    left = np.floor(u_left * (size - w + 1))
    return np.stack([top, left, h, w], -1).astype(np.int64)


def draw_masks(n: int, size: int, cfg: MSCNMaskConfig, branch: int, rng: np.random.Generator) -> MaskParams:
    """One masked copy for n samples of a size x size view, with branch `branch`'s (0 or 1) mask probability."""
    p = cfg.mask_prob[branch]
    g = math.ceil(size / cfg.grid_cell)
    # Draw order is part of the format: changing it changes every run's masks.
    focal = rng.random(n) < cfg.focal_p
    independent = rng.random(n) < cfg.channel_independent_p
    grid = rng.random((n, g, g, 3)) >= p  # each cell masked with probability p
    box = focal_boxes(n, size, 1.0 - p, cfg.focal_ratio, rng)
    noise_seed = int(rng.integers(0, 2**63 - 1))

    shared = ~independent
    grid[shared] = grid[shared][..., :1]  # one mask for all three channels: channel 0's
    box[shared] = box[shared][:, :1]
    grid[focal] = True
    box[~focal] = (0, 0, size, size)
    pix = np.arange(size)[None, :, None]  # [1, S, 1] against [n, 1, 3] box edges
    top, left, h, w = (box[:, None, :, i] for i in range(4))
    rows = (pix >= top) & (pix < top + h)
    cols = (pix >= left) & (pix < left + w)
    return MaskParams(grid=grid.astype(np.uint8), rows=rows[:, :, None, :].astype(np.uint8),
                      cols=cols[:, None, :, :].astype(np.uint8), focal=focal, independent=independent, box=box,
                      noise_seed=noise_seed)


def keep_pixels(m: MaskParams, size: int) -> np.ndarray:
    """Reference (numpy) of the pixel mask DALI builds: [n, S, S, 3] uint8, 1 = keep. For tests and previews."""
    g = m.grid.shape[1]
    cell = np.floor((np.arange(size) + 0.5) * g / size).astype(np.int64)  # pixel centres, as fn.resize INTERP_NN
    return m.grid[:, cell][:, :, cell] * m.rows * m.cols


def draw_batch_masks(n: int, size: int, cfg: MSCNMaskConfig, num_views: int, seed: int, rank: int,
                     batch_index: int) -> list[list[MaskParams]]:
    """[view][copy] masks of one batch; view v uses branch min(v, 1) and copy c the generator mask_rng(..., v, c)."""
    return [[draw_masks(n, size, cfg, min(v, 1), mask_rng(seed, rank, batch_index, v, c))
             for c in range(num_copies(cfg, v))] for v in range(num_views)]
