"""Curate an uncurated sharded dump with the project's own pretrained encoder: embed, semantic dedup, cluster-balanced
sampling, new shards.

    python tools/curate.py --shards s3://data/v1/manifest.parquet --encoder runs/can_first_pass \\
        --output s3://data/v1-curated [--dedup-threshold 0.95] [--target-size N] [--levels 3] [--workers 16]
    torchrun --nproc_per_node 8 tools/curate.py ...          # the embedding pass on 8 ranks (GPUs), the rest on rank 0
    deepspeed --num_gpus 8 tools/curate.py ...               # same

Then train on it by changing only the data: `--set data.shards=s3://data/v1-curated/manifest.parquet`.

1. Embed (jobs/curate/embed.py): every sample once, through the pipeline's eval mode and the encoder exactly as
   jobs/linear_probe.py extracts features, on all ranks; parts of --shards-per-part input shards under
   OUTPUT/_curate/embed-*/; a killed pass resumes at the parts it has, with any number of ranks.
2. Semantic dedup (pipeline/curate/dedup_stage.py): spherical k-means (faiss) into clusters of about
   --dedup-cluster-size samples, centroids fitted on a sample; within each cluster, samples with cosine above
   --dedup-threshold form groups (connected components), each keeps its lowest input ordinal. Clusters run in
   parallel as Ray tasks (--workers local CPUs, or --ray-address).
3. Balanced sampling (balance_stage.py): hierarchical k-means (Vo et al. 2024): level 1 splits each dedup cluster
   into pieces of about --level1-size kept samples, levels 2..--levels cluster the centroids below them with
   --resampling-steps resampling steps; the target is split evenly down the hierarchy (--target-size).
4. Output (write_stage.py): NEW shards written by the ingest's writer (shard-NNNNNN.tar + .idx), manifest.parquet and
   shards.parquet (the loader's shard index), removed.parquet (each dropped sample: duplicate of which key and the
   similarity, or cut by balancing), report.json and clusters.png (thumbnails of the largest clusters before/after).
   Why new shards rather than a selection the reader applies, in I/O at 300M images: write_stage.py's docstring and
   the README's "Curate" section. In short: rewriting costs one pass (read the kept ~15 TB once, write it once);
   a selection costs every epoch either the full 30 TB streamed and half thrown away, or 150M ranged GETs.

Defaults (--levels 3, --level1-size 75, each level 10x fewer clusters; dedup clusters of 10,000):
    images   dedup clusters   level 1 / 2 / 3 clusters (for a ~20% duplicate rate)
    1M       100              ~10.7k / 1.1k / 107
    100M     10,000           ~1.07M / 107k / 10.7k
    1B       100,000          use --levels 4 --clusters 500000,50000,10000: ~10M / 500k / 50k / 10k, Vo et al.'s
                              (level 2 is then fitted on 10M centroids in one process: 30 GB at D=768)

Determinism: every random choice is a hash of input ordinals or a seeded k-means over inputs in ordinal order, and
task results combine in task order: the same inputs and arguments give the same curated shards on any number of
ranks or workers. Rerunning the same command after a kill redoes only what is missing; other arguments at the same
--output reuse the embeddings (and the dedup, if its arguments are unchanged) and need --overwrite.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch.distributed as dist

from jobs.curate.embed import EmbedConfig, embed
from jobs.launch import init_distributed
from pipeline.curate.config import BalanceConfig, CurateConfig, DedupConfig
from pipeline.curate.engine import check_output, run_curation
from pipeline.curate.report import format_table


def parse_args(argv: list[str] | None = None) -> tuple[EmbedConfig, CurateConfig]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="manifest.parquet, brace pattern or prefix of the input shards")
    p.add_argument("--encoder", required=True, help="run directory, checkpoint or exported encoder.safetensors")
    p.add_argument("--output", required=True)
    d, b, c, e = DedupConfig(), BalanceConfig(), CurateConfig(output=""), EmbedConfig("", "", "")
    p.add_argument("--dedup-threshold", type=float, default=d.threshold)
    p.add_argument("--dedup-cluster-size", type=int, default=d.cluster_size)
    p.add_argument("--target-size", type=int, default=None, help="samples to keep (default: all after dedup)")
    p.add_argument("--levels", type=int, default=b.levels)
    p.add_argument("--level1-size", type=int, default=b.level1_size)
    p.add_argument("--clusters", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                   help="k of levels 2..LEVELS, comma-separated (default: 10x fewer per level)")
    p.add_argument("--resampling-steps", type=int, default=b.resampling_steps)
    p.add_argument("--samples-per-shard", type=int, default=c.samples_per_shard)
    p.add_argument("--bucket-rows", type=int, default=c.bucket_rows, help="rows one reduce task holds")
    p.add_argument("--seed", type=int, default=c.seed)
    p.add_argument("--workers", type=int, default=c.workers, help="1 = in this process; N = Ray on N local CPUs")
    p.add_argument("--ray-address")
    p.add_argument("--pool", choices=("avg", "token"), default=e.pool)
    p.add_argument("--batch-size", type=int, default=e.batch_size, help="embedding images per forward pass")
    p.add_argument("--loader-workers", type=int, default=e.workers, help="shard readers per embedding loader")
    p.add_argument("--shards-per-part", type=int, default=e.shards_per_part)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace a curated dataset made with other arguments")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    output = a.output.rstrip("/")
    embed_cfg = EmbedConfig(encoder=a.encoder, shards=a.shards, work=f"{output}/_curate", pool=a.pool,
                            batch_size=a.batch_size, workers=a.loader_workers, shards_per_part=a.shards_per_part,
                            img_size=a.img_size, storage_options=a.storage_options)
    cfg = CurateConfig(
        output=output, dedup=DedupConfig(threshold=a.dedup_threshold, cluster_size=a.dedup_cluster_size),
        balance=BalanceConfig(target_size=a.target_size, level1_size=a.level1_size, levels=a.levels,
                              clusters=a.clusters, resampling_steps=a.resampling_steps),
        samples_per_shard=a.samples_per_shard, bucket_rows=a.bucket_rows, seed=a.seed, workers=a.workers,
        ray_address=a.ray_address, storage_options=a.storage_options, overwrite=a.overwrite)
    return embed_cfg, cfg


def main(argv: list[str] | None = None) -> int:
    embed_cfg, cfg = parse_args(argv)
    world = init_distributed()
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {world.rank}] %(name)s: %(message)s", force=True)
    if world.is_main:
        check_output(cfg)  # before any work: a finished dataset made with other arguments needs --overwrite
    emb, stats = embed(embed_cfg, world)
    if world.is_main:
        report = run_curation(emb, cfg, stats.samples, stats.seconds, stats.ranks)
        print(format_table(report))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
