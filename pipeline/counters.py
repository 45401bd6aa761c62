"""Thread-safe counters the readers (in the loader's worker processes) and the loader write, and the trainer reads
(Loader.counters(): the loader's own plus the latest raw values each worker sent with its batches)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

# Reasons a sample is skipped; the counters expose them as skipped_<reason>.
# bad_batch: good samples of a training batch that DALI failed on another sample: the batch goes whole (loader.py).
SKIP_REASONS = ("no_image", "bad_image", "decode_error", "shard_failed", "bad_batch")


class Counters:
    """Monotone float counters plus derived rates. Names:
    samples (delivered to the trainer), decoded (passed validation and went to DALI), skipped_<reason>,
    format_<format> (samples accepted per image format, validate.FORMATS), shards_done, shards_failed, read_retries,
    wait_s (trainer time blocked on data), input_cpu_s (CPU time the loader's thread in the training process spent
    on input, outside DALI's own threads), batches_packed / batches_over_slot (batches whose images went back to back
    in their slot, a costlier feed, or did not fit it and went through the pipe: raise data.slot_bytes_per_sample),
    samples_per_s."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = defaultdict(float)
        self._start = time.monotonic()

    def add(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._values[name] += value

    def skip(self, reason: str, n: int = 1) -> None:
        assert reason in SKIP_REASONS, reason
        self.add(f"skipped_{reason}", n)

    def values(self) -> dict[str, float]:
        """The raw counters (what a worker process sends to the loader)."""
        with self._lock:
            return dict(self._values)

    def snapshot(self, others: list[dict[str, float]] = ()) -> dict[str, float]:
        """Every counter, with `others` (raw values, e.g. from worker processes) added in, and the derived rates."""
        with self._lock:
            out = {"samples": 0.0, "decoded": 0.0, "shards_done": 0.0, "shards_failed": 0.0, "read_retries": 0.0,
                   "wait_s": 0.0, "batches_packed": 0.0, "batches_over_slot": 0.0,
                   **{f"skipped_{r}": 0.0 for r in SKIP_REASONS}, **self._values}
        for other in others:
            for k, v in other.items():
                out[k] = out.get(k, 0.0) + v
        elapsed = max(time.monotonic() - self._start, 1e-9)
        out["skipped"] = sum(out[f"skipped_{r}"] for r in SKIP_REASONS)
        out["elapsed_s"] = elapsed
        out["samples_per_s"] = out["samples"] / elapsed
        return out
