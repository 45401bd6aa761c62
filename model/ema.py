"""BYOL's target network: an exponential moving average of the online one, with a cosine momentum schedule."""

from __future__ import annotations

import math

import torch


def byol_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's tau: base at step 0, rising to 1 at total_steps on a cosine (Grill et al. 2020, eq. 9).

    tau(k) = 1 - (1 - base) * (cos(pi k / K) + 1) / 2; steps past total_steps stay at 1.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EMA:
    """target <- momentum * target + (1 - momentum) * online, for two lists of matching parameters.

    The average is kept in float32 here when the target's parameters are lower precision: with bf16 weights,
    (1 - 0.996) * (online - target) is mostly below half a bf16 ulp of the target, so an in-place bf16 EMA would
    hardly move. The float32 copy is rebuilt from the target after a resume (it is not in the state_dict).
    With ZeRO stage 1/2 every rank holds the full parameters and applies the same update, so targets stay equal.
    """

    def __init__(self) -> None:
        self.shadow: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
        if len(target) != len(online):
            raise ValueError(f"target has {len(target)} tensors, online {len(online)}")
        if all(t.dtype == torch.float32 for t in target):
            for t, o in zip(target, online):
                t.lerp_(o.detach(), 1.0 - momentum)
            return
        if self.shadow is None:
            self.shadow = [t.detach().float() for t in target]
        for t, s, o in zip(target, self.shadow, online):
            s.lerp_(o.detach().float(), 1.0 - momentum)
            t.copy_(s)
