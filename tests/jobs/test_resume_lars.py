"""kill -9 in the middle of a 2-rank MSCN-BYOL run with LARS under ZeRO stage 0, then the same command again: it
resumes from the step-2 checkpoint with the LARS momentum buffers and BYOL's EMA target network, and continues
exactly as an uninterrupted run does. The uninterrupted run is also the mscn_byol recipe's run: a checkpoint after
every step shows the target following the EMA rule, and the kNN monitor scores its ResNet.

Steps 3-4 depend on both pieces of state: the target network gives the loss its regression targets, and the momentum
buffer feeds every LARS update. The losses compare them indirectly; the final checkpoints compare them directly.
"""

from __future__ import annotations

import math

import pytest
import torch

from jobs.checkpoint import SafeCheckpointEngine
from jobs.plots import read_metrics
from tests.jobs.test_recipes import RECIPES, TINY, assert_target_moved_by_ema, monitor_sets

STEPS = 4
# TINY's narrow ResNet-50 and small heads, the mscn_byol recipe (LARS, ZeRO 0, EMA target), and, overriding TINY's
# 2 steps with a checkpoint after each: 4 steps, a checkpoint every 2 (the kill comes right after step 2's).
SETS = [*TINY, *RECIPES["mscn_byol"], f"debug.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep=2"]
KILL_AT = "step_00000002"



def _checkpoint(out_dir, step: int) -> dict:
    """DeepSpeed's stage-0 file of one tag: "module" (the whole model, target included) and "optimizer" (LARS's
    state_dict), loaded as the trainer loads it (weights_only with jobs.checkpoint's allow-list)."""
    path = out_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return SafeCheckpointEngine().load(str(path), map_location="cpu")


@pytest.fixture(scope="module")
def runs(trainer, tmp_path_factory):
    """An uninterrupted run, and a run killed with SIGKILL (whole process group) right after its step-2 checkpoint
    and then started again with the same command and output directory."""
    ref = tmp_path_factory.mktemp("lars_ref")  # a checkpoint after every step, and the kNN monitor at steps 2 and 4
    code, log = trainer.run(ref, sets=[*SETS, *monitor_sets(trainer.shards), "checkpoint.every_steps=1",
                                       f"checkpoint.keep={STEPS}"])
    assert code == 0, log[-3000:]

    killed = tmp_path_factory.mktemp("lars_killed")
    killed_at = trainer.kill_after_checkpoint(killed, KILL_AT, SETS)
    killed_metrics = read_metrics(killed / "metrics.jsonl")
    code, resumed_log = trainer.run(killed, sets=SETS)
    assert code == 0, resumed_log[-3000:]
    return {"ref_dir": ref, "dir": killed, "killed_at": killed_at, "killed_metrics": killed_metrics,
            "ref": read_metrics(ref / "metrics.jsonl"), "resumed": read_metrics(killed / "metrics.jsonl"),
            "resumed_log": resumed_log}


@pytest.mark.slow
def test_kill9_resumes_from_step2_and_losses_match(runs):
    assert runs["killed_at"] == KILL_AT  # killed between the two checkpoints, so the restart really resumes
    assert max(r["step"] for r in runs["killed_metrics"]) < STEPS  # the killed run had not finished
    assert f"resumed from {KILL_AT}: step 2, 32 samples seen" in runs["resumed_log"]
    ref, res = runs["ref"], runs["resumed"]
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert [r["step"] for r in res] == list(range(1, STEPS + 1))  # one record per step, counter continued
    for a, b in zip(ref, res):
        assert b["samples_seen"] == a["samples_seen"] and b["lr"] == pytest.approx(a["lr"], rel=1e-12)  # schedule
        assert b["skipped_steps"] == 0 and math.isfinite(b["loss"]) and math.isfinite(b["byol"]), b
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        assert b["byol"] == pytest.approx(a["byol"], rel=1e-4), (a["step"], a["byol"], b["byol"])
    assert len({r["loss"] for r in ref}) == STEPS  # the model moves every step: equal losses are no coincidence


def _target_keys(module: dict) -> list[str]:
    return [k for k in module if k.startswith(("target_encoder.", "target_projector."))]


@pytest.mark.slow
def test_resumed_target_network_and_lars_momentum_match(runs):
    """The final checkpoint of the resumed run holds the same BYOL target network and LARS momentum buffers as the
    uninterrupted run's: the step-2 checkpoint restored both (a target re-copied from the online network, or zeroed
    momentum, would change the step-3 and step-4 updates)."""
    ref, res = _checkpoint(runs["ref_dir"], STEPS), _checkpoint(runs["dir"], STEPS)
    ref_mod, res_mod = ref["module"], res["module"]
    assert sorted(res_mod) == sorted(ref_mod)
    targets = _target_keys(ref_mod)
    assert len(targets) > 100  # every conv, BatchNorm and Linear tensor of the target backbone and projector
    moved_from_online = 0
    for key in targets:
        torch.testing.assert_close(res_mod[key], ref_mod[key], rtol=1e-5, atol=1e-6, msg=key)
        online = key.removeprefix("target_")
        if ref_mod[key].is_floating_point() and not torch.equal(ref_mod[key], ref_mod[online]):
            moved_from_online += 1
    assert moved_from_online > len(targets) // 2  # the target is an EMA, not a copy of the online network
    for key in ref_mod:  # the online network (and BatchNorm statistics) as well
        torch.testing.assert_close(res_mod[key], ref_mod[key], rtol=1e-5, atol=1e-6, msg=key)

    ref_opt, res_opt = ref["optimizer"], res["optimizer"]  # ZeRO 0: LARS's own state_dict, keyed by param index
    trainable = sum(len(g["params"]) for g in ref_opt["param_groups"])
    assert len(ref_opt["state"]) == trainable and sorted(res_opt["state"]) == sorted(ref_opt["state"])
    assert [g["params"] for g in res_opt["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
    nonzero = 0
    for index, state in ref_opt["state"].items():
        buf = state["momentum_buffer"]
        torch.testing.assert_close(res_opt["state"][index]["momentum_buffer"], buf, rtol=1e-5, atol=1e-7,
                                   msg=f"momentum_buffer of param {index}")
        nonzero += bool(buf.abs().sum() > 0)
    assert nonzero > trainable // 2


@pytest.mark.slow
def test_byol_target_follows_the_ema_rule_and_the_monitor_scores_the_resnet(runs):
    assert_target_moved_by_ema(runs["ref_dir"], 2, base=0.99, total_steps=10)  # test_cpu.yaml: 160 samples / 16
    records = runs["ref"]
    assert "knn_top1" not in records[0] and 0.0 <= records[1]["knn_top1"] <= 100.0 and "knn_top1" in records[3]


@pytest.mark.slow
def test_checkpoints_before_the_kill_match(runs):
    """Two fresh runs with one seed agree up to the kill, so the step-4 comparison above is a test of the resume."""
    ref, res = _checkpoint(runs["ref_dir"], 2), _checkpoint(runs["dir"], 2)
    for key in _target_keys(ref["module"]):
        torch.testing.assert_close(res["module"][key], ref["module"][key], rtol=1e-5, atol=1e-6, msg=key)
    for index, state in ref["optimizer"]["state"].items():
        torch.testing.assert_close(res["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=1e-5, atol=1e-7)
