"""BYOL: the momentum schedule, the EMA target (no gradient, exact updates, bf16-safe) and the loss."""

from __future__ import annotations

import math

import pytest
import torch

from model.build import build_model
from model.config import ModelConfig
from model.ema import EMA, byol_momentum
from model.losses import byol_regression

TINY = ModelConfig(recipe="mscn_byol", backbone="resnet50", resnet_width=8, img_size=32, proj_hidden_dim=32,
                   pred_hidden_dim=32)  # fmt: skip


def views(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)


def test_momentum_rises_from_base_to_one_on_a_cosine():
    assert byol_momentum(0, 100, 0.996) == 0.996
    assert byol_momentum(100, 100, 0.996) == 1.0
    assert byol_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert byol_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    taus = [byol_momentum(s, 100, 0.99) for s in range(0, 101, 10)]
    assert taus == sorted(taus)
    assert byol_momentum(-5, 100, 0.99) == 0.99 and byol_momentum(500, 100, 0.99) == 1.0
    with pytest.raises(ValueError):
        byol_momentum(0, 0, 0.99)


def test_regression_loss_is_two_minus_two_cosine():
    p = torch.randn(5, 8)
    assert byol_regression(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_regression(p, -p).item() == pytest.approx(4.0)
    e1, e2 = torch.eye(8)[:1], torch.eye(8)[1:2]
    assert byol_regression(e1, e2).item() == pytest.approx(2.0)


def test_shapes_of_the_heads():
    model = build_model(ModelConfig(recipe="mscn_byol", backbone="resnet50", img_size=32))
    dims = lambda m: [(l.in_features, l.out_features) for l in m if isinstance(l, torch.nn.Linear)]  # noqa: E731
    assert dims(model.projector) == [(2048, 4096), (4096, 256)]
    assert dims(model.predictor) == [(256, 4096), (4096, 256)]
    # BatchNorm after the hidden layer only, ReLU between
    assert [type(m).__name__ for m in model.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in model.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_target_gets_no_gradient_and_online_does():
    model = build_model(TINY)
    out = model(*views())
    assert set(out) == {"loss", "byol"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.target_encoder.parameters())
    assert all(not p.requires_grad for p in model.target_projector.parameters())
    online = [model.encoder.conv1.weight, model.projector[0].weight, model.predictor[0].weight]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    groups = model.param_groups(1e-6)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert not grouped & {id(p) for p in model.target_encoder.parameters()}


def test_update_target_is_the_exact_ema():
    torch.manual_seed(0)
    model = build_model(TINY)
    assert torch.equal(model.target_encoder.conv1.weight, model.encoder.conv1.weight)  # starts as a copy
    with torch.no_grad():
        model.encoder.conv1.weight.add_(1.0)
    before = model.target_encoder.conv1.weight.clone()
    model.update_target(1.0)
    assert torch.equal(model.target_encoder.conv1.weight, before)
    model.update_target(0.75)
    expected = 0.75 * before + 0.25 * model.encoder.conv1.weight
    assert torch.allclose(model.target_encoder.conv1.weight, expected, atol=1e-6)
    model.update_target(0.0)
    assert torch.equal(model.target_encoder.conv1.weight, model.encoder.conv1.weight)
    assert torch.equal(model.target_projector[0].weight, model.projector[0].weight)
    assert model.target_momentum(0, 10) == TINY.ema_momentum


def test_training_step_moves_online_then_target_follows():
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = torch.optim.SGD([p for g in model.param_groups(0.0) for p in g["params"]], lr=0.1)
    start = model.target_encoder.conv1.weight.clone()
    model(*views())["loss"].backward()
    opt.step()
    assert torch.equal(model.target_encoder.conv1.weight, start)  # the optimizer never touches the target
    model.update_target(model.target_momentum(0, 100))
    moved = model.target_encoder.conv1.weight
    assert torch.allclose(moved, 0.996 * start + 0.004 * model.encoder.conv1.weight, atol=1e-6)


def test_bf16_target_still_moves():
    target, online = [torch.ones(4, dtype=torch.bfloat16)], [torch.full((4,), 1.5, dtype=torch.bfloat16)]
    naive = target[0].clone().lerp_(online[0], 1 - 0.996)
    assert torch.equal(naive, target[0])  # 0.002 is below half a bf16 ulp at 1.0: an in-place EMA stalls
    ema = EMA()
    for _ in range(10):
        ema.update(target, online, 0.996)
    assert target[0].dtype == torch.bfloat16 and (target[0] > 1.01).all()
    assert ema.shadow[0].float().sub(1 + 0.5 * (1 - 0.996**10)).abs().max() < 1e-5


def test_extra_masks_join_the_pairs():
    model = build_model(ModelConfig(**{**TINY.__dict__, "extra_masks": 2}))
    v1, v2 = views()
    out = model(v1, v2, views_extra=torch.randn(4, 2, 3, 32, 32))
    assert torch.isfinite(out["byol"])
    with pytest.raises(ValueError):
        model(v1, v2)  # configured for two extra masked views
