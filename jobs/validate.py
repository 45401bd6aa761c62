"""Start-up checks: a config that cannot work fails before any compute is spent, naming the field.

Reached from pretrain.main() on every rank (cheap: a few metadata requests) through jobs.startup.agree, so a check
that fails on some ranks only (a node whose environment lacks the AWS_* settings) fails every rank, naming the failing
ranks and hosts, instead of some ranks hanging in a collective while others have died.
"""

from __future__ import annotations

import fsspec

from jobs.config import TrainConfig
from jobs.errors import ConfigError
from model.recipes import resolve_recipe
from pipeline.config import ShardSource
from pipeline.shards import resolve


def check_config(cfg: TrainConfig) -> None:
    """Model/data agreement, recipe consistency, optimizer/engine fit, and that every data source (the kNN monitor's
    too) exists and can be read.

    Not checked: that supcon's shards carry labels (KEY.cls). The loader reports -1 for unlabelled samples, and the
    supcon term has no positives among them; train supcon on labelled shards only."""
    check_model_data_agreement(cfg)
    check_engine(cfg)
    check_monitor(cfg)
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
    # MSCN multi-masks: the pipeline makes num_masks masked copies of view 1; the model expects M = num_masks - 1 of
    # them besides view 1 itself, in batch["views_extra"].
    masks = d.augment.mscn.num_masks if d.augment.mscn is not None else 1
    if masks - 1 != m.extra_masks:
        raise ConfigError(f"model.extra_masks: {m.extra_masks}, but data.augment.mscn.num_masks {masks} sends "
                          f"{masks - 1} extra masked views")
    if d.augment.mscn is not None and recipe.family == "can":
        raise ConfigError(f"data.augment.mscn: pixel masks are for the joint-embedding recipes, not {m.recipe!r}")


def check_engine(cfg: TrainConfig) -> None:
    o, ds = cfg.optim, cfg.deepspeed
    check_nonfinite_skip(o.name, ds.zero_stage)
    if o.name == "lars" and ds.zero_stage != 0:
        # ZeRO 1-3 give the optimizer one flat partition per param group: the per-layer trust ratio would be lost.
        raise ConfigError(f"deepspeed.zero_stage: {ds.zero_stage}, but optim.name lars needs 0 (per-layer trust "
                          "ratios need the model's own parameters)")
    if o.name == "lars" and ds.precision == "bf16":
        raise ConfigError("deepspeed.precision: bf16 keeps flat fp32 master weights, which LARS cannot use per layer; "
                          "use amp_bf16 (or auto)")
    if resolve_recipe(cfg.model).family == "byol" and ds.zero_stage == 3:
        # The EMA update reads every online parameter and writes every target parameter on each rank.
        raise ConfigError("deepspeed.zero_stage: 3 partitions the parameters, which BYOL's EMA target update "
                          f"(recipe {cfg.model.recipe!r}) needs whole on every rank; use 0-2")


def check_nonfinite_skip(optimizer: str, zero_stage: int) -> None:
    """A non-finite gradient must skip the update on every rank (jobs/loop.py's guard counts on it). ZeRO stages 1-3
    check the all-reduced gradient norm and skip; stage 0 applies whatever the optimizer computes, and only LARS checks
    for itself (jobs/lars.py)."""
    if zero_stage == 0 and optimizer != "lars":
        raise ConfigError(f"deepspeed.zero_stage: 0 with optim.name {optimizer} would apply a non-finite update "
                          "(stage 0 has no overflow check); use zero_stage 1-3")


def check_monitor(cfg: TrainConfig) -> None:
    mon = cfg.monitor
    if mon.knn_every_steps <= 0:
        return
    if mon.knn_every_steps % cfg.logging.every_steps:
        raise ConfigError(f"monitor.knn_every_steps: {mon.knn_every_steps} is not a multiple of logging.every_steps "
                          f"{cfg.logging.every_steps} (kNN accuracy is logged with that step's record)")
    if mon.knn_num_classes < 2:
        raise ConfigError(f"monitor.knn_num_classes: must be at least 2, got {mon.knn_num_classes}")
    for name, url in (("knn_memory_shards", mon.knn_memory_shards), ("knn_query_shards", mon.knn_query_shards)):
        if not url:
            raise ConfigError(f"monitor.{name}: required when monitor.knn_every_steps > 0")
        check_shards((ShardSource(url),), cfg.data.storage_options, "eval", f"monitor.{name}")


def check_shards(sources, storage_options: dict, mode: str, name: str = "data.shards") -> None:
    """Each source resolves to at least one shard, and its first shard exists and yields bytes."""
    for i, src in enumerate(sources):
        field = name if len(sources) == 1 else f"{name}[{i}]"
        try:
            urls, _ = resolve(src, storage_options)
        except FileNotFoundError:
            raise ConfigError(f"{field}: {src.url} not found") from None
        except Exception as e:  # botocore's EndpointConnectionError (a dead endpoint) is no OSError
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
        except Exception as e:
            raise ConfigError(f"{field}: {first} cannot be read ({type(e).__name__}: {e})") from None
        if len(head) < 512:
            raise ConfigError(f"{field}: {first} is not a tar file ({len(head)} bytes)")
