"""Training metrics: a window of steps accumulated on the device, reduced across ranks every N steps, written by
rank 0 as JSON lines (metrics.jsonl) and TensorBoard scalars.

Reading a loss is a host-device sync, so losses are summed on the device and read once per window (nanoGPT and
DINOv2 do the same). MFU = achieved training FLOP/s per device / the device's peak (model.flops cost model).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

# Dense bf16 peak FLOP/s per device (vendor data sheets, SXM parts). Matched against torch.cuda.get_device_name().
PEAK_FLOPS: dict[str, float] = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    """Per-device peak for MFU: the config's value, else the table; None (MFU reported as null) when unknown."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s per device / its peak; None without a known peak.

    The one definition: the trainer's logs and bench/train.py both call it, so their figures agree by construction.
    """
    return images_per_s * flops_per_image / peak if peak else None


# The loader's cumulative fault counters (pipeline/counters.py) logged as their largest value over the ranks: a rank
# whose reads keep retrying stalls every rank, and rank 0's own counters would not show it.
STRAGGLER_COUNTERS = ("read_retries", "shards_failed", "skipped")


class TimedIterator:
    """Wraps the batch iterator and adds up the time spent blocked in next(): the data-wait share."""

    def __init__(self, it: Iterator[dict]):
        self.it, self.wait_s = it, 0.0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        batch = next(self.it)
        self.wait_s += time.perf_counter() - t0
        return batch


class Window:
    """Sums of the step outputs since the last log, kept on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset(wait_s=0.0)

    def reset(self, wait_s: float) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.wait_start, self.t_start = 0, wait_s, time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1

    def reduce(self, wait_s: float, images_per_step_per_device: int, flops_per_image: float,
               peak: float | None, counters: dict[str, float] | None = None) -> dict:
        """Mean of every loss term over the window and all ranks, the throughput figures, and the largest data-wait
        share and loader fault counters (STRAGGLER_COUNTERS of `counters`, this rank's loader's) over the ranks, with
        the rank that has it: one all-gather of this rank's figures, the window's one host sync.

        Every rank waits for the slowest at the next collective, so a node that waits for data shows on all ranks as
        slow steps; rank 0's own wait share would read as a compute-bound job."""
        names = sorted(self.sums)
        host = [wait_s - self.wait_start, *((counters or {}).get(k, 0.0) for k in STRAGGLER_COUNTERS)]
        mine = torch.cat([torch.stack([self.sums[n] for n in names]).float() / max(1, self.steps),
                          torch.tensor(host, dtype=torch.float32, device=self.device)])
        world = dist.get_world_size() if dist.is_initialized() else 1
        every = mine.new_empty(world * mine.numel())
        if world > 1:
            dist.all_gather_single(every, mine)
        else:
            every.copy_(mine)
        table = every.view(world, -1).tolist()  # [rank][loss terms..., wait seconds, counters...]
        elapsed = time.perf_counter() - self.t_start
        ips = self.steps * images_per_step_per_device / elapsed if elapsed > 0 else float("nan")
        out = {n: sum(row[i] for row in table) / world for i, n in enumerate(names)}
        rank = dist.get_rank() if dist.is_initialized() else 0
        out.update(images_per_s_per_device=ips,
                   mfu=mfu(ips, flops_per_image, peak),
                   data_wait_share=table[rank][len(names)] / elapsed if elapsed > 0 else None,
                   step_time_s=elapsed / max(1, self.steps))
        for i, key in enumerate(("wait_share", *STRAGGLER_COUNTERS), start=len(names)):
            column = [row[i] / (elapsed if key == "wait_share" else 1.0) for row in table]
            worst = max(range(world), key=column.__getitem__)
            out[f"data_{key}_max"], out[f"data_{key}_max_rank"] = column[worst], worst
        out.update(memory_stats(self.device))
        return out


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"gpu_mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"host_rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB


class MetricsWriter:
    """Rank 0's sinks: metrics.jsonl (appended, so a resumed run continues the same file) and TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
