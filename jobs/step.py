"""One optimizer step: schedules -> forward (loss dict) -> engine.backward -> engine.step -> metrics.

Shared by the trainer and bench/train.py, so the benchmark times exactly what the trainer runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from jobs.engine import set_lr

_VIEW_KEYS = ("view1", "view2", "views_extra")  # views_extra: (B, M, 3, H, W), MSCN's extra masked copies
_MASK_KEYS = ("mask_keys1", "mask_keys2")


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # detached, on device, averaged over the micro-batches of this rank
    applied: bool  # False when DeepSpeed skipped the update (non-finite gradient norm on some rank)


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The batch fields every model's forward takes (model.build), whichever the loader produced. Views stay float32
    whatever the engine's precision: the encoder's input layer casts them after CAN has added its noise (a bf16 view
    would round most of the noise away, model/vit.py); mask keys stay float32 (in bf16 they would tie, and ties change
    which patches the argsort keeps); labels (B,) long, -1 = none (supcon uses them, the others ignore them)."""
    inputs = {k: batch[k] for k in (*_VIEW_KEYS, *_MASK_KEYS) if k in batch}
    if "labels" in batch:
        inputs["labels"] = batch["labels"].long()
    return inputs


def train_step(engine, batches: Iterator[dict], grad_accum: int, lr: float, poison: bool = False) -> StepOutput:
    """Runs `grad_accum` micro-batches from `batches`; DeepSpeed applies the update at the last one.

    No host sync here (no .item()): losses stay on the device until the logger reduces them. `poison` makes the loss
    NaN (a test hook): the NaN gradient reaches every rank through the gradient all-reduce, so all ranks skip.
    """
    set_lr(engine, lr)  # schedule
    totals: dict[str, torch.Tensor] = {}
    for _ in range(grad_accum):
        losses = engine(**model_inputs(next(batches)))  # forward: named terms
        loss = losses["loss"] * float("nan") if poison else losses["loss"]
        engine.backward(loss)
        engine.step()  # a no-op until the accumulation boundary; then clip, update, zero grads
        for name, value in losses.items():
            value = loss if name == "loss" else value
            totals[name] = totals.get(name, 0.0) + value.detach().float() / grad_accum
    return StepOutput(losses=totals, applied=engine.was_step_applied())
