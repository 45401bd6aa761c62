"""Loss-curve PNG from any run directory (tools/plot.py), metrics.jsonl reading, and the MFU peak table."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from jobs.metrics import PEAK_FLOPS, peak_flops
from jobs.plots import plot_run, read_metrics

from .conftest import REPO, start_ranks, wait_all


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


WINDOW = """
import json, os, time, torch, torch.distributed as dist
from jobs.metrics import Window
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
window = Window(torch.device("cpu"))
window.add({"loss": torch.tensor(1.0 + rank)})
time.sleep(0.2)
# rank 1 is the straggler: it waited for data most of the window and its reads kept retrying
wait_s, retries = (0.01, 2.0) if rank == 0 else (0.15, 40.0)
record = window.reduce(wait_s, 4, 1.0, None, {"read_retries": retries, "shards_failed": 0.0, "skipped": 3.0 - rank})
print("record", json.dumps({k: v for k, v in record.items() if k.startswith("data_") or k == "loss"}))
dist.barrier()  # an orderly exit: a gloo rank whose peer has gone can abort at interpreter exit
dist.destroy_process_group()
"""


def test_the_slowest_rank_shows_in_the_metrics(tmp_path):
    """Each rank's data-wait share and loader fault counters go through the window's one collective: the record has
    their largest value over the ranks and that rank (not only rank 0's own figures), beside the mean loss."""
    codes, logs = wait_all(start_ranks([sys.executable, "-c", WINDOW], [{}, {}], [REPO, REPO], tmp_path), tmp_path,
                           timeout=60)
    assert codes == [0, 0], logs
    record = json.loads(logs[0].split("record ", 1)[1])  # rank 0's, the one metrics.jsonl gets
    assert record["loss"] == 1.5
    assert record["data_wait_share"] < 0.1 < 0.5 < record["data_wait_share_max"] < 1
    assert record["data_wait_share_max_rank"] == 1
    assert (record["data_read_retries_max"], record["data_read_retries_max_rank"]) == (40.0, 1)
    assert (record["data_skipped_max"], record["data_skipped_max_rank"]) == (3.0, 0)
    assert (record["data_shards_failed_max"], record["data_shards_failed_max_rank"]) == (0.0, 0)
