"""jobs/linear_probe.py end to end: real shards, the real eval loader, an exported encoder, 1 and 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.export import export_encoder
from model.vit import vit_from_preset
from tools.local_s3 import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def random_encoder(tmp_path_factory) -> Path:
    """A vit_tiny at random init (32 px, patch 4), exported as tools/export.py would."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    export_encoder(vit_from_preset("vit_tiny", img_size=32, patch_size=4).state_dict(), path, preset="vit_tiny")
    return path


def _run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "jobs.linear_probe", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               "-m", "jobs.linear_probe", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _args(encoder: Path, shards: dict, out: Path) -> list[str]:
    return ["--encoder", str(encoder), "--train-shards", shards["train"], "--val-shards", shards["val"],
            "--output", str(out / "probe.json"), "--features-cache", str(out / "cache"), "--batch-size", "8",
            "--workers", "1", "--epochs", "30", "--warmup-epochs", "3", "--probe-batch-size", "16"]


def _cached(cache: Path, split: str) -> dict[str, np.ndarray]:
    return {name: np.load(cache / f"{split}_{name}.npy") for name in ("features", "labels", "keys")}


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, random_encoder, colour_shards) -> Path:
    out = tmp_path_factory.mktemp("probe1")
    _run(_args(random_encoder, colour_shards, out), nproc=1)
    return out


def test_probe_separates_colours_and_writes_json(one_rank_run):
    result = json.loads((one_rank_run / "probe.json").read_text())
    assert result["num_train"] == 48 and result["num_val"] == 24 and result["num_classes"] == 3
    # three colour classes: even random-init features separate them
    assert result["top1"] >= 95.0, result
    assert result["top5"] == 100.0


def test_every_sample_once_with_labels_from_the_shards(one_rank_run, colour_shards):
    train = _cached(one_rank_run / "cache", "train")
    assert train["features"].shape == (48, 192)
    assert len(set(train["keys"].tolist())) == 48
    # keys encode the shard and position; labels came from KEY.cls
    assert train["keys"][0] == "tr000000" and set(train["labels"].tolist()) <= {0, 1, 2}


def test_second_run_reuses_the_cache(one_rank_run, random_encoder, colour_shards):
    before = (one_rank_run / "cache" / "train_features.npy").stat().st_mtime_ns
    proc = _run(_args(random_encoder, colour_shards, one_rank_run), nproc=1)
    assert "reusing 48 cached features" in proc.stderr and "reusing 24 cached features" in proc.stderr
    assert (one_rank_run / "cache" / "train_features.npy").stat().st_mtime_ns == before


def test_two_ranks_extract_the_same_features_as_one(one_rank_run, random_encoder, colour_shards, tmp_path):
    _run(_args(random_encoder, colour_shards, tmp_path), nproc=2)
    for split in ("train", "val"):
        one, two = _cached(one_rank_run / "cache", split), _cached(tmp_path / "cache", split)
        assert two["keys"].tolist() == one["keys"].tolist()  # each sample exactly once, same order
        np.testing.assert_array_equal(two["labels"], one["labels"])
        np.testing.assert_allclose(two["features"], one["features"], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "probe.json").read_text())["top1"] >= 95.0
