"""kill -9 in the middle of a 2-rank ZeRO-1 run, then the same command again: it resumes from the last complete
checkpoint and continues the step counter, schedules and data stream."""

from __future__ import annotations

import math

import pytest

from jobs.launch import shm_allreduce_buffer
from jobs.plots import read_metrics

STEPS = 4
SETS = ["deepspeed.zero_stage=1", f"debug.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep=2"]


@pytest.fixture(scope="module")
def runs(trainer, tmp_path_factory):
    """An uninterrupted run, and a run killed with SIGKILL (whole process group) right after its step-2 checkpoint
    and then started again with the same output directory."""
    ref = tmp_path_factory.mktemp("ref")
    first_launch = len(trainer.ports)
    code, log = trainer.run(ref, sets=SETS)
    assert code == 0, log[-3000:]

    killed = tmp_path_factory.mktemp("killed")
    killed_at = trainer.kill_after_checkpoint(killed, "step_00000002", SETS)
    code, resumed_log = trainer.run(killed, sets=SETS)
    assert code == 0, resumed_log[-3000:]
    return {"ref": read_metrics(ref / "metrics.jsonl"), "resumed": read_metrics(killed / "metrics.jsonl"),
            "killed_at": killed_at, "resumed_log": resumed_log, "dir": killed, "ports": trainer.ports[first_launch:]}


@pytest.mark.slow
def test_kill9_then_restart_resumes_from_last_checkpoint(runs):
    step = int(runs["killed_at"].split("_")[1])
    assert f"resumed from {runs['killed_at']}: step {step}, {step * 16} samples seen" in runs["resumed_log"]
    ref, res = runs["ref"], runs["resumed"]
    assert [r["step"] for r in res] == list(range(1, STEPS + 1))  # one record per step, counter continued
    for a, b in zip(ref, res):
        assert b["samples_seen"] == a["samples_seen"] and b["lr"] == pytest.approx(a["lr"], rel=1e-12)  # schedules
        assert all(math.isfinite(b[t]) for t in ("loss", "contrastive", "reconstruction", "denoise"))
    for a, b in zip(ref[:step], res[:step]):  # before the kill: two fresh runs with one seed are identical
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
    tags = sorted(p.name for p in (runs["dir"] / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags[-1] == f"step_{STEPS:08d}" and len(tags) <= 2


@pytest.mark.slow
def test_resumed_losses_match_uninterrupted_run(runs):
    """Deterministic by construction: the loader draws every augmentation and mask key from (seed, rank, batch
    index), the trainer seeds the model's noise with (seed, step, rank), and the checkpoint restores weights,
    optimizer moments, step, samples seen and the data-stream position."""
    for a, b in zip(runs["ref"], runs["resumed"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), (a["step"], a["loss"], b["loss"])


@pytest.mark.slow
def test_no_shared_memory_left_behind_not_even_by_the_killed_run(runs):
    """DeepSpeed's CPU all-reduce buffers (67 MB per rank in /dev/shm, i.e. RAM) are released by every launch: the
    finished ones, and the one killed with SIGKILL, which runs no exit handler (jobs/launch.py unlinks the names
    right after start-up)."""
    assert len(runs["ports"]) == 3  # ref, killed, resumed
    # 127.0.0.1: the deepspeed launcher's default --master_addr
    left = [p for port in runs["ports"] for rank in (0, 1)
            if (p := shm_allreduce_buffer(rank, "127.0.0.1", port)).exists()]
    assert not left, left
