"""Where a curation run puts things under its output prefix.

    OUTPUT/shard-000000.tar, shard-000000.idx ...   the curated dataset (the ingest's writer: same layout)
    OUTPUT/manifest.parquet                        one row per curated sample: key, shard, label, input ordinal, clusters
    OUTPUT/shards.parquet                          one row per shard: shard, samples (the loader's shard index)
    OUTPUT/removed.parquet                         one row per dropped sample: why (duplicate of which key, similarity;
                                                   or balance: its cluster was cut), and its clusters
    OUTPUT/clusters.png                            thumbnails of the largest top-level clusters, before and after
    OUTPUT/report.json                             counts, cluster sizes before and after; written last (= done)
    OUTPUT/_curate/embed-<fp>/part-000000.parquet  embeddings of input shards [0, shards_per_part), parts.json when all
    OUTPUT/_curate/dedup-<fp>/...                  dedup shuffle, per-bucket rows and level-1 centroids
    OUTPUT/_curate/balance-<fp>/...                selected rows by input part, removed rows by bucket
    OUTPUT/_curate/output-<fp>/manifest/...        each curated shard's manifest rows

<fp> fingerprints the stage's inputs and arguments (config.fingerprint), so a rerun with the same arguments reuses
every finished piece, and one with a new --target-size re-runs only the stages after dedup.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    output: str  # URL without trailing slash

    def shard(self, index: int) -> str:
        return f"{self.output}/{self.shard_name(index)}"

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shard-{index:06d}.tar"

    @property
    def manifest(self) -> str:
        return f"{self.output}/manifest.parquet"

    @property
    def shard_index(self) -> str:
        """One row per shard (shard, samples): what the loader reads for `data.shards=.../manifest.parquet`."""
        return f"{self.output}/shards.parquet"

    @property
    def removed(self) -> str:
        return f"{self.output}/removed.parquet"

    @property
    def grid(self) -> str:
        return f"{self.output}/clusters.png"

    @property
    def report(self) -> str:
        return f"{self.output}/report.json"

    @property
    def work(self) -> str:
        return f"{self.output}/_curate"

    def stage(self, name: str, fp: str) -> str:
        return f"{self.work}/{name}-{fp}"
