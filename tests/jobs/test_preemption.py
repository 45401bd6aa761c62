"""SIGTERM to one rank of a 2-rank ZeRO-2 run: every rank saves at the next step boundary and exits 0; starting
again resumes from that checkpoint (weights-only loading of ZeRO-2 state included)."""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from jobs.plots import read_metrics

SETS = ["deepspeed.zero_stage=2", "debug.max_steps=8", "checkpoint.every_steps=100"]


def _worker(launcher_pid: int, local_rank: int) -> psutil.Process:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        cmd = " ".join(child.cmdline())
        if "jobs/pretrain.py" in cmd and f"--local_rank={local_rank}" in cmd:
            return child
    raise AssertionError(f"no worker with local rank {local_rank}")


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(trainer, tmp_path):
    proc, log_path = trainer.start(tmp_path, sets=SETS)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    _worker(proc.pid, 1).send_signal(signal.SIGTERM)  # only rank 1: the ranks must agree to save anyway
    assert proc.wait(timeout=180) == 0, log_path.read_text()[-3000:]  # the launcher exits 0 iff every rank did
    log = log_path.read_text()
    saved = (tmp_path / "checkpoints" / "latest").read_text().strip()
    step = int(saved.split("_")[1])
    assert 2 <= step < 8 and (tmp_path / "checkpoints" / saved / "COMPLETE").is_file()
    assert f"signal on another rank received: saved step {step}, exiting" in log
    assert not (tmp_path / "encoder.safetensors").exists()  # a preempted run is not finished
    assert json.loads((tmp_path / "status.json").read_text()) == {"outcome": "preempted", "step": step}

    code, log = trainer.run(tmp_path, sets=["deepspeed.zero_stage=2", f"debug.max_steps={step + 1}"])
    assert code == 0, log[-3000:]
    assert f"resumed from {saved}: step {step}" in log
    assert read_metrics(metrics)[-1]["step"] == step + 1
