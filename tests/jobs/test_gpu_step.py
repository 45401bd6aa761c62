"""The trainer's step on one GPU in bf16: DeepSpeed bf16 weights, torch's fused AdamW, compiled blocks, flash
attention, a falling loss on a fixed batch with fixed noise."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: bf16 DeepSpeed engine on the GPU, compiled blocks, flash attention")


@pytest.fixture(scope="module")
def dist(in_process_dist):
    return in_process_dist


def _engine(dist, recipe: str = "can", compile_blocks: bool = False):
    from jobs.config import DeepSpeedConfig, OptimConfig
    from jobs.derived import derive
    from jobs.engine import Runtime, build_engine
    from model.build import build_model
    from model.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(preset="vit_tiny", img_size=64, patch_size=8, recipe=recipe, decoder_dim=128, decoder_depth=2,
                      decoder_heads=4)  # head dim 64 (encoder) and 32 (decoder): flash sizes
    model = build_model(cfg)
    derived = derive(16, 16, 1, 1e-3, 256, 16 * 100, 0)
    return build_engine(model, OptimConfig(global_batch=16), DeepSpeedConfig(precision="bf16"), derived,
                        Runtime("bf16", compile=compile_blocks))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled_blocks"])
def test_bf16_step_trains(dist, compiled):
    """Eight steps on one fixed batch with the same noise draw each step (the noise level is redrawn per step
    otherwise, and its spread alone moves the loss by more than eight steps of training): the loss must fall."""
    from bench.train import synthetic_batches
    from jobs.step import train_step

    engine = _engine(dist, compile_blocks=compiled)
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    assert isinstance(engine.optimizer.optimizer, torch.optim.AdamW)
    batches = synthetic_batches(16, 64, 64, 2, dist.device)  # one fixed batch
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the same noise every step
        out = train_step(engine, batches, 1, 1e-3)
        assert out.applied
        losses.append(out.losses["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


def test_training_attention_runs_on_flash_only():
    """Forward and backward of the bf16 encoder with SDPA restricted to the flash kernel (raises if flash cannot take
    the qkv layout the model hands it, strided heads of a fused projection, or its dtype), matching the math backend.
    A bare module: under the engine, ZeRO's gradient hooks move .grad into its flat buffers."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.build import build_model
    from model.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="vit_tiny", img_size=64, patch_size=8, recipe="simclr")).cuda().bfloat16()
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(backend):
            model.encoder.forward_features(x).float().pow(2).mean().backward()
        grads[backend] = model.encoder.blocks[0].attn.qkv.weight.grad.float().clone()
    flash, math = grads[SDPBackend.FLASH_ATTENTION], grads[SDPBackend.MATH]
    assert torch.allclose(flash, math, atol=1e-2 * math.abs().max().item(), rtol=5e-2)
