"""LARS: layer-wise adaptive rate scaling (You et al. 2017), the optimiser of large-batch linear probes (MAE) and of
SimCLR / BYOL pre-training.

Per parameter tensor, the update g + wd * w is rescaled by the trust ratio eta * ||w|| / ||g + wd * w|| before
momentum (MAE's and BYOL's formulation). Biases and normalisation parameters are excluded from both the adaptation
and weight decay (BYOL, appendix C): by default every tensor with ndim <= 1; a param group may also set
"lars_exclude": True (all its tensors excluded) or False (none excluded, even 1-D ones).

Shared by pre-training (jobs/engine.py) and the linear probe (jobs/eval/probe.py). The trust ratio is per tensor, so
LARS must see the model's own parameters: ZeRO stages 1-3 hand the optimizer one flat partition per group instead
(jobs/validate.py refuses that combination).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and per-tensor trust-ratio scaling.

    lr: learning rate (schedules set group["lr"]); momentum: heavy-ball momentum; weight_decay: L2 added to the
    gradient of adapted tensors; trust_coefficient: eta (1e-3 in MAE/BYOL); eps guards the ratio's denominator.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        skip_nonfinite: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"invalid LARS hyper-parameters: lr={lr} momentum={momentum} wd={weight_decay}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
            nesterov=nesterov, lars_exclude=None,
        )
        super().__init__(params, defaults)
        # DeepSpeed's protocol for optimizers that may skip an update: engine.was_step_applied() reads `overflow`.
        # Without ZeRO, DeepSpeed itself never skips a step with non-finite gradients; skip_nonfinite does (one host
        # sync per step). Gradients are all-reduced before step(), so every rank makes the same choice.
        self.skip_nonfinite, self.overflow = skip_nonfinite, False

    @staticmethod
    def _excluded(p: torch.Tensor, group: dict) -> bool:
        return p.ndim <= 1 if group["lars_exclude"] is None else bool(group["lars_exclude"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_nonfinite:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.overflow = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else False
            if self.overflow:
                return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if not self._excluded(p, group):
                    if group["weight_decay"]:
                        d_p = d_p.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d_p)
                    # ratio 1 when either norm is zero (fresh zero-init weights, zero gradients): plain SGD there
                    ratio = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                        torch.ones_like(w_norm),
                    )
                    d_p = d_p.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                step = d_p.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.add_(step, alpha=-group["lr"])
        return loss
