"""tools/curate.py end to end: real shards, a real encoder export, the eval loader, DeepSpeed ranks, Ray, loopback S3.

Three launches share the work of every property (each launch costs ~10 s of start-up on 2 cores):
  A1  1 rank, in-process stages, killed (SIGKILL of its process group) after its first embedding part
  A2  the same command again: resumes, embeds only the missing parts, finishes
  B   torchrun with 2 ranks joining a Ray node started by `ray start` (2 CPUs, --ray-address), the output on S3
A (killed and resumed, 1 rank, 1 worker) and B must produce the same curated dataset byte for byte, and B's tasks
run the `pipeline` package the driver shipped (as on a cluster whose nodes have no copy of the repository).
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.curate.embed import KILL_HOOK_ENV
from model.export import export_encoder
from model.vit import vit_from_preset
from pipeline.config import DataConfig
from pipeline.curate.config import BalanceConfig, CurateConfig, DedupConfig
from pipeline.curate.engine import OutputExists, check_output
from pipeline.ingest.writer import write_shard
from pipeline.loader import build_loader
from tests.ingest.test_ray import _start_node
from tools.local_s3 import free_port

REPO = Path(__file__).resolve().parents[2]
SHARDS, PER_SHARD = 5, 24
CLASS_SIZES = [45, 25, 12, 8]  # distinct images per class: lopsided
SOURCES, COPIES = 3, 10  # near-copies: JPEG re-encodes of 3 images, 10 each
TARGET = 60


def _pattern(rng: np.random.Generator, label: int) -> Image.Image:
    """A 32 px image: a random 8 x 8 colour layout tinted by its class. Measured with this random-init encoder:
    distinct images' nearest neighbours <= 0.94 cosine, JPEG re-encodes of one image >= 0.98."""
    tint = np.array([(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)][label], np.float32)
    grid = np.clip(tint + rng.normal(0, 127, (8, 8, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(grid).resize((32, 32), Image.BICUBIC)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> dict:
    """5 shards of 24 labelled samples: 90 distinct images and 30 near-copies of 3 of them, in shuffled order.
    Returns the shard pattern and {key: group} (a copy's group is its source's key)."""
    rng = np.random.default_rng(0)
    items = []  # (group, label, jpeg)
    for label, n in enumerate(CLASS_SIZES):
        for _ in range(n):
            items.append((len(items), label, _pattern(rng, label)))
    sources = rng.choice(len(items), SOURCES, replace=False)
    samples = [(g, label, _jpeg(img, 90)) for g, label, img in items]
    for j in range(SOURCES * COPIES):
        g, label, img = items[sources[j % SOURCES]]
        samples.append((g, label, _jpeg(img, int(rng.integers(60, 96)))))
    samples = [samples[i] for i in rng.permutation(len(samples))]
    root = tmp_path_factory.mktemp("dump")
    groups = {}
    for s in range(SHARDS):
        part = []
        for i in range(PER_SHARD):
            g, label, data = samples[s * PER_SHARD + i]
            key = f"s{s}i{i:02d}"
            groups[key] = g
            part.append((key, {"jpg": data, "json": json.dumps({"key": key}).encode(), "cls": str(label).encode()}))
        write_shard(str(root / f"shard-{s:06d}.tar"), part)
    encoder = root / "encoder.safetensors"
    torch.manual_seed(0)
    export_encoder(vit_from_preset("vit_tiny", img_size=32, patch_size=8).state_dict(), encoder, preset="vit_tiny")
    return {"shards": str(root / f"shard-{{000000..{SHARDS - 1:06d}}}.tar"), "groups": groups, "encoder": encoder,
            "sources": set(int(s) for s in sources)}


def _args(dump: dict, output: str) -> list[str]:
    return ["--shards", dump["shards"], "--encoder", str(dump["encoder"]), "--output", output,
            "--shards-per-part", "2", "--batch-size", "16", "--dedup-threshold", "0.96", "--dedup-cluster-size", "40",
            "--bucket-rows", "50", "--level1-size", "5", "--levels", "2", "--clusters", "4",
            "--target-size", str(TARGET), "--samples-per-shard", "25"]


def _launch(args: list[str], ranks: int, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    script = str(REPO / "tools" / "curate.py")
    cmd = [sys.executable, script, *args] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
        script, *args]
    # its own session: the kill hook SIGKILLs the launch's whole process group, not pytest
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)


@pytest.fixture(scope="module")
def ray_node(s3_server):
    """A one-node Ray cluster with 2 CPUs and its own temp dir (short: Ray's socket paths are limited to 107 bytes),
    so what it unpacks comes from this module's launch alone. Yields (address, driver env, temp dir)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayc"))
    env = {**os.environ, **s3_server.env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    proc, text = _start_node(["--head", "--port=0", "--include-dashboard=false", "--num-cpus=2"], "127.0.0.4",
                             temp_dir, env)
    try:
        yield re.search(r"--address='(127\.0\.0\.4:\d+)'", text).group(1), env, temp_dir
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        proc.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(dump, tmp_path_factory, s3_server, ray_node) -> dict:
    local = tmp_path_factory.mktemp("curated") / "out"
    killed = _launch(_args(dump, str(local)), 1, {KILL_HOOK_ENV: "1"})
    embed_dir = next((local / "_curate").glob("embed-*"))
    parts_after_kill = sorted(p.name for p in embed_dir.glob("part-*.parquet"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in embed_dir.glob("part-*.parquet")}
    report_after_kill = (local / "report.json").exists()
    resumed = _launch(_args(dump, str(local)), 1)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    remote = s3_server.make_bucket("curate-e2e") + "/out"
    address, env, ray_dir = ray_node
    two = _launch(_args(dump, remote) + ["--ray-address", address], 2, env)
    assert two.returncode == 0, two.stderr[-4000:]
    shipped = list(ray_dir.glob("session_*/runtime_resources/py_modules_files/*/pipeline/curate/engine.py"))
    return {"local": local, "remote": remote, "killed": killed, "parts_after_kill": parts_after_kill,
            "mtimes": mtimes, "embed_dir": embed_dir, "report_after_kill": report_after_kill, "shipped": shipped}


def test_a_killed_embedding_pass_resumes_at_the_parts_it_has(runs):
    assert runs["killed"].returncode == -9  # the hook really killed it, mid-pass
    assert runs["parts_after_kill"] == ["part-000000.parquet"]  # 1 of 3 parts written
    assert not runs["report_after_kill"]
    after = {p.name: p.stat().st_mtime_ns for p in runs["embed_dir"].glob("part-*.parquet")}
    assert sorted(after) == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert after["part-000000.parquet"] == runs["mtimes"]["part-000000.parquet"]  # not embedded again
    report = json.loads((runs["local"] / "report.json").read_text())
    assert report["embedding"]["samples"] == (SHARDS - 2) * PER_SHARD  # only the missing parts' samples


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def test_one_rank_one_worker_and_two_ranks_on_a_ray_node_give_the_same_dataset(runs):
    assert runs["shipped"], "the Ray node did not unpack the pipeline package the driver shipped (py_modules)"
    local, remote = runs["local"], runs["remote"]
    names = sorted(p.name for p in local.iterdir() if p.suffix in (".tar", ".idx", ".parquet"))
    assert names == ["manifest.parquet", "removed.parquet", "shard-000000.idx", "shard-000000.tar",
                     "shard-000001.idx", "shard-000001.tar", "shard-000002.idx", "shard-000002.tar",
                     "shards.parquet"]
    for name in names:
        if name.endswith(".parquet"):
            a, b = pq.read_table(local / name), pq.read_table(io.BytesIO(_read(f"{remote}/{name}")))
            assert a.equals(b), name
        else:
            assert (local / name).read_bytes() == _read(f"{remote}/{name}"), name


def test_duplicates_removed_and_classes_balanced(runs, dump):
    report = json.loads((runs["local"] / "report.json").read_text())
    assert report["inputs"] == report["embedded"] == SHARDS * PER_SHARD
    assert report["selected"] == TARGET
    removed = pq.read_table(runs["local"] / "removed.parquet").to_pylist()
    groups = dump["groups"]
    dups = [r for r in removed if r["reason"] == "duplicate"]
    # every planted copy, and nothing else, is removed as a duplicate of its own source group
    assert len(dups) == SOURCES * COPIES
    assert all(groups[r["key"]] in dump["sources"] and groups[r["duplicate_of"]] == groups[r["key"]] for r in dups)
    assert all(r["similarity"] > 0.96 for r in dups)
    # balance: at the top level, a cluster ends more than 1 below another only when it gave all it had
    top = report["top_clusters"]
    most = max(t["selected"] for t in top)
    assert all(t["selected"] == t["after_dedup"] or t["selected"] >= most - 1 for t in top), top
    assert sum(t["raw"] for t in top) == SHARDS * PER_SHARD
    png = Image.open(runs["local"] / "clusters.png")
    assert png.width > 16 * 56 and png.height >= 2 * 56


def test_the_training_loader_streams_the_curated_manifest(runs):
    manifest = pq.read_table(runs["local"] / "manifest.parquet").to_pylist()
    assert len(manifest) == TARGET
    assert [m["ordinal"] for m in manifest] == sorted(m["ordinal"] for m in manifest)  # input order
    cfg = DataConfig(shards=str(runs["local"] / "manifest.parquet"), mode="eval", batch_size=16, img_size=32,
                     patch_size=8, num_views=1, workers=1, shuffle_buffer=0, device="cpu", dali_threads=1)
    keys, labels = [], {}
    for batch in build_loader(cfg, 0, 1, torch.device("cpu")):
        keys += batch["keys"]
        labels |= dict(zip(batch["keys"], batch["labels"].tolist()))
    assert sorted(keys) == sorted(m["key"] for m in manifest)  # every curated sample once
    assert all(labels[m["key"]] == m["label"] for m in manifest)


def test_other_arguments_at_a_finished_output_need_overwrite(runs):
    cfg = CurateConfig(output=str(runs["local"]), dedup=DedupConfig(threshold=0.96, cluster_size=40),
                       balance=BalanceConfig(target_size=TARGET + 1, level1_size=5, levels=2, clusters=(4,)),
                       samples_per_shard=25, bucket_rows=50)
    with pytest.raises(OutputExists, match="--overwrite"):
        check_output(cfg)
    check_output(CurateConfig(**{**cfg.__dict__, "overwrite": True}))
