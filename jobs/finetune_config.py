"""Typed configuration of full fine-tuning (jobs/finetune.py), composed from a small YAML file like the trainer's.

    cfg = load_finetune_config("jobs/configs/finetune_vit_base.yaml", ["optim.base_lr=1e-3", "encoder=runs/x"])

Sections: head (what is trained on top of the encoder and how), train_data / val_data (pipeline.config.DataConfig),
optim, deepspeed, logging, checkpoint, debug (the trainer's own dataclasses from jobs/config.py, reused), schedule (in
epochs here: fine-tuning recipes are written in epochs), plus top-level encoder, output_dir and seed. Keys are checked
and --set values parsed exactly as in jobs/config.py (its load_config is reused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from jobs.config import (CheckpointConfig, DebugConfig, DeepSpeedConfig, LoggingConfig, OptimConfig, load_config,
                         redact, to_plain)
from jobs.errors import ConfigError
from jobs.validate import check_nonfinite_skip
from pipeline.config import DataConfig


@dataclass(frozen=True)
class HeadConfig:
    """The classifier and the fine-tuning regularisers of CAN_SPEC.md (MAE's fine-tune recipe, Table 9/11)."""

    num_classes: int = 1000  # labels are batch["labels"] in [0, num_classes); -1 (no .cls) is ignored by the loss
    global_pool: Literal["avg", "token"] = "avg"  # "avg" = mean of patch tokens, as pre-training's contrastive branch
    layer_decay: float = 0.75  # block i's lr = lr * layer_decay ** (depth - i); the head trains at the full lr
    drop_path: float = 0.1  # stochastic depth at the last block (rises linearly from 0 at the first)
    label_smoothing: float = 0.1
    head_init_std: float = 2e-5  # MAE: a near-zero head so the first steps do not scramble the pre-trained features


@dataclass(frozen=True)
class EpochSchedule:
    """Linear warm-up then cosine, in epochs of `epoch_samples` images (converted to samples once, in derive)."""

    epochs: float = 100.0
    warmup_epochs: float = 5.0
    epoch_samples: int = 1_281_167  # images per epoch: ImageNet-1k's training set
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr (MAE: min_lr 1e-6, about 0.0005 x peak)

    @property
    def total_samples(self) -> int:
        return round(self.epochs * self.epoch_samples)

    @property
    def warmup_samples(self) -> int:
        return round(self.warmup_epochs * self.epoch_samples)


def _default_optim() -> OptimConfig:
    # MAE fine-tune recipe (Appendix A.3 of He et al. 2022): AdamW, base lr 5e-4 per 256, betas (0.9, 0.999), wd 0.05.
    return OptimConfig(global_batch=1024, base_lr=5e-4, lr_base_batch=256, betas=(0.9, 0.999), weight_decay=0.05,
                       grad_clip=0.0)


@dataclass(frozen=True)
class FinetuneConfig:
    encoder: str = ""  # run directory, checkpoint, or exported encoder.safetensors (jobs/eval/encoder_source.py)
    head: HeadConfig = field(default_factory=HeadConfig)
    train_data: DataConfig = field(default_factory=lambda: DataConfig(mode="train", num_views=1))
    val_data: DataConfig = field(default_factory=lambda: DataConfig(mode="eval", num_views=1, shuffle_buffer=0))
    optim: OptimConfig = field(default_factory=_default_optim)
    schedule: EpochSchedule = field(default_factory=EpochSchedule)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(export_encoder=False))
    debug: DebugConfig = field(default_factory=DebugConfig)
    output_dir: str = "runs/finetune"
    seed: int = 0


def load_finetune_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    """YAML file + `key.sub=value` overrides -> FinetuneConfig, with the trainer's strict key checks."""
    return load_config(path, overrides, FinetuneConfig)


def check_finetune_config(cfg: FinetuneConfig) -> None:
    """What cannot work, before any compute is spent; each message starts with the field's dotted name."""
    if not cfg.encoder:
        raise ConfigError("encoder: required (a run directory, a checkpoint or an exported encoder.safetensors)")
    if cfg.train_data.mode != "train" or cfg.val_data.mode != "eval":
        raise ConfigError("train_data.mode must be 'train' and val_data.mode 'eval'")
    if cfg.train_data.num_views != 1 or cfg.val_data.num_views != 1:
        raise ConfigError("train_data.num_views / val_data.num_views: fine-tuning reads one view per image")
    if (cfg.train_data.img_size, cfg.train_data.patch_size) != (cfg.val_data.img_size, cfg.val_data.patch_size):
        raise ConfigError("val_data.img_size / patch_size: must equal train_data's")
    if cfg.head.num_classes < 2:
        raise ConfigError(f"head.num_classes: at least 2, got {cfg.head.num_classes}")
    if not 0.0 < cfg.head.layer_decay <= 1.0:
        raise ConfigError(f"head.layer_decay: in (0, 1], got {cfg.head.layer_decay}")
    if cfg.logging.every_steps <= 0 or cfg.checkpoint.every_steps <= 0 or cfg.checkpoint.keep <= 0:
        raise ConfigError("logging.every_steps, checkpoint.every_steps and checkpoint.keep: must be positive")
    check_nonfinite_skip(cfg.optim.name, cfg.deepspeed.zero_stage)


def dump_finetune_yaml(cfg: FinetuneConfig, extra: dict | None = None) -> str:
    """The resolved config as YAML, credentials in the data sections' storage_options redacted."""
    doc = to_plain(cfg)
    for section in ("train_data", "val_data"):
        doc[section]["storage_options"] = redact(doc[section]["storage_options"])
    if extra:
        doc["derived"] = extra
    return yaml.safe_dump(doc, sort_keys=False)
