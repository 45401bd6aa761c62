"""Values derived from the config and the world size, computed once, logged, and saved in resolved.yaml."""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.errors import ConfigError


@dataclass(frozen=True)
class Derived:
    world_size: int
    micro_batch: int  # images per rank per forward/backward (data.batch_size)
    grad_accum: int  # micro-batches per optimizer step on each rank
    global_batch: int  # micro_batch * grad_accum * world_size
    peak_lr: float  # base_lr * global_batch / lr_base_batch (linear scaling rule)
    total_steps: int  # optimizer steps to see schedule.total_samples
    warmup_steps: int  # for the log only: the schedule itself counts samples


def derive(global_batch: int, micro_batch: int, world_size: int, base_lr: float, lr_base_batch: int,
           total_samples: int, warmup_samples: int) -> Derived:
    """Batch split, effective lr and step counts. Raises ConfigError naming the field that cannot work."""
    if global_batch <= 0:
        raise ConfigError(f"optim.global_batch: must be positive, got {global_batch}")
    if micro_batch <= 0:
        raise ConfigError(f"data.batch_size: must be positive, got {micro_batch}")
    per_step = world_size * micro_batch
    if global_batch % per_step:
        raise ConfigError(
            f"optim.global_batch: {global_batch} is not divisible by world_size x data.batch_size = "
            f"{world_size} x {micro_batch} = {per_step}")
    if warmup_samples > total_samples:
        raise ConfigError(f"schedule.warmup_samples: {warmup_samples} exceeds schedule.total_samples {total_samples}")
    return Derived(
        world_size=world_size,
        micro_batch=micro_batch,
        grad_accum=global_batch // per_step,
        global_batch=global_batch,
        peak_lr=base_lr * global_batch / lr_base_batch,
        total_steps=math.ceil(total_samples / global_batch),
        warmup_steps=math.ceil(warmup_samples / global_batch),
    )
