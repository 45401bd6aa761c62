"""Schedules as pure functions of samples seen (not steps), so a change of global batch keeps the same curve.

"samples seen" is counted at the start of a step: the step that begins with samples_seen = s uses lr_at(s).
"""

from __future__ import annotations

import math


def warmup_cosine(samples_seen: int, peak: float, warmup_samples: int, total_samples: int,
                  floor: float = 0.0) -> float:
    """Linear warm-up from 0 to `peak` over warmup_samples, then half a cosine from peak down to `floor`.

    Past total_samples the value stays at `floor` (a run extended by max_steps does not wrap around).
    """
    if samples_seen < warmup_samples:
        return peak * samples_seen / warmup_samples
    decay_span = max(1, total_samples - warmup_samples)
    progress = min(1.0, (samples_seen - warmup_samples) / decay_span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(samples_seen: int, peak_lr: float, warmup_samples: int, total_samples: int, min_lr_ratio: float) -> float:
    """The learning rate of the step that starts after `samples_seen` images (CAN_SPEC.md: warm-up then cosine)."""
    return warmup_cosine(samples_seen, peak_lr, warmup_samples, total_samples, floor=peak_lr * min_lr_ratio)
