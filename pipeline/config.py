"""Typed configuration of the streaming loader: where shards come from, how they are read, how views are made.

Defaults follow CAN_SPEC.md (SimCLR-style two views as in the authors' port). The mae recipe uses crop + flip only:
`AugmentConfig.preset("mae")`. MSCN (Masked Siamese ConvNets, issue 8) adds a high-pass filter and noise-filled masks
after the standard augmentations: `AugmentConfig.preset("mscn_simclr" | "mscn_byol")`, or `mscn=MSCNMaskConfig()`.
Nothing edits a config after it is built (frozen dataclasses).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

# ImageNet statistics, on the 0-255 scale DALI's decoder produces.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class MSCNMaskConfig:
    """MSCN masking (Masked Siamese ConvNets, Sec. 4.6): high-pass -> spatial/channel masks -> noise fill.

    Pairs are (branch 1, branch 2): view 1 and its extra masked copies use [0], view 2 uses [1] (the asymmetry of
    Sec. 4.5). Defaults are the paper's ablation optima (App. B) where its text kept the number; where the extracted
    text lost it, the value is ours and says so.
    """

    # Image minus its Gaussian blur, in pixels of the view; also applied in eval (App. A.2). Table 9: 3-7 equal, small
    # preferred (cheaper). 0 turns the filter off.
    highpass_sigma: float = 5.0
    grid_cell: int = 32  # px per grid-mask cell (Table 6: 28-32 best); the grid is ceil(img_size / grid_cell) square
    # Probability that a grid cell is masked; a focal mask keeps a box of area (1 - p) so both mask types remove p of
    # the view on average. Branch 1: 0.15, Table 5's optimum. Branch 2: 0.3, OUR choice (the asymmetric pair of
    # Sec. 4.5 was lost from the text; Table 5 is flat up to 0.3).
    mask_prob: tuple[float, float] = (0.15, 0.3)
    focal_p: float = 0.4  # per masked copy: a focal mask instead of a grid mask (Table 8)
    focal_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect range (w / h) of the kept focal box, as a random crop
    channel_independent_p: float = 0.8  # per copy: 3 independent masks, one per colour channel (Table 10)
    # Std of the N(0, std) fill of masked pixels, in normalised units (high-passed pixels / ImageNet std: a natural
    # image's high-pass at sigma 5 has a std of roughly 0.2-0.5 there). OUR choice: the numbers were lost from Sec. 4.4,
    # which only says the two branches differ.
    noise_std: tuple[float, float] = (0.25, 0.5)
    num_masks: int = 1  # masked copies of view 1 (Sec. 4.5 multi-masks); copies 2..M go to batch["views_extra"]
    # Also hand out keep masks ("keep1", "keep2", "keep_extra": bool, True = visible) and the high-passed views before
    # masking ("clean1", "clean2"): for tools/preview.py and tests, not for training (it costs device memory).
    debug_outputs: bool = False

    def __post_init__(self) -> None:
        assert self.grid_cell > 0 and self.num_masks >= 1, (self.grid_cell, self.num_masks)
        assert all(0.0 <= p < 1.0 for p in self.mask_prob), self.mask_prob


@dataclass(frozen=True)
class AugmentConfig:
    """One view's random augmentation; every strength and probability is a knob (0 turns a stage off)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction (the CAN port; SimCLR uses 0.08)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8  # probability that colour jitter is applied at all
    brightness: float = 0.4  # factor drawn from [1 - b, 1 + b], as torchvision's ColorJitter
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # fraction of the hue circle: 0.1 = +-36 degrees
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in output pixels, as the SimCLR recipe at 224 px
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    eval_resize_ratio: float = 0.875  # eval: resize shorter side to img_size / 0.875, centre-crop img_size (224 <- 256)
    mscn: MSCNMaskConfig | None = None  # None: no high-pass, no masking (CAN, SimCLR, MAE)

    @staticmethod
    def preset(name: str) -> "AugmentConfig":
        return AUGMENT_PRESETS[name]


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "can": AugmentConfig(),
    "simclr": AugmentConfig(crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2),
    # MAE pre-training: RandomResizedCrop + flip, nothing else (the mae recipe of CAN_SPEC.md).
    "mae": AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
    # MSCN applies its augmentations symmetrically on both branches (App. A.1), with each base method's strengths:
    # SimCLR's jitter (0.8, hue 0.2) and crop scale 0.08; BYOL's jitter (0.4, 0.4, 0.2, 0.1). BYOL's asymmetric blur
    # and solarisation are not used (App. A.1: the same augmentations on both branches).
    "mscn_simclr": AugmentConfig(crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                                 mscn=MSCNMaskConfig()),
    "mscn_byol": AugmentConfig(crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                               mscn=MSCNMaskConfig()),
}


# What evaluation does to an image, as recorded beside an encoder (export JSON "eval_preprocessing") and compared by
# the linear probe's feature cache: resize the shorter side to S / eval_resize_ratio, centre-crop S, high-pass
# (x - GaussianBlur(x, highpass_sigma), 0 = off), then (x - mean) / std on the 0-255 scale. mean is 0 when the
# high-pass is on (its output is zero-mean; the eval pipeline subtracts nothing). No masks: evaluation has none.
EVAL_PREPROCESSING_KEYS = ("highpass_sigma", "mean", "std", "eval_resize_ratio")


def eval_preprocessing(aug: AugmentConfig) -> dict[str, Any]:
    """The part of `aug` that the eval pipeline applies, as plain JSON values (EVAL_PREPROCESSING_KEYS)."""
    sigma = float(aug.mscn.highpass_sigma) if aug.mscn is not None else 0.0
    return {
        "highpass_sigma": sigma,
        "mean": [0.0, 0.0, 0.0] if sigma > 0 else [float(v) for v in aug.mean],
        "std": [float(v) for v in aug.std],
        "eval_resize_ratio": float(aug.eval_resize_ratio),
    }


def eval_augment(prep: dict[str, Any] | None) -> AugmentConfig:
    """An AugmentConfig whose eval pipeline applies `prep` (eval_preprocessing's dict; missing keys and None mean the
    defaults). Train-only fields keep their defaults; a high-pass comes with MSCNMaskConfig's (unused) mask knobs."""
    prep = dict(prep or {})
    unknown = sorted(set(prep) - set(EVAL_PREPROCESSING_KEYS))
    if unknown:
        raise ValueError(f"eval preprocessing has unknown keys {unknown} (known: {list(EVAL_PREPROCESSING_KEYS)})")
    base = AugmentConfig()
    sigma = float(prep.get("highpass_sigma", 0.0))
    return replace(
        base,
        mean=tuple(float(v) for v in prep.get("mean", base.mean)),
        std=tuple(float(v) for v in prep.get("std", base.std)),
        eval_resize_ratio=float(prep.get("eval_resize_ratio", base.eval_resize_ratio)),
        mscn=MSCNMaskConfig(highpass_sigma=sigma) if sigma > 0 else None,
    )


def run_eval_preprocessing(run_config: dict[str, Any]) -> dict[str, Any] | None:
    """The eval preprocessing of a training run's config (its resolved.yaml, or the YAML it was started from): its
    data.augment section read with the trainer's conventions (data_config_from_dict: a preset name or overrides, mscn
    included). None when the config has no data section."""
    data = run_config.get("data")
    if not isinstance(data, dict):
        return None
    return eval_preprocessing(data_config_from_dict({"augment": data.get("augment") or {}}).augment)


@dataclass(frozen=True)
class ShardSource:
    """One dataset: a brace pattern, a prefix to list, or a manifest.parquet URL; weight is its mixing share."""

    url: str
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    """Everything build_loader needs for one rank. batch_size is per rank."""

    shards: str | tuple[ShardSource, ...] = ()  # one URL, or several datasets mixed by weight
    mode: Literal["train", "eval"] = "train"
    batch_size: int = 64
    img_size: int = 224
    patch_size: int = 16  # mask keys are [B, (img_size / patch_size)^2]
    num_views: int = 2  # 2 for can/simclr, 1 for mae
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shuffle_buffer: int = 2000  # samples per worker; 0 disables (eval never shuffles)
    # Worker processes per rank (pipeline/worker.py), each reading a disjoint share of the shards and making whole
    # batches: reading, tar parsing and validation stay out of the training process's GIL. About 600 images/s each
    # at 512 px JPEGs on one core (bench/pipeline.py): 4 per GPU for 2,500 images/s.
    workers: int = 2
    seed: int = 0
    steps_per_epoch: int | None = None  # train: stop an iteration after this many steps (same on every rank); None = endless
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec (e.g. s3fs client_kwargs)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where DALI decodes and augments; auto = the rank's own GPU
    dali_threads: int = 2
    prefetch: int = 2  # DALI iterations in its pipelined executor, and device batches queued ahead of the trainer
    # Train: batches DALI makes in one iteration, from one worker (eval: 1). What the training process's thread pays
    # per iteration (the worker's message, the feeds, scheduling, taking the outputs: ~1.5 ms on a 2-core VM) is paid
    # once for all of them; the iteration's outputs are cut into batch_size batches (views, no copy). It changes which
    # worker's batch comes when, not a batch's samples or draws (seeded per batch), and a state saved mid-iteration
    # resumes exactly under any value (loader.py, _record). (On the GPU, DALI shares an iteration's JPEGs between its
    # hardware and CUDA decoders by position, so under another value a batch's pixels may differ by decoder rounding.)
    # Each batch is a view of its iteration's outputs, which stay on the device until both batches are gone.
    batches_per_iteration: int = 2
    # Encoded batches a worker may have ready ahead of the trainer, in shared-memory slots of one iteration each
    # (loader.worker_slots: this / batches_per_iteration, rounded up, and one more than DALI can hold of one worker's
    # iterations). A worker that stalls for longer than this many batches (a retried read) makes an ordered loader
    # wait.
    worker_prefetch: int = 4
    # Shared-memory slot = batch_size x this x batches_per_iteration (train), reserved when the loader starts; an
    # iteration whose images do not fit (rare: huge PNGs) goes through the worker's message queue instead (counted as
    # batches_over_slot).
    slot_bytes_per_sample: int = 512 << 10
    # True: batches taken round-robin over the workers, so a restart replays the stream exactly; False: whichever
    # worker is ready first (a slow worker never holds the rank up; a restart still loses and repeats nothing, but the
    # interleaving after it differs). pipeline/worker_pool.py.
    ordered: bool = True
    read_block_bytes: int = 4 << 20  # bytes per ranged read of a shard
    read_concurrency: int = 4  # ranged reads in flight per worker (the current shard's next blocks, the next shard's)
    read_retries: int = 4  # per ranged read, on transient storage errors
    retry_backoff_s: float = 0.5  # first retry delay; doubles on each retry
    # What the worker checks before DALI sees the bytes (pipeline/validate.py). "header" (structure + header parse)
    # catches what makes DALI fail (truncation, broken headers; DALI decodes corrupt JPEG scan data with a warning); a
    # "decode" catches more but costs a decode (JPEG: at 1/8 scale, ~4x header). Anything missed costs one DALI retry.
    validate: Literal["none", "header", "decode"] = "header"

    def __post_init__(self) -> None:
        assert self.mode in ("train", "eval"), self.mode
        assert self.num_views in (1, 2), self.num_views
        assert self.img_size % self.patch_size == 0, (self.img_size, self.patch_size)
        assert self.batch_size > 0 and self.workers > 0 and self.prefetch > 0 and self.worker_prefetch > 0 and self.batches_per_iteration > 0

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def sources(self) -> tuple[ShardSource, ...]:
        if isinstance(self.shards, str):
            return (ShardSource(self.shards),)
        return tuple(s if isinstance(s, ShardSource) else ShardSource(**s) for s in self.shards)

    @property
    def iteration_batches(self) -> int:
        """Batches per DALI iteration in this mode: eval batches can be short, and go one at a time."""
        return self.batches_per_iteration if self.mode == "train" else 1

    def with_(self, **changes: Any) -> "DataConfig":
        return replace(self, **changes)


def data_config_from_dict(d: dict[str, Any]) -> DataConfig:
    """Build from plain YAML values: `augment` may be a preset name or a dict of overrides on the can preset."""
    d = dict(d)
    aug = d.get("augment")
    if isinstance(aug, str):
        d["augment"] = AugmentConfig.preset(aug)
    elif isinstance(aug, dict):
        aug = dict(aug)
        base = AugmentConfig.preset(aug.pop("preset", "can")) if "preset" in aug else AugmentConfig()
        mscn = aug.pop("mscn", base.mscn)
        if isinstance(mscn, dict):  # overrides on the defaults (or on the preset's mscn)
            mscn = replace(base.mscn or MSCNMaskConfig(),
                           **{k: tuple(v) if isinstance(v, list) else v for k, v in mscn.items()})
        base = replace(base, mscn=mscn)
        d["augment"] = replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
    if isinstance(d.get("shards"), list):
        d["shards"] = tuple(ShardSource(**s) if isinstance(s, dict) else ShardSource(s) for s in d["shards"])
    return DataConfig(**d)
