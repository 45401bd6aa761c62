"""The trainer's logged MFU and bench/train.py's are one definition: same FLOPs per image (of the exact config run),
same peak, same images/s (the trainer's metrics window)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.train import mfu
from jobs.config import load_config
from jobs.plots import read_metrics
from model.config import ModelConfig
from model.flops import train_flops_per_image

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "test_cpu.yaml"  # what the trainer fixture runs

FAKE_PEAK = 1e12  # a made-up per-device peak: CPU has none in the table, so MFU would be null otherwise


def test_bench_mfu_is_the_cost_model_of_the_exact_config():
    cfg = ModelConfig(preset="vit_tiny", img_size=32, patch_size=4, recipe="can", decoder_dim=64, decoder_depth=1,
                      decoder_heads=2)
    assert mfu(10.0, cfg, FAKE_PEAK) == pytest.approx(10.0 * train_flops_per_image(cfg) / FAKE_PEAK, rel=1e-12)
    bigger_decoder = ModelConfig(**{**cfg.__dict__, "decoder_dim": 128})
    assert mfu(10.0, bigger_decoder, FAKE_PEAK) > mfu(10.0, cfg, FAKE_PEAK)  # decoder dims are counted
    assert mfu(10.0, cfg, None) is None


def test_trainer_logs_the_mfu_bench_computes(trainer, tmp_path):
    """Three single-process steps of the real trainer with a fake peak: every logged MFU equals bench.train.mfu of the
    logged images/s on the same config."""
    out = tmp_path / "mfu"
    code, log = trainer.run(out, ranks=1, sets=["debug.max_steps=3", f"logging.peak_flops={FAKE_PEAK}",
                                                "checkpoint.every_steps=100", "logging.tensorboard=false"])
    assert code == 0, log[-3000:]
    cfg = load_config(CONFIG, [f"logging.peak_flops={FAKE_PEAK}"])
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["mfu"] > 0
        assert r["mfu"] == pytest.approx(mfu(r["images_per_s_per_device"], cfg.model, FAKE_PEAK), rel=1e-9)
