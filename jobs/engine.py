"""The DeepSpeed engine: optimizer, precision and ZeRO stage from the config.

We build the optimizer ourselves and hand it to deepspeed.initialize, because the model decides which parameters
are decayed (model.param_groups). AdamW is torch's fused implementation on every device: it needs no JIT build
(DeepSpeed's FusedAdam compiles a CUDA op on first use, which needs nvcc matching torch's CUDA on every node), and the
CPU tests run the same optimizer as the GPU cluster. ZeRO wraps any optimizer once zero_allow_untested_optimizer is
set. LARS (SimCLR / BYOL / MSCN) runs with ZeRO stage 0, where DeepSpeed all-reduces the gradients and calls it on the
model's own parameters (jobs/lars.py says why).

Precision: "bf16" = bf16 weights; DeepSpeed keeps fp32 master weights in its optimizer wrapper, accumulates gradients
in fp32 (data_types.grad_accum_dtype) and sums them across ranks in buckets of deepspeed.reduce_dtype (bf16 by
default). "amp_bf16" = fp32 weights under torch.autocast(bf16). "fp32". A non-finite gradient skips the update on
every rank: ZeRO stages 1-3 check the all-reduced gradient norm in every precision; stage 0 has no such check, so
only LARS (which checks itself) may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from jobs.config import DeepSpeedConfig, OptimConfig
from jobs.derived import Derived
from jobs.errors import ConfigError
from jobs.lars import LARS


def resolve_precision(precision: str, on_cuda: bool, optimizer: str, batchnorm: bool) -> str:
    """auto: bf16 on CUDA (full-rate tensor cores, no loss scaling needed), fp32 on CPU.

    amp_bf16 instead of bf16 for LARS (bf16 weights would make DeepSpeed hand it flat fp32 partitions instead of the
    layers) and for models with BatchNorm (`batchnorm`): DeepSpeed casts parameters, not buffers, so bf16 BatchNorm
    weights would meet fp32 running statistics in one kernel, which torch refuses; under autocast BatchNorm runs in
    fp32. An explicit bf16 for such a model fails here, at start-up.
    """
    if precision == "auto":
        if not on_cuda:
            return "fp32"
        return "amp_bf16" if optimizer == "lars" or batchnorm else "bf16"
    if precision == "bf16" and batchnorm:
        raise ConfigError("deepspeed.precision: bf16 casts the weights but not BatchNorm's running statistics, which "
                          "this model has (ResNet backbone or projector BatchNorm); use amp_bf16 (or auto)")
    return precision


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def resolve_compile(mode: str, on_cuda: bool, zero_stage: int) -> bool:
    """deepspeed.compile -> whether to compile the blocks. ZeRO-3 gathers each layer's weights in module hooks, which
    would run inside the compiled blocks: refused there."""
    if mode == "blocks" and zero_stage == 3:
        raise ConfigError("deepspeed.compile: blocks does not run under zero_stage 3 (its parameter hooks run inside "
                          "each block); use zero_stage 1 or 2, or compile off")
    return mode == "blocks" or (mode == "auto" and on_cuda and zero_stage < 3)


@dataclass(frozen=True)
class Runtime:
    """How one job's model runs, resolved once at start-up from the config, the model and the device; logged and
    saved in resolved.yaml (`derived`)."""

    precision: str  # bf16 | amp_bf16 | fp32
    compile: bool  # transformer blocks compiled (compile_blocks)


def resolve_runtime(ds: DeepSpeedConfig, optimizer: str, model: nn.Module, on_cuda: bool) -> Runtime:
    return Runtime(precision=resolve_precision(ds.precision, on_cuda, optimizer, has_batchnorm(model)),
                   compile=resolve_compile(ds.compile, on_cuda, ds.zero_stage))


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block (model.block.Block) in place; returns how many.

    Blocks, not the whole model: the blocks hold nearly all the FLOPs, and compiling them fuses the norms, GELU,
    residual adds and casts around the matrix products. Dynamo treats a module's parameters as inputs, so the 24
    encoder blocks of a ViT-L share one compiled graph, the decoder's blocks another. The rest (masking by argsort and
    gather, the losses, the all-gathers) stays eager, so collectives never sit inside a compiled graph.
    """
    from model.block import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def _adamw(param_groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    # fused: one multi-tensor kernel per step on CUDA, vectorised loops on CPU.
    return torch.optim.AdamW(param_groups, lr=0.0, betas=optim.betas, eps=optim.eps, fused=True)


def _lars(param_groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    # skip_nonfinite: without ZeRO, DeepSpeed applies a non-finite update; LARS skips it and reports it as DeepSpeed's
    # own optimizers do, so the trainer's non-finite guard (jobs/loop.py) works the same.
    return LARS(param_groups, lr=0.0, momentum=optim.momentum, trust_coefficient=optim.trust_coefficient,
                skip_nonfinite=True)


OPTIMIZERS = {"adamw": _adamw, "lars": _lars}


def build_optimizer(param_groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    """optim.name over the model's groups (each group carries its weight_decay, and lars_exclude for LARS); lr starts
    at 0 and is set every step from the schedule."""
    return OPTIMIZERS[optim.name](param_groups, optim)


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
        if ds.reduce_dtype == "fp32":
            # DeepSpeed marks Linear and Conv weights to be summed across ranks in the autocast dtype; with none
            # marked they are summed in their own dtype, fp32.
            config["torch_autocast"]["lower_precision_safe_modules"] = []
        elif ds.zero_stage == 3:
            # Under ZeRO-3 the marked weights are also all-gathered in bf16, by the forward hooks; DeepSpeed's own
            # gathers (after an applied step, at checkpoint save and load, GatheredParameters) bring them in fp32.
            # Small weights (under its persistence threshold, 1e5 elements) stay gathered between steps while the
            # module trace holds, and are fetched again by the hooks after it resets (a resumed engine, a kNN
            # monitor forward): measured on test_cpu.yaml, a run resumed from its step-2 checkpoint lost ~5e-6 of
            # step 3's loss against the uninterrupted run, and a step after a monitor forward 7.5e-5 against the
            # same run without one; and a monitor forward after step 3 of test_cpu.yaml found the patch projection
            # (persistent, read by its parent, not by a forward of its own) still partitioned: "weight should have at
            # least three dimensions", the run dead (DeepSpeed 0.19.8; fp32, or amp_bf16 with nothing marked, is
            # fine). With none persistent, both pairs are bitwise equal and the monitor runs
            # (tests/jobs/test_train_e2e.py). The cost: the small weights (norms, biases) gathered in every forward
            # and backward, on a configuration (amp_bf16 under ZeRO-3) that the large bf16 runs do not use.
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if precision == "bf16":
        # check_grad_overflow: a non-finite gradient makes ZeRO skip the update and clear the gradients on every
        # rank (the norm is all-reduced), which is the skip jobs/step.py relies on. fp32 ZeRO does this already.
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
        # Micro-batch gradients summed in fp32: with 8 accumulation steps (one 8-GPU node at batch 4096), bf16 sums
        # would round away the small contributions. Stage 1 then runs DeepSpeed's BF16_Optimizer.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        # Cross-rank gradient sums in bf16 (DeepSpeed's default) or fp32: jobs/config.py says when to choose which.
        config["communication_data_type"] = ds.reduce_dtype
    return config


def build_engine(model: nn.Module, optim: OptimConfig, ds: DeepSpeedConfig, derived: Derived, runtime: Runtime):
    """The DeepSpeed engine around `model` (compiled first if runtime.compile); runtime: resolve_runtime's answer."""
    import deepspeed

    if runtime.compile:
        compile_blocks(model)
    optimizer = build_optimizer(model.param_groups(optim.weight_decay), optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(ds, derived, optim.grad_clip, runtime.precision))
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
