"""InfoNCE with negatives gathered across two real processes equals one process on the whole batch."""

from __future__ import annotations


import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.can import build_model
from model.config import ModelConfig
from tools.local_s3 import free_port

WORLD = 2
PER_RANK = 3
# simclr: the contrastive path alone, deterministic given the mask keys (no mask, no noise, no dropout).
CFG = ModelConfig(preset="vit_tiny", img_size=8, patch_size=4, recipe="simclr")


def batch():
    g = torch.Generator().manual_seed(0)
    n = WORLD * PER_RANK
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g), torch.rand(2, n, 4, generator=g)


def loss_and_grads(model, view1, view2, keys):
    model.zero_grad()
    loss = model(view1, view2, keys[0], keys[1])["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(CFG)
    view1, view2, keys = batch()
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    loss, grads = loss_and_grads(model, view1[part], view2[part], keys[:, part])
    torch.save({"loss": loss, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_info_nce_matches_single_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    torch.manual_seed(0)
    model = build_model(CFG)
    loss, grads = loss_and_grads(model, *batch())

    # What DDP / DeepSpeed do: average the loss for logging and the gradients for the step.
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    assert torch.allclose(mean_loss, loss, atol=1e-6)
    # Rank 0's part without gathering (2 * PER_RANK candidates) gives another loss: the gather did something.
    view1, view2, keys = batch()
    alone, _ = loss_and_grads(model, view1[:PER_RANK], view2[:PER_RANK], keys[:, :PER_RANK])
    assert not torch.allclose(alone, ranks[0]["loss"], atol=1e-3)
    for name, grad in grads.items():
        mean_grad = sum(r["grads"][name] for r in ranks) / WORLD
        assert torch.allclose(mean_grad, grad, atol=1e-6, rtol=1e-4), name
