"""Stage 1 of tools/curate.py: embed every input sample once, on all ranks, as jobs/linear_probe.py extracts features.

The encoder (run directory, checkpoint or exported encoder.safetensors), its input shape and the eval preprocessing
it was trained with are resolved as the probe resolves them; images go through the pipeline's eval mode; features
are jobs.eval.features.extract_features's (mean-pooled patch tokens with --pool avg).

Parts are runs of `shards_per_part` input shards (pipeline/curate/embeddings.py). Rank 0 lists the parts not yet
written and every rank takes every R-th of them; each part is read by a loader of its own (rank 0 of 1, one reader),
so a part's batches, and with them its embeddings bit for bit, do not depend on how many ranks share the work. A
part appears only when complete, so a killed pass, rerun with any number of ranks, embeds only the missing parts.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from jobs.eval.encoder_source import load_source, resolve_source
from jobs.eval.features import extract_features
from jobs.launch import Dist
from jobs.linear_probe import eval_data_config, input_shape
from pipeline.config import ShardSource, eval_augment, eval_preprocessing
from pipeline.curate.config import fingerprint
from pipeline.curate.embeddings import EmbeddingSet, part_counts, part_url, write_part
from pipeline.curate.records import make_ordinals
from pipeline.curate.shard_samples import list_samples
from pipeline.curate.storage import exists
from pipeline.loader import build_loader
from pipeline.shards import resolve

log = logging.getLogger(__name__)

# Test hook: "N" SIGKILLs this rank's process group after it has written N parts (a crash mid-pass).
KILL_HOOK_ENV = "CANVIT_CURATE_TEST_KILL_AFTER_PARTS"


@dataclass(frozen=True)
class EmbedConfig:
    encoder: str  # run dir, checkpoint, or exported .safetensors
    shards: str  # manifest.parquet, brace pattern or prefix of the input shards
    work: str  # folder for the parts (the curation's OUTPUT/_curate)
    pool: str = "avg"  # as the probe: "avg" = mean of patch tokens, "token" = cls
    batch_size: int = 128  # images per forward pass
    workers: int = 1  # shard readers per part loader (the merge order is fixed, so any number gives the same batches)
    # Input shards per part: a part is the unit of work and of resume; a loader's start-up (~1 s) is paid per part.
    shards_per_part: int = 8
    img_size: int | None = None  # a ResNet's input size when nothing records it (a ViT's is fixed)
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EmbedStats:
    samples: int  # embedded by this call, all ranks together (0 when every part existed)
    seconds: float
    ranks: int


def embed(cfg: EmbedConfig, world: Dist) -> tuple[EmbeddingSet, EmbedStats]:
    """Collective: every rank calls it and gets the complete EmbeddingSet."""
    t0 = time.monotonic()
    so = cfg.storage_options
    shards = tuple(resolve(ShardSource(cfg.shards), so)[0])
    if not shards:
        raise FileNotFoundError(f"{cfg.shards}: no input shards")
    source = resolve_source(cfg.encoder)
    encoder: list[nn.Module] = []

    def get_encoder() -> nn.Module:  # loaded only when some part is missing
        if not encoder:
            encoder.append(load_source(source, cfg.pool).to(world.device))
        return encoder[0]

    shape = input_shape(source, get_encoder, cfg.img_size)
    augment = eval_augment(source.eval_preprocessing()[0])
    folder = f"{cfg.work}/embed-" + fingerprint(source.fingerprint(), shards, cfg.pool, shape,
                                                eval_preprocessing(augment), cfg.shards_per_part, cfg.batch_size)
    num_parts = -(-len(shards) // cfg.shards_per_part)
    todo = [[p for p in range(num_parts) if not exists(part_url(folder, p), so)] if world.is_main else None]
    if world.world_size > 1:
        dist.broadcast_object_list(todo, src=0)
    done = 0
    for n, p in enumerate(todo[0][world.rank::world.world_size], start=1):
        part_shards = shards[p * cfg.shards_per_part:(p + 1) * cfg.shards_per_part]
        done += embed_part(part_url(folder, p), part_shards, p * cfg.shards_per_part, get_encoder(), shape, augment,
                           cfg, world.device)
        if os.environ.get(KILL_HOOK_ENV) == str(n):
            os.killpg(os.getpgrp(), signal.SIGKILL)
    total = torch.tensor([done], dtype=torch.int64)
    if world.world_size > 1:
        dist.all_reduce(total)
    if world.is_main and not exists(f"{folder}/parts.json", so):
        counts = [part_counts(part_url(folder, p), so) for p in range(num_parts)]
        EmbeddingSet(folder, shards, cfg.shards_per_part, counts[0].dim, sum(c.listed for c in counts),
                     sum(c.embedded for c in counts)).save(so)
    if world.world_size > 1:
        dist.barrier()
    stats = EmbedStats(int(total.item()), time.monotonic() - t0, world.world_size)
    return EmbeddingSet.load(folder, so), stats


def embed_part(url: str, part_shards: tuple[str, ...], first_shard: int, encoder: nn.Module, shape: tuple[int, int],
               augment, cfg: EmbedConfig, device: torch.device) -> int:
    """Embed the samples of `part_shards` (input shards first_shard, first_shard + 1, ...) and write the part.
    Returns the number of samples embedded (samples the loader skipped as unreadable are not in the part)."""
    data_cfg = eval_data_config("", shape[0], shape[1], cfg.batch_size, cfg.workers, cfg.storage_options, augment)
    loader = build_loader(data_cfg.with_(shards=tuple(ShardSource(u) for u in part_shards)), 0, 1, device)
    feats = extract_features(encoder, loader)
    loader.close()
    where: dict[str, int] = {}
    listed = 0
    for i, shard in enumerate(part_shards):
        keys = [s.key for s in list_samples(shard, cfg.storage_options)]
        where |= zip(keys, make_ordinals(first_shard + i, np.arange(len(keys))).tolist())
        listed += len(keys)
    if len(where) != listed:
        raise ValueError(f"{part_shards}: sample keys repeat across these shards; curation needs unique keys")
    ordinals = np.array([where[k] for k in feats.keys], dtype=np.int64)
    order = np.argsort(ordinals)
    write_part(url, ordinals[order], feats.keys[order], feats.labels[order], feats.feats[order], listed,
               cfg.storage_options)
    log.info("part %s: %d of %d samples embedded", url.rsplit("/", 1)[-1], len(order), listed)
    return len(order)
