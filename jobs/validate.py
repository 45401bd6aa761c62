"""Start-up checks: a config that cannot work fails before any compute is spent, naming the field.

Reached from pretrain.main() on every rank (cheap: a few metadata requests), so each rank fails with the same message
instead of some ranks hanging in a collective while others have died.
"""

from __future__ import annotations

import fsspec

from jobs.config import TrainConfig
from jobs.errors import ConfigError
from model.recipes import resolve_recipe
from pipeline.shards import resolve


def check_config(cfg: TrainConfig) -> None:
    """Model/data agreement, recipe consistency, and that every data source exists and can be read."""
    check_model_data_agreement(cfg)
    check_shards(cfg.data.sources, cfg.data.storage_options, cfg.data.mode)
    if cfg.logging.every_steps <= 0:
        raise ConfigError(f"logging.every_steps: must be positive, got {cfg.logging.every_steps}")
    if cfg.checkpoint.every_steps <= 0 or cfg.checkpoint.keep <= 0:
        raise ConfigError("checkpoint.every_steps and checkpoint.keep: must be positive")


def check_model_data_agreement(cfg: TrainConfig) -> None:
    m, d = cfg.model, cfg.data
    try:
        recipe = resolve_recipe(m)
    except ValueError as e:
        raise ConfigError(f"model.recipe: {e}") from e
    if d.img_size != m.img_size:
        raise ConfigError(f"data.img_size: {d.img_size} differs from model.img_size {m.img_size}")
    if d.patch_size != m.resolved_patch_size:
        raise ConfigError(f"data.patch_size: {d.patch_size} differs from the model's patch size {m.resolved_patch_size}")
    if d.num_views != recipe.num_views:
        raise ConfigError(f"data.num_views: {d.num_views}, but recipe {m.recipe!r} uses {recipe.num_views}")
    if d.mode != "train":
        raise ConfigError(f"data.mode: pre-training reads the train stream, got {d.mode!r}")


def check_shards(sources, storage_options: dict, mode: str) -> None:
    """Each source resolves to at least one shard, and its first shard exists and yields bytes."""
    for i, src in enumerate(sources):
        field = "data.shards" if len(sources) == 1 else f"data.shards[{i}]"
        try:
            urls, _ = resolve(src, storage_options)
        except FileNotFoundError:
            raise ConfigError(f"{field}: {src.url} not found") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field}: {src.url} cannot be listed or read ({type(e).__name__}: {e})") from None
        if not urls:
            raise ConfigError(f"{field}: {src.url} holds no .tar shards")
        first = urls[0]
        try:
            fs, path = fsspec.core.url_to_fs(first, **storage_options)
            with fs.open(path, "rb") as f:
                head = f.read(512)
        except FileNotFoundError:
            raise ConfigError(f"{field}: {first} not found") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field}: {first} cannot be read ({type(e).__name__}: {e})") from None
        if len(head) < 512:
            raise ConfigError(f"{field}: {first} is not a tar file ({len(head)} bytes)")
