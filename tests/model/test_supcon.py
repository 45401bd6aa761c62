"""SupCon against a brute-force loop, its SimCLR limits, and with labels gathered across two real processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.build import build_model
from model.config import ModelConfig
from model.losses import info_nce, supcon
from tools.local_s3 import free_port


def brute_force_supcon(z1, z2, labels, t):
    """Khosla et al. eq. 2 written out: per anchor, mean over its positives of -log softmax, softmax over all but it."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=-1).double()
    lab = torch.cat([labels, labels]).tolist()
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        others = [a for a in range(2 * n) if a != i]
        denom = sum(math.exp(z[i] @ z[a] / t) for a in others)
        own = (i + n) % (2 * n)
        positives = [p for p in others if p == own or (lab[i] >= 0 and lab[p] == lab[i])]
        total += -sum(math.log(math.exp(z[i] @ z[p] / t) / denom) for p in positives) / len(positives)
    return total / (2 * n)


def test_equals_brute_force_on_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, -1, 2, 1, -1])  # two pairs of class-mates, two unlabelled, one alone
    for t in (0.1, 0.5):
        assert supcon(z1, z2, labels, t).item() == pytest.approx(brute_force_supcon(z1, z2, labels, t), rel=1e-9)


def test_reduces_to_info_nce_without_class_mates():
    z1, z2 = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    expected = info_nce(z1, z2, 0.1)
    assert torch.allclose(supcon(z1, z2, torch.arange(6), 0.1), expected)  # one sample per class
    assert torch.allclose(supcon(z1, z2, torch.full((6,), -1), 0.1), expected)  # nothing labelled
    # class-mates change it, and unlabelled samples are not each other's class-mates
    assert not torch.allclose(supcon(z1, z2, torch.tensor([0, 0, 1, 1, 2, 2]), 0.1), expected)


def test_is_low_when_class_mates_are_close():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 8, generator=g)
    z = centres.repeat_interleave(2, dim=0) + 0.01 * torch.randn(4, 8, generator=g)  # images 0, 1 and 2, 3 close
    clustered = supcon(z, z, torch.tensor([0, 0, 1, 1]), 0.1)
    assert clustered < supcon(z, z, torch.tensor([0, 1, 0, 1]), 0.1) - 1.0  # class-mates far apart


def test_gradient_is_finite_despite_the_masked_self_column():
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    supcon(z1, z2, torch.tensor([0, 0, -1, 1]), 0.1).backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


WORLD, PER_RANK = 2, 3
# ViT + SupCon head (no BatchNorm anywhere): one process on the whole batch is the exact reference.
CFG = ModelConfig(recipe="supcon", preset="vit_tiny", img_size=8, patch_size=4, proj_hidden_dim=16)
LABELS = torch.tensor([0, 1, -1, 1, 0, -1])  # class-mates across the two ranks' halves


def batch():
    g = torch.Generator().manual_seed(0)
    n = WORLD * PER_RANK
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


def loss_and_grads(model, view1, view2, labels):
    model.zero_grad()
    loss = model(view1, view2, labels=labels)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(CFG)
    view1, view2 = batch()
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    loss, grads = loss_and_grads(model, view1[part], view2[part], LABELS[part])
    torch.save({"loss": loss, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_labels_are_gathered_with_the_embeddings(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.manual_seed(0)
    model = build_model(CFG)
    loss, grads = loss_and_grads(model, *batch(), LABELS)
    assert torch.allclose(sum(r["loss"] for r in ranks) / WORLD, loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(sum(r["grads"][name] for r in ranks) / WORLD, grad, atol=1e-6, rtol=1e-4), name
