"""The DeepSpeed engine: optimizer, precision and ZeRO stage from the config.

We build the optimizer ourselves and hand it to deepspeed.initialize, because the model decides which parameters
are decayed (model.param_groups) and because the choice differs by device: DeepSpeed's FusedAdam is a CUDA kernel,
and on DeepSpeed's CPU accelerator the config-named "AdamW" resolves to its CPU-Adam op (another JIT build, and not
torch's AdamW); torch.optim.AdamW is the reference there. ZeRO wraps any optimizer once
zero_allow_untested_optimizer is set. LARS (SimCLR / BYOL / MSCN) runs with ZeRO stage 0, where DeepSpeed all-reduces
the gradients and calls it on the model's own parameters (jobs/lars.py says why).
"""

from __future__ import annotations

import torch
from torch import nn

from jobs.config import DeepSpeedConfig, OptimConfig
from jobs.derived import Derived
from jobs.lars import LARS


def resolve_precision(precision: str, on_cuda: bool, optimizer: str = "adamw") -> str:
    """auto: bf16 on CUDA (full-rate tensor cores, no loss scaling needed), fp32 on CPU. LARS gets amp_bf16 on CUDA:
    bf16 weights would make DeepSpeed hand it flat fp32 partitions instead of the layers."""
    if precision == "auto":
        if not on_cuda:
            return "fp32"
        return "amp_bf16" if optimizer == "lars" else "bf16"
    return precision


def _adamw(param_groups: list[dict], optim: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    if on_cuda:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(param_groups, lr=0.0, betas=optim.betas, eps=optim.eps, adam_w_mode=True)
    return torch.optim.AdamW(param_groups, lr=0.0, betas=optim.betas, eps=optim.eps)


def _lars(param_groups: list[dict], optim: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    # skip_nonfinite: without ZeRO, DeepSpeed applies a non-finite update; LARS skips it and reports it as DeepSpeed's
    # own optimizers do, so the trainer's non-finite guard (jobs/loop.py) works the same.
    return LARS(param_groups, lr=0.0, momentum=optim.momentum, trust_coefficient=optim.trust_coefficient,
                skip_nonfinite=True)


OPTIMIZERS = {"adamw": _adamw, "lars": _lars}


def build_optimizer(param_groups: list[dict], optim: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    """optim.name over the model's groups (each group carries its weight_decay, and lars_exclude for LARS); lr starts
    at 0 and is set every step from the schedule."""
    return OPTIMIZERS[optim.name](param_groups, optim, on_cuda)


def deepspeed_config(ds: DeepSpeedConfig, derived: Derived, grad_clip: float, precision: str) -> dict:
    """DeepSpeed's JSON config. Batch sizes are given all three ways: DeepSpeed checks they agree."""
    config = {
        "train_batch_size": derived.global_batch,
        "train_micro_batch_size_per_gpu": derived.micro_batch,
        "gradient_accumulation_steps": derived.grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": ds.reduce_bucket_size,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves (jobs/metrics.py)
        "wall_clock_breakdown": False,
    }
    if precision == "amp_bf16":
        # fp32 weights and optimizer; DeepSpeed runs the forward under torch.autocast(bfloat16).
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if precision == "bf16":
        # check_grad_overflow: a non-finite gradient makes ZeRO skip the update and clear the gradients on every
        # rank (the norm is all-reduced), which is the skip jobs/step.py relies on. fp32 ZeRO does this already.
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return config


def build_engine(model: nn.Module, optim: OptimConfig, ds: DeepSpeedConfig, derived: Derived, device: torch.device):
    import deepspeed

    on_cuda = device.type == "cuda"
    precision = resolve_precision(ds.precision, on_cuda, optim.name)
    optimizer = build_optimizer(model.param_groups(optim.weight_decay), optim, on_cuda)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(ds, derived, optim.grad_clip, precision))
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
