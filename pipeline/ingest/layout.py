"""Where an ingest run puts things under its output prefix.

    OUTPUT/shard-000000.tar, shard-000000.idx ...    the dataset (published atomically, index before tar)
    OUTPUT/shards.parquet                             shard index: one row per shard (shard, samples, bytes)
    OUTPUT/manifest.parquet/part-000000.parquet ...   one row per sample, a part per shard (pyarrow reads the folder)
    OUTPUT/rejects.parquet/part-000000.parquet ...    one row per rejected input, a part per dedup group
    OUTPUT/rejects.parquet/quarantined-000000.parquet with --give-up-quarantined: the inputs of the units given up
    OUTPUT/report.json, classes.json                  report.json last: the run's completion mark
    OUTPUT/_ingest/config.json                        argument fingerprint: refuses a mismatched rerun
    OUTPUT/_ingest/plan/                              listing parts (list-TASK-SUB[_RANGE...]), plan.json, units.npz
    OUTPUT/_ingest/stage/unit-00000000.{tar,parquet}  phase 1: cleaned bytes and one row per input, per unit
    OUTPUT/_ingest/dedup/                             phase 2: hash records per group, losers per bucket
    OUTPUT/_ingest/resolved/                          phase 3: kept rows per group, in input order
    OUTPUT/_ingest/done/PHASE/ID.json                 a task's summary, written last: the task is done
    OUTPUT/_ingest/done/list/list-TASK-SUB....json    a listing task's result, until the plan is saved
    OUTPUT/_ingest/done/PHASE.parquet                 every task's summary: the phase is done
Everything under _ingest is deleted after success unless --keep-staging.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    output: str  # URL without trailing slash

    def shard(self, index: int) -> str:
        return f"{self.output}/{self.shard_file(index)}"

    @staticmethod
    def shard_file(index: int) -> str:
        return f"shard-{index:06d}.tar"

    @property
    def shard_index(self) -> str:
        return f"{self.output}/shards.parquet"

    @property
    def manifest(self) -> str:
        return f"{self.output}/manifest.parquet"

    def manifest_part(self, shard: int) -> str:
        return f"{self.manifest}/part-{shard:06d}.parquet"

    @property
    def rejects(self) -> str:
        return f"{self.output}/rejects.parquet"

    def rejects_part(self, group: int) -> str:
        return f"{self.rejects}/part-{group:06d}.parquet"

    def rejects_given_up(self, chunk: int) -> str:
        """The inputs of units still quarantined when a run was told to finalize without them: a part per chunk of
        units (give_up.py)."""
        return f"{self.rejects}/quarantined-{chunk:06d}.parquet"

    @property
    def classes(self) -> str:
        return f"{self.output}/classes.json"

    @property
    def report(self) -> str:
        """Written last: its presence (with a matching config) marks the whole run done."""
        return f"{self.output}/report.json"

    @property
    def work(self) -> str:
        return f"{self.output}/_ingest"

    @property
    def config(self) -> str:
        return f"{self.work}/config.json"

    def list_part(self, task: int, sub: int = 0, branch: tuple[int, ...] = ()) -> str:
        """Listing part of initial listing task `task`; sub >= 1: its sub-folder `sub`. `branch` places a part of a
        big listing cut into key ranges: the range's path in the tree of splits (its parent's part, then its
        children, 1, 2, ...). Sorting the names gives input order: "_" sorts after ".", so a part comes before
        its children, and the children in turn."""
        return f"{self.work}/plan/{_list_name(task, sub, branch)}.parquet"

    def list_done(self, task: int, sub: int = 0, branch: tuple[int, ...] = ()) -> str:
        """A listing task's result (list_part's numbering), written after its parts. A rerun after a kill during
        listing reuses it; once the plan is saved, the folder goes, so a later rerun lists everything again (to see
        whether the sources changed)."""
        return f"{self.work}/done/list/{_list_name(task, sub, branch)}.json"

    @property
    def plan(self) -> str:
        return f"{self.work}/plan/plan.json"

    def stage_tar(self, unit: int, attempt: str = "") -> str:
        """One attempt's tar of the unit's staged samples (its stage table names it: STAGE_TAR_KEY). Each attempt
        writes its own, so two attempts of a unit that overlap (a worker left running by a killed driver, a task
        Ray reruns while the first still runs) cannot pair one's table with the other's tar (review s16a). No
        attempt: the name of a version that wrote one tar per unit."""
        return f"{self.work}/stage/unit-{unit:08d}{'.' + attempt if attempt else ''}.tar"

    def stage_table(self, unit: int) -> str:
        """Written after the unit's tar: its presence marks the unit done."""
        return f"{self.work}/stage/unit-{unit:08d}.parquet"

    def dedup_records(self, group: int) -> str:
        """A map task's hash records, an Arrow IPC stream per bucket (exchange.py)."""
        return f"{self.work}/dedup/records/g-{group:06d}.parts"

    def dedup_losers(self, bucket: int) -> str:
        """A reduce task's losing inputs, an Arrow IPC stream per group."""
        return f"{self.work}/dedup/losers/b-{bucket:06d}.parts"

    def resolved(self, group: int) -> str:
        return f"{self.work}/resolved/g-{group:06d}.parquet"

    @property
    def quarantined(self) -> str:
        """The units the last run could not stage, each with the loose files it failed on (JSON {unit: [urls]}, []
        for a unit that failed whole): dedup results hold for that set of units only."""
        return f"{self.work}/quarantined.json"

    @property
    def dedup_layout(self) -> str:
        """How the last run cut the dedup shuffle (its groups of units, buckets and bands): the done marks of map,
        reduce, resolve and shard are numbered by them, so they hold for that cut only."""
        return f"{self.work}/dedup_layout.json"

    def done(self, phase: str, task: int) -> str:
        return f"{self.work}/done/{phase}/{task:08d}.json"

    def phase_done(self, phase: str) -> str:
        return f"{self.work}/done/{phase}.parquet"


def _list_name(task: int, sub: int, branch: tuple[int, ...]) -> str:
    """list-TASK-SUB[_RANGE...]: a listing task's name, for its part and its record."""
    return f"list-{task:06d}-{sub:08d}" + "".join(f"_{i:04d}" for i in branch)
