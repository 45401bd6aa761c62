"""Fine-tuning's part of the trainer's loop (jobs.loop.train: seeded steps, non-finite guard, logging window, periodic
and preemption checkpoints): a supervised step, where labels go in and each layer's lr is scaled by its layer-decay
factor, the hooks that add the epoch to the records, and the final evaluation.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from jobs.eval.finetune_model import set_layer_lrs
from jobs.finetune_config import EpochSchedule
from jobs.loop import LoopHooks
from jobs.step import StepOutput


def finetune_step(engine, batches: Iterator[dict], grad_accum: int, lr: float, poison: bool = False) -> StepOutput:
    """`grad_accum` micro-batches of {"view1": (B, 3, H, W), "labels": (B,)}; DeepSpeed updates at the last one.

    No host sync (no .item()): the loss terms stay on the device until the logging window reads them.
    """
    set_layer_lrs(engine.optimizer, lr)  # schedule x layer decay
    totals: dict[str, torch.Tensor] = {}
    for _ in range(grad_accum):
        batch = next(batches)
        terms = engine(batch["view1"], batch["labels"])  # forward: {"loss", "top1"}; the ViT casts the float32 view
        loss = terms["loss"] * float("nan") if poison else terms["loss"]
        engine.backward(loss)
        engine.step()  # a no-op until the accumulation boundary
        for name, value in terms.items():
            value = loss if name == "loss" else value
            totals[name] = totals.get(name, 0.0) + value.detach().float() / grad_accum
    return StepOutput(losses=totals, applied=engine.was_step_applied())


def finetune_hooks(schedule: EpochSchedule) -> LoopHooks:
    """Records carry the epoch, as recipes are written in epochs; the log line shows train top-1 (the forward's)."""
    return LoopHooks(extra_record=lambda progress, final: {"epoch": progress.samples_seen / schedule.epoch_samples},
                     log_suffix=lambda record: f"train top-1 {record['top1']:.1f}% lr {record['lr']:.3g}")


@torch.no_grad()
def evaluate(engine, loader, device: torch.device, img_size: int) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) over one eval pass, every labelled sample counted once across ranks.

    Ranks hold different numbers of batches in eval mode (a rank may hold none: fewer validation shards than
    readers). Under ZeRO 0-2 the only collective is one all-reduce of the counts after the pass. Under ZeRO-3 every
    forward is itself a collective (each layer's weights are gathered from all ranks), so the ranks go in lockstep:
    before each batch they agree whether any rank still has one, and a rank whose share has ended runs a forward of
    one blank img_size image (not counted) until every rank's has.
    """
    model = engine.module
    was_training = model.training
    model.eval()  # no drop path
    lockstep = engine.zero_optimization_stage() == 3 and dist.is_initialized() and dist.get_world_size() > 1
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, labelled samples
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if lockstep:
            left = torch.tensor([float(batch is not None)], device=device)
            dist.all_reduce(left, op=dist.ReduceOp.MAX)
            if left.item() == 0.0:
                break
            if batch is None:
                model.logits(torch.zeros(1, 3, img_size, img_size, device=device))
                continue
        elif batch is None:
            break
        labels = batch["labels"].to(device)
        logits = model.logits(batch["view1"]).float()
        seen = labels >= 0
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices[seen]
        hits = topk == labels[seen, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), seen.sum()]).to(counts)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    top1, top5, n = counts.tolist()
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "num_val": int(n)}
