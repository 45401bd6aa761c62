"""Loss-curve PNG from any run directory (tools/plot.py), metrics.jsonl reading, and the MFU peak table."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from jobs.metrics import PEAK_FLOPS, peak_flops
from jobs.plots import plot_run, read_metrics


def _write_run(run_dir):
    lines = [{"step": s, "loss": 2.0 / s, "reconstruction": 1.5 / s, "contrastive": 4.0 - s / 10, "denoise": 0.5 / s,
              "lr": 1e-3 * s} for s in range(1, 11)]
    lines.append({"step": 5, "loss": 0.1, "lr": 5e-3})  # re-logged after a resume: the last record of a step wins
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_read_metrics_keeps_last_record_per_step(tmp_path):
    _write_run(tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 11)) and records[4]["loss"] == 0.1


def test_plot_function_and_cli_write_a_png(tmp_path):
    _write_run(tmp_path)
    png = plot_run(tmp_path)
    assert png == tmp_path / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "other.png"
    subprocess.run([sys.executable, "-m", "tools.plot", str(tmp_path), "--out", str(out)], check=True)
    assert out.stat().st_size > 1000


def test_peak_flops_table_and_override():
    assert PEAK_FLOPS["H100"] == 989e12 and PEAK_FLOPS["A100"] == 312e12
    assert peak_flops(torch.device("cpu"), None) is None  # MFU reported as null on CPU
    assert peak_flops(torch.device("cpu"), 1e12) == 1e12
