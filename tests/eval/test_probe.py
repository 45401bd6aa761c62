"""Linear probe head and feature cache: separable features are learned; caches round-trip and refuse mismatches."""

import numpy as np
import pytest
import torch

from jobs.eval.features import Features, dedupe_sorted, load_features, save_features
from jobs.eval.probe import ProbeConfig, evaluate_probe, make_probe, train_probe


def _blobs(n_per_class: int, num_classes: int, dim: int, seed: int, scale: float = 50.0):
    """Gaussian clusters around random centres, far from unit scale (the BN must handle it)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = (centres[labels] + torch.randn(len(labels), dim, generator=g)) * scale + 1000.0
    return feats, labels


@pytest.mark.parametrize("optimizer, batch_size", [("sgd", 64), ("lars", 0)])
def test_probe_learns_separable_features(optimizer, batch_size):
    xt, yt = _blobs(40, 5, 16, seed=0)
    xv, yv = _blobs(20, 5, 16, seed=1)
    # LARS moves each tensor by lr * eta (1e-3) of its norm per step: a 30-step probe needs a larger lr
    cfg = ProbeConfig(optimizer=optimizer, base_lr=10.0 if optimizer == "lars" else 0.5, epochs=30, warmup_epochs=3,
                      batch_size=batch_size)
    head = train_probe(xt, yt, 5, cfg)
    assert evaluate_probe(head, xv, yv)["top1"] >= 95.0
    # an untrained probe is at chance, so the test can fail
    assert evaluate_probe(make_probe(16, 5).eval(), xv, yv)["top1"] < 60.0


def test_probe_is_bn_without_affine_then_linear():
    head = make_probe(8, 3)
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    assert [n for n, _ in head.named_parameters()] == ["1.weight", "1.bias"]


def _features(keys, seed=0):
    rng = np.random.default_rng(seed)
    return Features(rng.normal(size=(len(keys), 4)).astype(np.float32), np.arange(len(keys)), np.asarray(keys))


def test_cache_round_trip_and_mismatch(tmp_path):
    f = _features(["a", "b", "c"])
    meta = {"encoder": {"path": "/x", "size": 1, "mtime_ns": 2}, "shards": "s", "pool": "avg"}
    save_features(tmp_path, "train", f, meta)
    back = load_features(tmp_path, "train", meta)
    np.testing.assert_array_equal(back.feats, f.feats)
    np.testing.assert_array_equal(back.labels, f.labels)
    assert back.keys.tolist() == ["a", "b", "c"]
    assert load_features(tmp_path, "train", meta | {"pool": "token"}) is None
    assert load_features(tmp_path, "val", meta) is None


def test_dedupe_keeps_each_key_once_in_key_order():
    f = _features(["c", "a", "b", "a"])
    d = dedupe_sorted(f)
    assert d.keys.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(d.feats[0], f.feats[1])
    np.testing.assert_array_equal(d.feats[2], f.feats[0])
