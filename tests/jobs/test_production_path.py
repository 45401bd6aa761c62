"""The production path on 2 CPU ranks: what can_vit_large.yaml runs on the cluster (bf16 weights, ZeRO 1 and 2,
compiled blocks), through the real entry point, with the faults a month-long run meets.

A. CAN, bf16, ZeRO-2: a reference run; a run whose rank 0 is SIGKILLed in the middle of its step-4 save; the same
   command again, which resumes from step 2 (the torn step-4 save never touched it) and matches the reference step
   for step. DeepSpeed's shared-memory all-reduce buffers were mapped during the runs and no name is left in /dev/shm.
B. supcon (a siamese recipe) on a ViT, bf16, ZeRO-1, compiled blocks, started by jobs/slurm_pretrain.sh (under stub
   srun and scontrol): SIGUSR1 to rank 1 alone (what SLURM's --signal sends); both ranks save at the end of the next
   step and exit 0, and the script requeues the job; the run is then resumed by torchrun (another launcher) and
   finishes, and the script, after a finished run, requeues nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from jobs.launch import shm_allreduce_buffer
from jobs.plots import read_metrics
from tests.jobs.conftest import rank_process

STEPS = 4
CAN_BF16 = ["deepspeed.precision=bf16", "deepspeed.zero_stage=2", f"debug.max_steps={STEPS}",
            "checkpoint.every_steps=2", "checkpoint.keep=3"]


def _mapped_shm_buffers(pid: int) -> list[str]:
    """DeepSpeed's all-reduce buffers a process has mapped, by path (whether or not the name is unlinked yet)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    # The path is the sixth field; " (deleted)" follows it once the name is unlinked, which may not have happened
    # yet at the moment the maps are read.
    paths = (line.split(maxsplit=5)[5] for line in maps.splitlines() if "deepspeed_allreduce_buffer" in line)
    return sorted({path.removesuffix(" (deleted)") for path in paths})


@pytest.fixture(scope="module")
def can_runs(trainer, tmp_path_factory):
    first_launch = len(trainer.ports)
    ref = tmp_path_factory.mktemp("ref")
    code, log = trainer.run(ref, sets=CAN_BF16)
    assert code == 0, log[-3000:]

    torn = tmp_path_factory.mktemp("torn")
    proc, crash_log = trainer.start(torn, sets=[*CAN_BF16, f"debug.crash_in_save_at_step={STEPS}"])
    mapped, deadline = [], time.monotonic() + 300
    while proc.poll() is None:  # watch rank 1 while it runs: its buffers are mapped, their names already gone
        worker = rank_process(proc.pid, 1)
        if worker is not None and not mapped:
            mapped = _mapped_shm_buffers(worker.pid)
        assert time.monotonic() < deadline, crash_log.read_text()[-3000:]
        time.sleep(0.2)
    ckpt = torn / "checkpoints"
    after_crash = {"code": proc.returncode, "latest": (ckpt / "latest").read_text().strip(),
                   "torn_files": sorted(p.name for p in (ckpt / f"step_{STEPS:08d}").iterdir()),
                   "complete": sorted(p.name for p in ckpt.iterdir() if (p / "COMPLETE").is_file())}
    code, resumed_log = trainer.run(torn, sets=CAN_BF16)
    assert code == 0, resumed_log[-3000:]
    return {"ref": read_metrics(ref / "metrics.jsonl"), "resumed": read_metrics(torn / "metrics.jsonl"),
            "after_crash": after_crash, "mapped": mapped, "resumed_log": resumed_log, "dir": torn,
            "ports": trainer.ports[first_launch:]}


@pytest.mark.slow
def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_the_run_resumes_from_it(can_runs):
    crash = can_runs["after_crash"]
    assert crash["code"] != 0  # rank 0 died by SIGKILL: the launcher fails the run
    assert crash["latest"] == "step_00000002" and crash["complete"] == ["step_00000002"]
    assert any(f.startswith("mp_rank_00") for f in crash["torn_files"]) and "COMPLETE" not in crash["torn_files"]
    assert "resumed from step_00000002: step 2, 32 samples seen" in can_runs["resumed_log"]
    resolved = yaml.safe_load((can_runs["dir"] / "resolved.yaml").read_text())["derived"]
    assert resolved["precision"] == "bf16" and resolved["compile"] is False and resolved["world_size"] == 2


@pytest.mark.slow
def test_bf16_zero2_resumed_losses_match_the_uninterrupted_run(can_runs):
    """Weights, fp32 master weights and Adam moments (DeepSpeed's bf16 ZeRO-2 state), the data stream and the RNG
    all come back: the resumed run's losses are the reference's, step for step, every term finite."""
    ref, res = can_runs["ref"], can_runs["resumed"]
    assert [r["step"] for r in res] == list(range(1, STEPS + 1)) == [r["step"] for r in ref]
    for a, b in zip(ref, res):
        assert b["samples_seen"] == a["samples_seen"] and b["lr"] == pytest.approx(a["lr"], rel=1e-12)
        assert all(math.isfinite(b[t]) for t in ("loss", "contrastive", "reconstruction", "denoise"))
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), (a["step"], a["loss"], b["loss"])
    assert ref[-1]["loss"] < ref[0]["loss"]  # bf16 training moves the loss


@pytest.mark.slow
def test_no_shared_memory_name_outlives_a_run_not_even_a_killed_one(can_runs):
    """DeepSpeed's CPU all-reduce maps a 67 MB /dev/shm buffer per rank and never unlinks it (jobs/launch.py unlinks
    the names once every rank has mapped them): mapped during the run, no name left after any of the three runs, the
    SIGKILLed one included."""
    assert can_runs["mapped"] and all(name.startswith("/dev/shm/deepspeed_allreduce_buffer") for name in
                                      can_runs["mapped"])
    assert len(can_runs["ports"]) == 3
    left = [p for port in can_runs["ports"] for rank in (0, 1)
            if (p := shm_allreduce_buffer(rank, "127.0.0.1", port)).exists()]
    assert not left, left


SUPCON_BF16 = ["model.recipe=supcon", "data.augment=simclr", "deepspeed.precision=bf16", "deepspeed.zero_stage=1",
               "deepspeed.compile=blocks", "debug.max_steps=8", "checkpoint.every_steps=100",
               "checkpoint.export_encoder=true"]


@pytest.mark.slow
def test_siamese_bf16_zero1_compiled_preempted_under_slurm_requeued_then_resumed_by_torchrun(trainer, tmp_path):
    run = tmp_path / "run"
    proc, log_path = trainer.start(run, sets=SUPCON_BF16, launcher="slurm")
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 400  # the first launch compiles the blocks (about a minute on 2 cores)
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # One rank only (the ranks must agree to save anyway), but, as SLURM signals a job step, every process of that rank
    # too: its loader's forkserver and workers (which must not die of it before the save), any compiler workers.
    rank = rank_process(proc.pid, 1)
    for p in [rank, *rank.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]  # srun exits 0 iff every task did
    log = log_path.read_text()
    got = re.search(r"SIGUSR1 received during step (\d+)", log)  # rank 1's warning
    saved = (run / "checkpoints" / "latest").read_text().strip()
    assert got is not None and saved == f"step_{int(got.group(1)) + 1:08d}", (got, saved)  # the next step's end
    step = int(saved.split("_")[1])
    assert step < 8 and (run / "checkpoints" / saved / "COMPLETE").is_file()
    assert f"signal on another rank: saved step {step}, exiting" in log  # rank 0, which got no signal
    assert "data producer crashed" not in log and "loader worker" not in log  # rank 1's workers outlived the signal
    assert json.loads((run / "status.json").read_text()) == {"outcome": "preempted", "step": step}
    assert not (run / "encoder.safetensors").exists()  # a preempted run is not finished
    assert _requeues(tmp_path) == ["requeue 4242"]  # the script put the job back in the queue
    resolved = yaml.safe_load((run / "resolved.yaml").read_text())["derived"]
    assert resolved["precision"] == "bf16" and resolved["compile"] is True and resolved["world_size"] == 2

    code, log = trainer.run(run, sets=SUPCON_BF16, launcher="torchrun", timeout=400)
    assert code == 0, log[-3000:]
    assert f"resumed from {saved}: step {step}" in log
    records = read_metrics(metrics)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(math.isfinite(r["supcon"]) and r["skipped_steps"] == 0 for r in records)
    assert json.loads((run / "status.json").read_text()) == {"outcome": "done", "step": 8}
    assert (run / "encoder.safetensors").is_file()

    # The script again after the run finished (its tasks, which would find nothing to do, are not started): it reads
    # the run's status and requeues nothing more.
    code, log = trainer.run(run, sets=SUPCON_BF16, launcher="slurm", env={"SRUN_NOOP": "1"}, timeout=120)
    assert code == 0, log[-3000:]
    assert _requeues(tmp_path) == ["requeue 4242"]


def _requeues(tmp_path: Path) -> list[str]:
    return [line for log in sorted(tmp_path.glob("slurm-stubs-*/scontrol.log")) for line in log.read_text().split("\n")
            if line]
