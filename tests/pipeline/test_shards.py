"""Shard resolution and the reader assignment invariants (no DALI, no network except the manifest/prefix tests)."""

from __future__ import annotations

import collections

import pyarrow as pa
import pyarrow.parquet as pq
import fsspec
import pytest

from pipeline.config import ShardSource, data_config_from_dict
from pipeline.shards import ShardPlan, build_plan, expand_braces, list_prefix, read_manifest, reader_id


def test_expand_braces_keeps_zero_padding_and_nests():
    assert expand_braces("s3://b/ds/shard-{000008..000011}.tar") == [
        f"s3://b/ds/shard-{i:06d}.tar" for i in range(8, 12)]
    assert expand_braces("x{0..1}-{00..01}") == ["x0-00", "x0-01", "x1-00", "x1-01"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_prefix_listing_and_manifest(dataset):
    prefix, keys = dataset
    shards = list_prefix(prefix, {})
    assert shards == [f"{prefix}/shard-{i:06d}.tar" for i in range(4)]
    table = pa.table({"key": keys, "shard": [f"shard-{int(k[1]):06d}.tar" for k in keys]})
    with fsspec.open(f"{prefix}-manifest/manifest.parquet", "wb") as f:
        pq.write_table(table, f)
    counts = read_manifest(f"{prefix}-manifest/manifest.parquet", {})
    assert counts == {f"{prefix}-manifest/shard-{i:06d}.tar": 12 for i in range(4)}


def test_shard_index_beside_a_manifest_in_parts(dataset):
    """tools/shard.py's layout: manifest.parquet is a folder of parts, shards.parquet one row per shard; the index is
    what gets read (its counts differ from the parts' here, so reading the parts instead would fail)."""
    prefix, _ = dataset
    out = f"{prefix}-index"
    for i in range(2):
        with fsspec.open(f"{out}/manifest.parquet/part-{i:06d}.parquet", "wb") as f:
            pq.write_table(pa.table({"key": ["a", "b"], "shard": [f"shard-{i:06d}.tar"] * 2}), f)
    parts = {f"{out}/shard-{i:06d}.tar": 2 for i in range(2)}
    assert read_manifest(f"{out}/manifest.parquet", {}) == parts
    with fsspec.open(f"{out}/shards.parquet", "wb") as f:
        pq.write_table(pa.table({"shard": ["shard-000001.tar", "shard-000000.tar"], "samples": [7, 5]}), f)
    index = {f"{out}/shard-000000.tar": 5, f"{out}/shard-000001.tar": 7}
    assert read_manifest(f"{out}/manifest.parquet", {}) == index
    assert read_manifest(f"{out}/shards.parquet", {}) == index


def _plan(num_shards: int, readers: int, seed: int = 0) -> ShardPlan:
    return ShardPlan((tuple(f"s{i}" for i in range(num_shards)),), (1.0,), readers, seed)


@pytest.mark.parametrize("num_shards,readers", [(10, 4), (3, 4), (8, 8), (1, 3)])
def test_eval_assignment_partitions_shards(num_shards, readers):
    plan = _plan(num_shards, readers)
    got = [s for r in range(readers) for s in plan.eval_shards(r)]
    assert sorted(got) == sorted(plan.all_shards)


@pytest.mark.parametrize("num_shards,world,workers", [(64, 64, 4), (10, 8, 2), (130, 64, 4)])
def test_eval_shards_reach_every_rank_before_any_gets_a_second(num_shards, world, workers):
    """Few validation shards on many ranks: each rank's workers together hold num_shards // world or one more."""
    plan = _plan(num_shards, world * workers)
    per_rank = [[s for w in range(workers) for s in plan.eval_shards(reader_id(r, w, workers, world, False))]
                for r in range(world)]
    assert sorted(s for p in per_rank for s in p) == sorted(plan.all_shards)
    assert {len(p) for p in per_rank} <= {num_shards // world, num_shards // world + 1}, [len(p) for p in per_rank]
    train_ids = sorted(reader_id(r, w, workers, world, True) for r in range(world) for w in range(workers))
    assert train_ids == list(range(world * workers))


@pytest.mark.parametrize("num_shards,readers", [(10, 4), (3, 4), (8, 8), (16, 4)])
def test_train_assignment_equal_disjoint_deterministic(num_shards, readers):
    plan = _plan(num_shards, readers, seed=3)
    for epoch in range(3):
        per_reader = [plan.train_shards(r, epoch) for r in range(readers)]
        assert len({len(p) for p in per_reader}) == 1 and len(per_reader[0]) >= 1  # no reader idles or waits
        flat = [s for p in per_reader for s in p]
        if num_shards >= readers:
            assert len(flat) == len(set(flat))  # disjoint within a shard-epoch
        assert per_reader == [_plan(num_shards, readers, seed=3).train_shards(r, epoch) for r in range(readers)]
    assert plan.train_shards(0, 0) != plan.train_shards(0, 1) or num_shards < 2 * readers


def test_train_mixing_follows_weights():
    plan = ShardPlan((tuple(f"a{i}" for i in range(50)), tuple(f"b{i}" for i in range(50))), (3.0, 1.0), 1, 0)
    counts = collections.Counter(s[0] for e in range(20) for s in plan.train_shards(0, e))
    assert 2.5 < counts["a"] / counts["b"] < 3.6


def test_config_from_yaml_dict():
    cfg = data_config_from_dict({"shards": [{"url": "s3://a/{0..1}.tar", "weight": 2}, {"url": "s3://b/"}],
                                 "augment": "mae", "num_views": 1})
    assert cfg.sources == (ShardSource("s3://a/{0..1}.tar", 2), ShardSource("s3://b/", 1.0))
    assert cfg.augment.jitter_p == 0 and cfg.augment.blur_p == 0 and cfg.augment.flip_p == 0.5
    cfg = data_config_from_dict({"augment": {"preset": "can", "blur_p": 0.1, "crop_scale": [0.3, 1.0]}})
    assert cfg.augment.blur_p == 0.1 and cfg.augment.crop_scale == (0.3, 1.0)


def test_build_plan_mixes_sources(dataset):
    prefix, _ = dataset
    plan, counts = build_plan((ShardSource(prefix + "/shard-{000000..000001}.tar", 1.0), ShardSource(prefix, 2.0)),
                              4, 0, {})
    assert [len(d) for d in plan.datasets] == [2, 4] and plan.weights == (1.0, 2.0) and counts == {}
