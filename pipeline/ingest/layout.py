"""Where an ingest run puts things under its output prefix.

    OUTPUT/shard-000000.tar, shard-000000.idx ...    the dataset (published atomically, tar last)
    OUTPUT/manifest.parquet, rejects.parquet, report.json, classes.json
    OUTPUT/_ingest/config.json                        argument fingerprint: refuses a mismatched rerun
    OUTPUT/_ingest/stage/unit-000000.{tar,parquet}    phase-1 results (deleted after success unless --keep-staging)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    output: str  # URL without trailing slash

    def shard(self, index: int) -> str:
        return f"{self.output}/shard-{index:06d}.tar"

    def shard_name(self, index: int) -> str:
        return f"shard-{index:06d}"

    @property
    def work(self) -> str:
        return f"{self.output}/_ingest"

    @property
    def stage(self) -> str:
        return f"{self.work}/stage"

    def stage_tar(self, unit: int) -> str:
        return f"{self.stage}/unit-{unit:06d}.tar"

    def stage_table(self, unit: int) -> str:
        """Written after the unit's tar: its presence marks the unit done."""
        return f"{self.stage}/unit-{unit:06d}.parquet"

    @property
    def config(self) -> str:
        return f"{self.work}/config.json"

    @property
    def manifest(self) -> str:
        return f"{self.output}/manifest.parquet"

    @property
    def rejects(self) -> str:
        return f"{self.output}/rejects.parquet"

    @property
    def classes(self) -> str:
        return f"{self.output}/classes.json"

    @property
    def report(self) -> str:
        """Written last: its presence (with a matching config) marks the whole run done."""
        return f"{self.output}/report.json"
