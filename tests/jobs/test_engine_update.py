"""What the engine does with a step's gradients: a non-finite loss skips the update for every optimizer x ZeRO stage
x precision the config check accepts (the combinations that would apply it are refused at start: jobs/validate.py
check_nonfinite_skip, check_engine), and optim.grad_clip clips the global gradient norm."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from jobs.config import DeepSpeedConfig, OptimConfig, TrainConfig
from jobs.derived import derive
from jobs.engine import Runtime, build_engine
from jobs.errors import ConfigError
from jobs.step import train_step
from jobs.validate import check_engine

STAGES, PRECISIONS = (0, 1, 2, 3), ("fp32", "bf16", "amp_bf16")


class Tiny(nn.Module):
    """The trainer's model protocol (forward -> {"loss", ...}, param_groups) around a LayerNorm MLP."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))

    def forward(self, view1: torch.Tensor, **unused) -> dict[str, torch.Tensor]:
        x = view1.flatten(1).to(self.net[0].weight.dtype)
        loss = self.net(x).float().pow(2).mean()
        return {"loss": loss, "mse": loss.detach()}

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.parameters()), "weight_decay": weight_decay}]


def accepted(optimizer: str, stage: int, precision: str) -> bool:
    cfg = TrainConfig(optim=OptimConfig(name=optimizer), deepspeed=DeepSpeedConfig(zero_stage=stage,
                                                                                     precision=precision))
    try:
        check_engine(cfg)
        return True
    except ConfigError:
        return False


MATRIX = list(itertools.product(("adamw", "lars"), STAGES, PRECISIONS))


def test_the_accepted_combinations_are_exactly_these():
    """AdamW needs ZeRO 1-3 (stage 0 has no overflow check); LARS needs stage 0 (per-layer trust ratios) and not
    bf16 weights (flat partitions)."""
    assert {m for m in MATRIX if accepted(*m)} == (
        {("adamw", s, p) for s in (1, 2, 3) for p in PRECISIONS} | {("lars", 0, "fp32"), ("lars", 0, "amp_bf16")})


@pytest.fixture(scope="module")
def dist(in_process_dist):
    return in_process_dist


def weights(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return [p.detach().float().cpu().clone() for p in params]


@pytest.mark.parametrize("optimizer,stage,precision", [m for m in MATRIX if accepted(*m)])
def test_nonfinite_loss_skips_the_update(dist, optimizer, stage, precision):
    """Step 1 is poisoned (loss x NaN): no weight moves and the step reports itself skipped. Step 2 is clean: it
    applies, and every weight is finite and moved (a NaN that reached AdamW's moments or LARS's momentum would make
    step 2 NaN even with a finite gradient)."""
    torch.manual_seed(0)
    derived = derive(4, 2, 1, 1e-2, 256, 400, 0)  # 2 micro-batches of 2: the poison sits in an accumulation
    engine = build_engine(Tiny(), OptimConfig(name=optimizer, global_batch=4),
                          DeepSpeedConfig(zero_stage=stage, precision=precision), derived, Runtime(precision, False))
    batch = {"view1": torch.randn(2, 3, 2, 2, device=dist.device)}
    batches = iter(lambda: batch, None)
    before = weights(engine)
    out = train_step(engine, batches, derived.grad_accum, 1e-2, poison=True)
    assert not out.applied
    assert all(torch.equal(a, b) for a, b in zip(before, weights(engine)))
    out = train_step(engine, batches, derived.grad_accum, 1e-2)
    after = weights(engine)
    assert out.applied and torch.isfinite(out.losses["loss"])
    assert all(torch.isfinite(w).all() for w in after) and not all(torch.equal(a, b) for a, b in zip(before, after))


def test_grad_clip_clips_the_global_norm(dist):
    """Three AdamW steps of the engine (ZeRO-2, fp32, optim.grad_clip=1e-3) equal plain torch AdamW on gradients
    clipped to that global norm (torch.nn.utils.clip_grad_norm_), and not AdamW on unclipped ones (Adam's first step
    does not see a gradient's scale; its later ones do); the engine reports the norm before clipping."""
    torch.manual_seed(0)
    clip, lr = 1e-3, 1e-2
    reference = {"clipped": Tiny(), "unclipped": None}
    reference["unclipped"] = copy.deepcopy(reference["clipped"])
    engine = build_engine(copy.deepcopy(reference["clipped"]), OptimConfig(global_batch=2, grad_clip=clip,
                                                                           weight_decay=0.0),
                          DeepSpeedConfig(zero_stage=2, precision="fp32"), derive(2, 2, 1, lr, 256, 400, 0),
                          Runtime("fp32", False))
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
                  for k, m in reference.items()}
    for _ in range(3):
        batch = {"view1": torch.randn(2, 3, 2, 2)}
        assert train_step(engine, iter([{"view1": batch["view1"].to(dist.device)}]), 1, lr).applied
        for kind, model in reference.items():
            optimizers[kind].zero_grad()
            model(**batch)["loss"].backward()
            if kind == "clipped":
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                assert norm > 10 * clip  # clipping is at work
                assert engine.get_global_grad_norm() == pytest.approx(norm.item(), rel=1e-4)
            optimizers[kind].step()
    got = weights(engine)
    for w, ref in zip(got, reference["clipped"].parameters()):
        torch.testing.assert_close(w, ref.detach(), rtol=1e-4, atol=1e-6)
    assert max((w - ref.detach()).abs().max() for w, ref in zip(got, reference["unclipped"].parameters())) > 1e-4


def test_zero3_autocast_leaves_the_fp32_patch_projection_out_of_bf16_gathers(dist):
    """Under ZeRO-3 with amp_bf16, DeepSpeed all-gathers (and sums gradients of) the weights of the module classes it
    deems safe in lower precision (torch.nn.Linear, Conv2d, by exact class) in bf16: it marks them with a comm dtype.
    The ViT's patch projection runs in float32 by design (model/vit.py: CAN's pixel noise would round away in bf16),
    so it must stay unmarked, while a block's Linear is marked (the marking is at work, so this test can fail)."""
    from deepspeed.runtime.torch_autocast import get_comm_dtype, has_comm_dtype

    from model.can import build_model
    from model.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="vit_tiny", img_size=16, patch_size=8, recipe="can", decoder_dim=32,
                                    decoder_depth=1, decoder_heads=2))
    engine = build_engine(model, OptimConfig(global_batch=2), DeepSpeedConfig(zero_stage=3, precision="amp_bf16"),
                          derive(2, 2, 1, 1e-3, 256, 400, 0), Runtime("amp_bf16", False))
    params = dict(engine.module.named_parameters())
    assert get_comm_dtype(params["encoder.blocks.0.attn.qkv.weight"]) == torch.bfloat16
    assert not has_comm_dtype(params["encoder.patch_embed.proj.weight"])
    assert not has_comm_dtype(params["encoder.patch_embed.proj.bias"])
