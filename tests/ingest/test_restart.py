"""kill -9 in every phase, one after another on the same output, then a last rerun: the output equals a clean run's.

Each run is killed by the test hook (CANVIT_INGEST_TEST_KILL_AFTER=PHASE:N: SIGKILL to the whole process group
after N completed tasks of that phase), a point every run reaches, and the test asserts it was killed (exit by
SIGKILL, no report.json) and that the phases before it left their work saved, so each rerun resumes the previous
one's state. The reference is an in-process run with 1 worker; the killed runs and the last one use 2 worker
processes through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.ingest.config import IngestConfig
from pipeline.ingest.engine import run_ingest
from pipeline.ingest.phase import KILL_HOOK_ENV
from tests.ingest.helpers import Killed, check_readable, kill_at, shard_contents

_ARGS = ["--unit-size", "10", "--samples-per-shard", "8", "--quiet"]
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (hook, what must be saved on storage once it has fired): every phase of engine.py, in order.
_KILLS = [("list:1", "_ingest/plan"), ("stage:2", "_ingest/stage"), ("map:1", "_ingest/done/map"),
          ("reduce:1", "_ingest/done/reduce"), ("resolve:1", "_ingest/resolved"), ("shard:3", "shard-000002.tar")]


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """60 distinct JPEGs and 4 exact copies of earlier ones (so dedup has work), 7 units of up to 10 files."""
    root = tmp_path_factory.mktemp("killdump")
    rng = np.random.default_rng(0)
    for i in range(60):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((160 + i, 120), Image.Resampling.BILINEAR)
        img.save(root / f"img{i:03d}.jpg", quality=90)
    for i in (3, 17, 31, 45):
        shutil.copy(root / f"img{i:03d}.jpg", root / f"z_copy{i:03d}.jpg")
    return root


@pytest.fixture(scope="module")
def reference(dump, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ds"
    report = run_ingest(IngestConfig(sources=(str(dump),), output=str(out), unit_size=10, samples_per_shard=8,
                                     workers=1, quiet=True))
    assert report["duplicates"] == 4
    return shard_contents(out)


def _cli(dump, out, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "tools/shard.py", str(dump), "--output", str(out), "--workers", "2", *_ARGS]
    return subprocess.run(cmd, env=env, cwd=_REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=120)


def test_kill_in_every_phase_then_resume(dump, reference, tmp_path):
    out = tmp_path / "ds"
    for hook, saved in _KILLS:
        proc = _cli(dump, out, {KILL_HOOK_ENV: hook})
        assert proc.returncode == -signal.SIGKILL, f"{hook}: the run was not interrupted ({proc.stderr.decode()})"
        assert not (out / "report.json").exists(), hook
        assert (out / saved).exists(), f"{hook}: {saved} was not saved before the kill"
    proc = _cli(dump, out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert shard_contents(out) == reference
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert [p.name for p in (out / "_ingest").iterdir()] == ["config.json"]
    check_readable(out)


def test_a_relisting_killed_before_a_source_changed_does_not_hide_the_change(tmp_path, monkeypatch):
    """Run 1 saves its plan and stages some units, killed; run 2, listing again to compare, is killed after one
    listing task; then a file of that task's folder changes. Run 3 must list it again (not take run 2's record of
    it), see the change, discard the stale staged work and store the new image (kills raised in-process)."""
    from pipeline.ingest import phase as phase_module, plan as plan_module

    rng = np.random.default_rng(5)

    def jpeg(path):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")
        return path.read_bytes()

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            jpeg(tmp_path / name / f"{i}.jpg")
    cfg = IngestConfig(sources=(str(tmp_path / "a"), str(tmp_path / "b")), output=str(tmp_path / "out"), workers=1,
                       unit_size=1, dedup="none", quiet=True)
    with monkeypatch.context() as m:
        m.setattr(phase_module, "maybe_kill", kill_at("stage", 4))
        with pytest.raises(Killed):
            run_ingest(cfg)
    assert (tmp_path / "out/_ingest/plan/plan.json").exists()
    with monkeypatch.context() as m:
        m.setattr(plan_module, "maybe_kill", kill_at("list", 1))
        with pytest.raises(Killed):
            run_ingest(cfg)
    assert list((tmp_path / "out/_ingest/done/list").iterdir())  # run 2 recorded what it listed
    old = (tmp_path / "a/0.jpg").read_bytes()
    new = jpeg(tmp_path / "a/0.jpg")
    report = run_ingest(cfg)
    stored = {sample["jpg"] for sample in shard_contents(tmp_path / "out").values()}
    assert new in stored and old not in stored and report["kept"] == 6


@pytest.mark.parametrize("kill, first, second", [
    ("resolve", {"group_inputs": 10, "bucket_records": 9}, {"group_inputs": 25}),
    ("reduce", {"bucket_records": 9}, {"bucket_records": 1000}),
])
def test_a_rerun_that_cuts_the_dedup_shuffle_differently_redoes_it(dump, reference, tmp_path, monkeypatch,
                                                                   kill, first, second):
    """group_inputs and bucket_records are not fingerprinted (the output does not depend on them), but the done
    marks of map/reduce/resolve/shard are numbered by group and bucket: resumed under another cut, they were mixed
    with it (reviews s16a/s16b: 20 samples lost and 4 duplicates kept; the buckets past the new count never
    reduced). The cut is recorded, and a rerun that cuts differently redoes those phases."""
    from pipeline.ingest import phase as phase_module

    base = dict(sources=(str(dump),), output=str(tmp_path / "ds"), unit_size=10, samples_per_shard=8, workers=1,
                quiet=True)
    with monkeypatch.context() as m:
        m.setattr(phase_module, "maybe_kill", kill_at(kill, 2))
        with pytest.raises(Killed):
            run_ingest(IngestConfig(**base, **first))
    report = run_ingest(IngestConfig(**base, **second))
    assert report["kept"] == 60 and report["duplicates"] == 4
    assert shard_contents(tmp_path / "ds") == reference


def test_a_transient_store_fault_after_staging_is_retried_not_fatal(dump, reference, tmp_path, monkeypatch):
    """Map, reduce, resolve and shard tasks, and the driver's phase checkpoints, had no retry but s3fs's own: one
    reset or SlowDown failed a reduce task and stopped the run after its phase; a failed checkpoint write was an
    uncaught error of the driver. Now each task is retried whole (its outputs are written whole before its done
    mark) and so is each checkpoint."""
    from pipeline.ingest import exchange, phase as phase_module

    def flaky(fn, faults: int):
        calls = {"n": 0}

        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] <= faults:
                raise ConnectionResetError(f"fault {calls['n']} (test)")
            return fn(*args, **kwargs)
        return call, calls

    read_part, reads = flaky(exchange.read_part, 2)
    put_table, puts = flaky(phase_module.put_table, 1)
    monkeypatch.setattr(exchange, "read_part", read_part)
    monkeypatch.setattr(phase_module, "put_table", put_table)
    cfg = IngestConfig(sources=(str(dump),), output=str(tmp_path / "ds"), unit_size=10, samples_per_shard=8,
                       workers=1, quiet=True, retry_base_s=0.01)
    report = run_ingest(cfg)
    assert reads["n"] > 2 and puts["n"] > 1  # the faults were met
    assert report["kept"] == 60 and report["duplicates"] == 4
    assert shard_contents(tmp_path / "ds") == reference


def test_a_rerun_of_a_complete_output_removes_staging_left_behind(dump, tmp_path):
    """A run killed (or failing) while removing its staged work left it, billed (~20 TB of JPEGs at 300M images),
    and every later rerun returned "already complete" before removing it (review s16a). Staging kept by
    --keep-staging stays (review s16c); a report that did not keep it stands in for the killed removal."""
    base = dict(sources=(str(dump),), output=str(tmp_path / "ds"), unit_size=10, samples_per_shard=8, workers=1,
                quiet=True)
    first = run_ingest(IngestConfig(**base, keep_staging=True))
    assert (tmp_path / "ds/_ingest/stage").is_dir()
    assert run_ingest(IngestConfig(**base)) == first  # complete: not run again, and staging kept on purpose stays
    assert (tmp_path / "ds/_ingest/stage").is_dir()
    report = json.loads((tmp_path / "ds/report.json").read_text())
    report["config"]["keep_staging"] = False  # as a run that was removing its staging when it was killed
    (tmp_path / "ds/report.json").write_text(json.dumps(report))
    run_ingest(IngestConfig(**base))
    assert [p.name for p in (tmp_path / "ds/_ingest").iterdir()] == ["config.json"]


def test_dedup_groups_are_cut_by_shuffle_records(dump, tmp_path, monkeypatch):
    """A map task holds its group's shuffle records: with more bands per input (a larger --near-threshold at scale)
    groups get fewer inputs (engine.GROUP_RECORDS), and the output does not change."""
    from pipeline.ingest import engine

    base = dict(sources=(str(dump),), unit_size=10, samples_per_shard=8, workers=1, quiet=True, dedup="near")
    whole = run_ingest(IngestConfig(output=str(tmp_path / "a"), **base))
    monkeypatch.setattr(engine, "GROUP_RECORDS", 17 * 20)  # 20 inputs of 17 records (15 bands at t = 4)
    cut = run_ingest(IngestConfig(output=str(tmp_path / "b"), keep_staging=True, **base))
    assert len(list((tmp_path / "b/_ingest/dedup/records").iterdir())) == 4  # 64 inputs, units of 10: 20 + 20 + 20 + 4
    assert shard_contents(tmp_path / "b") == shard_contents(tmp_path / "a")
    assert (whole["kept"], whole["duplicates"]) == (cut["kept"], cut["duplicates"])


def test_two_overlapping_attempts_of_a_unit_never_pair_a_table_with_the_others_tar(dump, reference, tmp_path,
                                                                                     monkeypatch):
    """Two attempts of one stage unit can overlap: a pool worker finishing its unit after its driver was killed, while
    the rerun stages the same unit; Ray rerunning a task it thinks lost. Each publishes its tar, then its table,
    whose offsets point into its own tar. With one tar name per unit, attempt B's tar could replace A's between A's
    tar and A's table: A's table then described B's tar (cleaned in another order) and shards got wrong bytes
    (review s16a). And A's table must not replace B's once published: map may have read B's (review s16d). Here B
    runs whole inside A's last step, cleaning in reverse order: B's table stays, A's tar is removed."""
    import pyarrow.parquet as pq

    from pipeline.ingest import engine, stage

    tasks, real_items, real_put = [], stage._items, stage.put_bytes_if_absent
    published = []

    def capture(task):
        tasks.append(task)
        return engine_run_stage(task)

    def reversed_items(task):
        return iter(list(real_items(task))[::-1])

    def put_bytes_if_absent(url, data, storage_options):
        if url.endswith("unit-00000000.parquet") and len(tasks) == 1:
            tasks.append("B")
            with monkeypatch.context() as m:
                m.setattr(stage, "_items", reversed_items)
                m.setattr(stage, "put_bytes_if_absent", real_put)
                stage.run_stage(tasks[0])  # attempt B, whole: its tar, then its table
        written = real_put(url, data, storage_options)
        published.append((url, written))
        return written

    engine_run_stage = engine.run_stage
    monkeypatch.setattr(engine, "run_stage", capture)
    monkeypatch.setattr(stage, "put_bytes_if_absent", put_bytes_if_absent)
    out = tmp_path / "ds"
    run_ingest(IngestConfig(sources=(str(dump),), output=str(out), unit_size=10, samples_per_shard=8,
                            workers=1, quiet=True, keep_staging=True))
    assert tasks[1] == "B"
    assert shard_contents(out) == reference
    assert published[0][0].endswith("unit-00000000.parquet") and not published[0][1]  # A found B's table there
    stage_dir = out / "_ingest/stage"
    tars = sorted(p.name for p in stage_dir.glob("unit-00000000.*.tar"))
    attempt = pq.read_schema(stage_dir / "unit-00000000.parquet").metadata[stage.STAGE_TAR_KEY].decode()
    assert tars == [f"unit-00000000.{attempt}.tar"]  # B's, the one its table names; A removed its own


def test_a_table_write_whose_answer_was_lost_is_found_as_this_attempts_own(dump, reference, tmp_path, monkeypatch):
    """The table's write reaches the store but its answer is lost (a reset after the PUT): the retry finds a table
    there. It is this attempt's (its metadata names this attempt's tar), so the tar stays and the run goes on."""
    from pipeline.ingest import stage

    real_put, lost = stage.put_bytes_if_absent, []

    def answer_lost(url, data, storage_options):
        written = real_put(url, data, storage_options)
        if url.endswith("unit-00000000.parquet") and not lost:
            lost.append(written)
            raise ConnectionResetError("connection reset after the request was sent")
        return written

    monkeypatch.setattr(stage, "put_bytes_if_absent", answer_lost)
    out = tmp_path / "ds"
    run_ingest(IngestConfig(sources=(str(dump),), output=str(out), unit_size=10, samples_per_shard=8, workers=1,
                            quiet=True, keep_staging=True))
    assert lost == [True]
    assert shard_contents(out) == reference
    assert len(list((out / "_ingest/stage").glob("unit-00000000.*.tar"))) == 1
