"""Fine-tuning's step and loop: the pre-training loop's boundaries (seeded steps, non-finite guard, logging window,
periodic and preemption checkpoints) around a supervised step. The pieces are the trainer's (jobs/loop.py,
jobs/metrics.py, jobs/checkpoint.py, jobs/preemption.py); only the step differs: labels go in, and each layer's lr is
scaled by its layer-decay factor.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from jobs import checkpoint, rng_state
from jobs.derived import Derived
from jobs.eval.finetune_model import set_layer_lrs
from jobs.finetune_config import FinetuneConfig
from jobs.launch import Dist
from jobs.loop import NonFiniteGuard, Progress, trainer_state
from jobs.metrics import MetricsWriter, TimedIterator, Window, peak_flops
from jobs.preemption import PreemptionFlag
from jobs.schedules import lr_at
from jobs.step import StepOutput

log = logging.getLogger(__name__)


def finetune_step(engine, batches: Iterator[dict], grad_accum: int, lr: float, poison: bool = False) -> StepOutput:
    """`grad_accum` micro-batches of {"view1": (B, 3, H, W), "labels": (B,)}; DeepSpeed updates at the last one.

    No host sync (no .item()): the loss terms stay on the device until the logging window reads them.
    """
    set_layer_lrs(engine.optimizer, lr)  # schedule x layer decay
    dtype = engine.get_data_types()[0]
    totals: dict[str, torch.Tensor] = {}
    for _ in range(grad_accum):
        batch = next(batches)
        terms = engine(batch["view1"].to(dtype), batch["labels"])  # forward: {"loss", "top1"}
        loss = terms["loss"] * float("nan") if poison else terms["loss"]
        engine.backward(loss)
        engine.step()  # a no-op until the accumulation boundary
        for name, value in terms.items():
            value = loss if name == "loss" else value
            totals[name] = totals.get(name, 0.0) + value.detach().float() / grad_accum
    return StepOutput(losses=totals, applied=engine.was_step_applied())


def finetune(engine, loader, cfg: FinetuneConfig, derived: Derived, world: Dist, progress: Progress,
             out_dir: Path, flops_per_image: float) -> str:
    """Runs to the schedule's end (or debug.max_steps) or a preemption; returns "done" or "preempted"."""
    preemption = PreemptionFlag()
    guard = NonFiniteGuard(cfg.optim.max_nonfinite_in_a_row)
    writer = MetricsWriter(out_dir, cfg.logging.tensorboard) if world.is_main else None
    window, batches = Window(world.device), TimedIterator(iter(loader))
    peak = peak_flops(world.device, cfg.logging.peak_flops)
    last = min(derived.total_steps, cfg.debug.max_steps or derived.total_steps)
    sched = cfg.schedule
    try:
        while progress.step < last:
            step = progress.step + 1
            torch.manual_seed(rng_state.step_seed(cfg.seed, step, world.rank))  # drop path: resume-exact
            lr = lr_at(progress.samples_seen, derived.peak_lr, sched.warmup_samples, sched.total_samples,
                       sched.min_lr_ratio)
            out = finetune_step(engine, batches, derived.grad_accum, lr, world.is_main and step in cfg.debug.nan_at_steps)
            progress.step, progress.samples_seen = step, progress.samples_seen + derived.global_batch
            guard.update(progress, out, step)
            window.add(out.losses)
            if step % cfg.logging.every_steps == 0 or step == last:
                record = window.reduce(batches.wait_s, derived.micro_batch * derived.grad_accum, flops_per_image, peak)
                norm = engine.get_global_grad_norm()
                record.update(step=step, samples_seen=progress.samples_seen, lr=lr, skipped_steps=progress.skipped_total,
                              epoch=progress.samples_seen / sched.epoch_samples,
                              grad_norm=float(norm) if norm is not None and math.isfinite(float(norm)) else None)
                window.reset(batches.wait_s)
                if writer is not None:
                    writer.write(record)
                    log.info("step %d/%d loss %.4f train top-1 %.1f%% lr %.3g", step, last, record["loss"],
                             record["top1"], lr)
            preempted = preemption.requested_anywhere()
            if preempted or step % cfg.checkpoint.every_steps == 0 or step == last:
                checkpoint.save(engine, out_dir / "checkpoints", step, trainer_state(progress, loader), world.rank,
                                cfg.checkpoint.keep)
            if preempted:
                log.info("%s received: saved step %d, exiting", preemption.signal_name or "signal on another rank", step)
                return "preempted"
        return "done"
    finally:
        if writer is not None:
            writer.close()


@torch.no_grad()
def evaluate(engine, loader, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) over one eval pass, every labelled sample counted once across ranks.

    Ranks hold different numbers of batches in eval mode, so the only collective is one all-reduce of the counts after
    the pass. The forward goes through engine.module so ZeRO-3's hooks gather each layer's weights as usual.
    """
    model = engine.module
    was_training = model.training
    model.eval()  # no drop path
    dtype = engine.get_data_types()[0]
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, labelled samples
    for batch in loader:
        labels = batch["labels"].to(device)
        logits = model.logits(batch["view1"].to(dtype)).float()
        seen = labels >= 0
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices[seen]
        hits = topk == labels[seen, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), seen.sum()]).to(counts)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    top1, top5, n = counts.tolist()
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "num_val": int(n)}
