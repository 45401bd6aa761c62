"""The joint-embedding recipes through the real entry point: 2-rank CPU runs of mscn_simclr and mscn_byol (LARS, no
ZeRO, MSCN multi-masks) on a narrow ResNet-50 at 32 px; BYOL's target follows the EMA rule; the kNN monitor scores a
ResNet; and the start-up checks these recipes add. supcon (AdamW, labels) runs on a ViT in bf16 in
test_production_path.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from jobs.checkpoint import SafeCheckpointEngine
from jobs.config import load_config
from jobs.errors import ConfigError
from jobs.plots import read_metrics
from jobs.validate import check_engine, check_model_data_agreement
from model.ema import byol_momentum

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "test_cpu.yaml"

# A narrow ResNet-50 (width 8: 256-d features) with small heads, 2 steps, a checkpoint after each (ZeRO 0 writes the
# whole module, BYOL's target included, to mp_rank_00_model_states.pt).
TINY = ["model.backbone=resnet50", "model.resnet_width=8", "model.proj_hidden_dim=64", "model.proj_out_dim=32",
        "debug.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep=2"]
# MSCN at 32 px: 8 px grid cells, and 2 masked copies of view 1 (view1 + views_extra [B, 1, 3, H, W]).
MSCN = ["model.extra_masks=1", "optim.name=lars", "optim.base_lr=0.3", "optim.weight_decay=1e-6",
        "deepspeed.zero_stage=0"]
RECIPES = {
    "mscn_simclr": [*MSCN, "model.recipe=mscn_simclr",
                    "data.augment={preset: mscn_simclr, mscn: {num_masks: 2, grid_cell: 8}}"],
    "mscn_byol": [*MSCN, "model.recipe=mscn_byol", "model.pred_hidden_dim=64", "model.ema_momentum=0.99",
                  "data.augment={preset: mscn_byol, mscn: {num_masks: 2, grid_cell: 8}}"],
}


def monitor_sets(shards: str) -> list[str]:
    """kNN monitor on the test shards (labels i % 5): memory = shards 0-1, queries = shards 2-3, at the last step."""
    return ["monitor.knn_every_steps=2", "monitor.knn_num_classes=5",
            f"monitor.knn_memory_shards={shards}shard-{{000000..000001}}.tar",
            f"monitor.knn_query_shards={shards}shard-{{000002..000003}}.tar"]


def _module_state(out_dir, step: int) -> dict[str, torch.Tensor]:
    path = out_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return SafeCheckpointEngine().load(str(path), map_location="cpu")["module"]


@pytest.mark.slow
def test_mscn_simclr_trains_two_ranks(trainer, tmp_path):
    """mscn_byol's run (kNN monitor on a ResNet, the EMA rule, LARS) is test_resume_lars.py's reference run."""
    code, log = trainer.run(tmp_path, sets=TINY + RECIPES["mscn_simclr"])
    assert code == 0, log[-3000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["skipped_steps"] == 0
        assert math.isfinite(r["loss"]) and math.isfinite(r["contrastive"]), r


def assert_target_moved_by_ema(out_dir, step: int, base: float, total_steps: int) -> None:
    """After `step`: target = tau * previous target + (1 - tau) * online, tau = BYOL's cosine momentum at `step`."""
    before, after = _module_state(out_dir, step - 1), _module_state(out_dir, step)
    tau = byol_momentum(step, total_steps, base)
    pairs = [(k, "target_" + k) for k in after if k.startswith(("encoder.", "projector.")) and
             after[k].is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    assert len(pairs) > 100  # every conv, BatchNorm and Linear parameter of backbone and projector
    moved = 0
    for online, target in pairs:
        expected = tau * before[target] + (1 - tau) * after[online]
        torch.testing.assert_close(after[target], expected, rtol=1e-5, atol=1e-6, msg=target)
        moved += not torch.equal(after[target], before[target])
    assert moved > len(pairs) // 2  # the online network changed at that step, so the target did too


@pytest.mark.parametrize("sets, field", [
    (["deepspeed.zero_stage=1"], "deepspeed.zero_stage: 1, but optim.name lars needs 0"),
    (["deepspeed.precision=bf16"], "deepspeed.precision: bf16"),
    (["model.extra_masks=0"], "model.extra_masks: 0, but data.augment.mscn.num_masks 2"),
    (["model.recipe=can", "model.backbone=vit", "optim.name=adamw", "model.extra_masks=0",
      "data.augment={preset: mscn_simclr}"], "data.augment.mscn"),
])
def test_mscn_config_mistakes_name_the_field(sets, field):
    cfg = load_config(CONFIG, TINY + RECIPES["mscn_simclr"] + sets)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_model_data_agreement(cfg)
        check_engine(cfg)


def test_byol_refuses_zero3():
    cfg = load_config(CONFIG, TINY + RECIPES["mscn_byol"] + ["optim.name=adamw", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: 3 .* BYOL"):
        check_engine(cfg)
