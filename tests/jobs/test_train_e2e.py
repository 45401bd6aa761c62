"""The real entry point on CPU: 2-rank DeepSpeed ZeRO-3 training from S3 shards, the non-finite guard, bad configs."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from jobs.plots import read_metrics


def _metrics(out_dir):
    return read_metrics(out_dir / "metrics.jsonl")


@pytest.mark.slow
def test_zero3_two_ranks_trains_skips_a_nan_step_and_exports(trainer, tmp_path):
    """ZeRO-3 (parameters partitioned) with 2 accumulation steps per rank; rank 0 alone gets a NaN loss at step 2:
    every rank must skip that update (or the run would hang or diverge), and training goes on. The kNN monitor runs
    at step 3 on the gathered encoder (every rank enters the gather, rank 0 scores)."""
    out = tmp_path / "z3"
    monitor = ["monitor.knn_every_steps=3", "monitor.knn_num_classes=5",
               f"monitor.knn_memory_shards={trainer.shards}shard-{{000000..000001}}.tar",
               f"monitor.knn_query_shards={trainer.shards}shard-{{000002..000003}}.tar"]
    code, log = trainer.run(out, sets=["deepspeed.zero_stage=3", "debug.max_steps=3", "debug.nan_at_steps=[2]",
                                       "checkpoint.export_encoder=true", "logging.plot=true", *monitor])
    assert code == 0, log[-3000:]
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["skipped_steps"] == 0 and records[1]["skipped_steps"] == 1 and records[2]["skipped_steps"] == 1
    assert math.isnan(records[1]["loss"])
    for r in (records[0], records[2]):
        for term in ("loss", "contrastive", "reconstruction", "denoise", "images_per_s_per_device", "grad_norm"):
            assert math.isfinite(r[term]), (term, r)
        assert r["mfu"] is None  # CPU: no peak in the table and none configured
        assert 0 <= r["data_wait_share"] <= 1
    assert "knn_top1" not in records[0] and 0.0 <= records[2]["knn_top1"] <= 100.0  # percent, 48 queries
    assert records[2]["samples_seen"] == 3 * 16
    resolved = yaml.safe_load((out / "resolved.yaml").read_text())
    assert resolved["derived"]["grad_accum"] == 2 and resolved["derived"]["world_size"] == 2
    assert resolved["derived"]["precision"] == "fp32"
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    assert (out / "encoder.safetensors").is_file() and json.loads((out / "encoder.json").read_text())
    assert (out / "loss.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())
    assert json.loads((out / "status.json").read_text()) == {"outcome": "done", "step": 3}


@pytest.mark.slow
def test_a_run_of_nonfinite_steps_stops_naming_step_and_terms(trainer, tmp_path):
    """Single process (`python jobs/pretrain.py`): three NaN steps in a row with a limit of 3 stop the run."""
    code, log = trainer.run(tmp_path / "nan", ranks=1, sets=["debug.nan_at_steps=[1, 2, 3]", "debug.max_steps=6",
                                                             "optim.max_nonfinite_in_a_row=3",
                                                             "data.batch_size=8"])
    assert code != 0
    assert "stopping at step 3: 3 non-finite steps in a row (optim.max_nonfinite_in_a_row=3)" in log
    assert "'reconstruction'" in log and "'contrastive'" in log and "'denoise'" in log


def test_bad_configs_fail_at_start_naming_the_field(trainer, tmp_path):
    code, log = trainer.run(tmp_path / "bad1", ranks=1, sets=["optim.lrr=1"], timeout=120)
    assert code == 2 and "config error: unknown key optim.lrr" in log
    code, log = trainer.run(tmp_path / "bad2", ranks=1, sets=["optim.global_batch=18"], timeout=120)
    assert code == 2 and "optim.global_batch: 18 is not divisible" in log
    # A data URL that does not exist: named with its field before any training starts.
    trainer_missing = trainer.shards.replace("/shards/", "/no-such-prefix/shard-{000000..000001}.tar")
    code, log = trainer.run(tmp_path / "bad3", ranks=1, sets=[f"data.shards={trainer_missing}"], timeout=120)
    assert code == 2 and "data.shards: " in log and "no-such-prefix/shard-000000.tar not found" in log
