"""The linear probe on MSCN encoders: eval preprocessing (high-pass, mean / std, resize ratio) follows the encoder, from
the run's resolved.yaml or the export's JSON; ResNet encoders load from a run directory and from an export.

Every job run here is in-process (one rank, CPU) on the tiny colour shards of tests/eval/conftest.py. References are
computed independently: the DALI eval loader with an explicit AugmentConfig, and hand-written pooling.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jobs.config import TrainConfig, dump_yaml
from jobs.eval.encoder_source import load_source, resolve_source
from jobs.eval.features import pool_tokens
from jobs.eval.probe import ProbeConfig
from jobs.launch import Dist
from jobs.linear_probe import LinearProbeConfig, cache_meta, linear_probe
from model.build import build_model
from model.config import ModelConfig
from model.export import export_encoder
from pipeline.config import AugmentConfig, DataConfig, MSCNMaskConfig, eval_augment, eval_preprocessing
from pipeline.loader import build_loader
from tools.export import main as export_cli

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SIGMA = 3.0  # not the default 5, so a test also sees that the value is the run's
MSCN_AUG = replace(AugmentConfig.preset("mscn_simclr"), mscn=MSCNMaskConfig(highpass_sigma=SIGMA))
VIT = ModelConfig(preset="vit_tiny", img_size=32, patch_size=4, recipe="mscn_simclr")
RESNET = ModelConfig(recipe="mscn_byol", backbone="resnet50", resnet_width=8, img_size=32, proj_hidden_dim=32,
                     pred_hidden_dim=32)


def make_run(run: Path, model_cfg: ModelConfig, augment: AugmentConfig) -> torch.nn.Module:
    """A finished run as jobs/pretrain.py leaves it: resolved.yaml and one complete DeepSpeed-style checkpoint."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))  # moves BatchNorm statistics off their init
    if hasattr(model, "target_encoder"):
        with torch.no_grad():
            for p in model.target_encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))  # the probe must take the online encoder
    model.eval()
    tag = run / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / "COMPLETE").write_text("2\n")
    data = DataConfig(img_size=32, patch_size=4, augment=augment)
    (run / "resolved.yaml").write_text(dump_yaml(TrainConfig(model=model_cfg, data=data, output_dir=str(run))))
    return model


def reference(encoder: torch.nn.Module, shards: str, augment: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """(keys, features) sorted by key: the DALI eval loader with `augment`, pooled by hand (ViT: mean of the patch
    tokens; ResNet: mean of the feature map)."""
    cfg = DataConfig(shards=shards, mode="eval", batch_size=16, img_size=32, patch_size=4, num_views=1, workers=1,
                     shuffle_buffer=0, augment=augment, device="cpu")
    keys, feats = [], []
    with torch.no_grad():
        for batch in build_loader(cfg, 0, 1, torch.device("cpu")):
            out = encoder.forward_features(batch["view1"])
            feats.append(out[:, 1:].mean(1) if out.ndim == 3 else out.mean((2, 3)))
            keys.extend(batch["keys"])
    order = np.argsort(keys)
    return np.asarray(keys)[order], torch.cat(feats).numpy()[order]


def probe(encoder: str | Path, shards: dict, out: Path, **kw) -> dict:
    cfg = LinearProbeConfig(encoder=str(encoder), train_shards=shards["train"], val_shards=shards["val"],
                            output=str(out / "probe.json"), features_cache=str(out / "cache"), batch_size=8, workers=1,
                            probe=ProbeConfig(epochs=3, warmup_epochs=0, batch_size=16), **kw)
    return linear_probe(cfg, CPU)


def cached(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(out / "cache" / f"{split}_keys.npy"), np.load(out / "cache" / f"{split}_features.npy")


def assert_same_features(job: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> None:
    assert job[0].tolist() == ref[0].tolist()
    np.testing.assert_allclose(job[1], ref[1], rtol=1e-4, atol=1e-5)


def assert_other_features(job: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> None:
    assert job[0].tolist() == ref[0].tolist()
    assert np.abs(job[1] - ref[1]).max() > 1e-2 * np.abs(ref[1]).max()


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, colour_shards) -> tuple[Path, torch.nn.Module, Path, dict]:
    """An MSCN ViT run (high-pass sigma 3) probed once through its run directory, with a feature cache."""
    root = tmp_path_factory.mktemp("mscn_vit")
    model = make_run(root / "run", VIT, MSCN_AUG)
    result = probe(root / "run", colour_shards, root / "probe")
    return root / "run", model, root / "probe", result


def test_mscn_run_is_probed_on_high_passed_images(vit_run, colour_shards):
    run, model, out, result = vit_run
    for split in ("train", "val"):
        job = cached(out, split)
        assert_same_features(job, reference(model.encoder, colour_shards[split], MSCN_AUG))
        assert_other_features(job, reference(model.encoder, colour_shards[split], AugmentConfig()))
    assert result["eval_preprocessing"]["highpass_sigma"] == SIGMA and result["num_train"] == 48


def test_a_changed_preprocessing_is_not_served_from_the_cache(vit_run, colour_shards, caplog, tmp_path):
    run, model, first, _ = vit_run
    out = tmp_path / "probe"
    shutil.copytree(first / "cache", out / "cache")  # the first probe's cache, made with sigma 3
    before = cached(out, "train")
    resolved = yaml.safe_load((run / "resolved.yaml").read_text())
    resolved["data"]["augment"]["mscn"]["highpass_sigma"] = 1.5
    (run / "resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    try:
        with caplog.at_level(logging.INFO, logger="jobs.linear_probe"):
            result = probe(run, colour_shards, out)
    finally:
        resolved["data"]["augment"]["mscn"]["highpass_sigma"] = SIGMA
        (run / "resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    assert "reusing" not in caplog.text and "train: extracted 48 features" in caplog.text
    assert "'highpass_sigma': 1.5" in caplog.text  # the log says which preprocessing was used
    assert result["eval_preprocessing"]["highpass_sigma"] == 1.5
    sigma_15 = replace(MSCN_AUG, mscn=MSCNMaskConfig(highpass_sigma=1.5))
    assert_same_features(cached(out, "train"), reference(model.encoder, colour_shards["train"], sigma_15))
    assert_other_features(cached(out, "train"), before)


def test_cache_key_follows_the_preprocessing():
    fp = {"path": "/x/encoder.safetensors", "size": 1, "mtime_ns": 2}
    default = cache_meta(fp, "s", "avg", 32, AugmentConfig())
    # the key of every cache written before preprocessing was recorded: those caches (all defaults) stay valid
    assert default == {"encoder": fp, "shards": "s", "pool": "avg", "img_size": 32, "resize_ratio": 0.875}
    assert cache_meta(fp, "s", "avg", 32, eval_augment(None)) == default
    variants = [
        eval_augment({"highpass_sigma": 5.0}),
        eval_augment({"highpass_sigma": 3.0}),
        eval_augment({"mean": [0.0, 0.0, 0.0]}),
        eval_augment({"std": [1.0, 1.0, 1.0]}),
        eval_augment({"eval_resize_ratio": 1.0}),
    ]
    keys = [json.dumps(cache_meta(fp, "s", "avg", 32, a), sort_keys=True) for a in [AugmentConfig(), *variants]]
    assert len(set(keys)) == len(keys)


def test_eval_preprocessing_round_trip_and_defaults():
    assert eval_preprocessing(AugmentConfig()) == eval_preprocessing(AugmentConfig.preset("simclr"))
    assert eval_augment(None) == AugmentConfig()  # no mscn -> exactly the eval pipeline of before
    prep = eval_preprocessing(MSCN_AUG)
    assert prep["highpass_sigma"] == SIGMA and prep["mean"] == [0.0, 0.0, 0.0]  # a high-pass is zero-mean
    assert eval_preprocessing(eval_augment(prep)) == prep
    with pytest.raises(ValueError, match="unknown keys"):
        eval_augment({"highpass_sigma": 5.0, "mask_prob": [0.1, 0.2]})  # no masks in evaluation


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """An MSCN-BYOL ResNet-50 of width 8 (256-d features) with its run directory."""
    root = tmp_path_factory.mktemp("mscn_resnet")
    model = make_run(root / "run", RESNET, replace(MSCN_AUG, eval_resize_ratio=0.8))
    return root / "run", model


def test_resnet_probes_from_its_run_directory(resnet_run, colour_shards, tmp_path):
    run, model = resnet_run
    result = probe(run, colour_shards, tmp_path)
    assert result["num_train"] == 48 and result["num_val"] == 24 and result["img_size"] == 32
    assert result["eval_preprocessing"] == {**eval_preprocessing(MSCN_AUG), "eval_resize_ratio": 0.8}
    assert json.loads((tmp_path / "probe.json").read_text())["top5"] == 100.0
    job = cached(tmp_path, "train")
    assert job[1].shape == (48, 256)  # the online encoder's global average, width 8 * 32
    aug = eval_augment(result["eval_preprocessing"])
    assert_same_features(job, reference(model.encoder, colour_shards["train"], aug))
    assert_other_features(job, reference(model.target_encoder.eval(), colour_shards["train"], aug))


def test_resnet_probes_from_an_export_that_records_its_preprocessing(resnet_run, colour_shards, tmp_path):
    run, model = resnet_run
    ckpt = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    enc = tmp_path / "export" / "encoder.safetensors"  # away from the run: only the JSON can tell
    export_cli([str(ckpt), str(enc)])  # finds RUN/resolved.yaml: eval preprocessing and img_size
    meta = json.loads(enc.with_suffix(".json").read_text())
    assert meta["img_size"] == 32 and meta["eval_preprocessing"]["highpass_sigma"] == SIGMA
    assert meta["eval_preprocessing"]["eval_resize_ratio"] == 0.8
    result = probe(enc, colour_shards, tmp_path / "probe")
    assert result["eval_preprocessing"] == meta["eval_preprocessing"]
    aug = eval_augment(meta["eval_preprocessing"])
    assert_same_features(cached(tmp_path / "probe", "val"), reference(model.encoder, colour_shards["val"], aug))


def test_a_loose_resnet_checkpoint_needs_its_size(resnet_run, tmp_path):
    run, model = resnet_run
    loose = tmp_path / "ckpt.pt"
    shutil.copy(run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", loose)
    with pytest.raises(ValueError, match="--img-size"):
        probe(loose, {"train": "unused", "val": "unused"}, tmp_path)
    with pytest.raises(ValueError, match="global average pooling only"):
        load_source(resolve_source(loose), "token")
    net = load_source(resolve_source(loose))
    assert resolve_source(loose).eval_preprocessing() == (None, "defaults (nothing recorded)")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.forward_head(net.forward_features(x), pre_logits=True), model.encoder(x))


def test_pool_tokens_refuses_a_feature_map():
    with pytest.raises(ValueError, match="ViT tokens"):
        pool_tokens(torch.zeros(2, 256, 1, 1), "avg")


def test_vit_exports_without_preprocessing_keep_their_json(tmp_path):
    """CAN / MAE / SimCLR exports of before: no eval_preprocessing key, so the probe uses the defaults."""
    meta = export_encoder(build_model(VIT).state_dict(), tmp_path / "enc.safetensors", preset="vit_tiny")
    assert "eval_preprocessing" not in meta
    assert resolve_source(tmp_path / "enc.safetensors").eval_preprocessing()[0] is None


def test_an_export_in_its_run_directory_falls_back_to_resolved_yaml(resnet_run):
    """jobs/pretrain.py writes RUN/encoder.safetensors without eval_preprocessing: the run's resolved.yaml tells it."""
    run, model = resnet_run
    export_encoder(model.state_dict(), run / "encoder.safetensors", img_size=32)
    prep, origin = resolve_source(run / "encoder.safetensors").eval_preprocessing()
    assert prep == {**eval_preprocessing(MSCN_AUG), "eval_resize_ratio": 0.8} and origin == str(run / "resolved.yaml")
    (run / "encoder.safetensors").unlink()
    (run / "encoder.json").unlink()
