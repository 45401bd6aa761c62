"""The training loop: seeded steps, the model's after-step hook, non-finite guard, logging window with the kNN
monitor, checkpoint and preemption boundaries."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jobs import checkpoint, rng_state
from jobs.config import TrainConfig
from jobs.derived import Derived
from jobs.launch import Dist
from jobs.metrics import MetricsWriter, TimedIterator, Window, peak_flops
from jobs.preemption import PreemptionFlag
from jobs.schedules import lr_at
from jobs.step import StepOutput, train_step

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What a checkpoint must restore besides the engine (per rank: the loader state differs between ranks)."""

    step: int = 0  # optimizer steps taken (skipped ones included: their data was consumed)
    samples_seen: int = 0  # global images consumed: the schedules' clock
    skipped_total: int = 0
    skipped_in_a_row: int = 0


class NonFiniteGuard:
    """Counts skipped steps; stops the run after `limit` in a row, naming the step and the loss terms."""

    def __init__(self, limit: int):
        self.limit = limit

    def update(self, progress: Progress, out: StepOutput, step: int) -> None:
        if out.applied:
            progress.skipped_in_a_row = 0
            return
        progress.skipped_total += 1
        progress.skipped_in_a_row += 1
        terms = {k: round(v.item(), 6) for k, v in out.losses.items()}  # a sync, but only on the rare skipped step
        log.warning("step %d skipped: non-finite loss or gradient %s (%d in a row)", step, terms,
                    progress.skipped_in_a_row)
        if progress.skipped_in_a_row >= self.limit:
            raise FloatingPointError(f"stopping at step {step}: {progress.skipped_in_a_row} non-finite steps in a row "
                                     f"(optim.max_nonfinite_in_a_row={self.limit}); loss terms {terms}")


def trainer_state(progress: Progress, loader) -> dict:
    return {"progress": asdict(progress), "data": loader.state_dict(), "rng": rng_state.capture()}


def knn_metrics(engine, monitor) -> dict[str, float]:
    """monitor(encoder) ({"knn_top1"}) where this rank runs the monitor, {} elsewhere (see pretrain.build_monitor:
    rank 0, or every rank under ZeRO-3, whose forward hooks all-gather each layer's weights collectively)."""
    return monitor(engine.module.encoder) if monitor is not None else {}


def train(engine, loader, cfg: TrainConfig, derived: Derived, dist: Dist, progress: Progress, out_dir: Path,
          flops_per_image: float, monitor=None) -> str:
    """Runs until the schedule's end (or debug.max_steps) or a preemption; returns "done" or "preempted".

    monitor: this rank's jobs.eval.monitor.KNNMonitor, or None (pretrain.build_monitor says which ranks run it).
    """
    preemption = PreemptionFlag()
    guard = NonFiniteGuard(cfg.optim.max_nonfinite_in_a_row)
    writer = MetricsWriter(out_dir, cfg.logging.tensorboard) if dist.is_main else None
    window, batches = Window(dist.device), TimedIterator(iter(loader))
    peak = peak_flops(dist.device, cfg.logging.peak_flops)
    last = min(derived.total_steps, cfg.debug.max_steps or derived.total_steps)
    bar = _progress_bar(cfg.logging.progress, dist, progress.step, last)
    ckpt_dir, sched = out_dir / "checkpoints", cfg.schedule
    try:
        while progress.step < last:
            step = progress.step + 1
            torch.manual_seed(rng_state.step_seed(cfg.seed, step, dist.rank))  # noise/drop-path: resume-exact
            lr = lr_at(progress.samples_seen, derived.peak_lr, sched.warmup_samples, sched.total_samples,
                       sched.min_lr_ratio)
            poison = dist.is_main and step in cfg.debug.nan_at_steps
            out = train_step(engine, batches, derived.grad_accum, lr, poison)
            progress.step, progress.samples_seen = step, progress.samples_seen + derived.global_batch
            if out.applied:  # every rank: BYOL moves its EMA target here; the other models do nothing
                engine.module.on_step_applied(step, derived.total_steps)
            guard.update(progress, out, step)
            window.add(out.losses)
            if bar is not None:
                bar.update(1)
            if step % cfg.logging.every_steps == 0 or step == last:
                record = window.reduce(batches.wait_s, derived.micro_batch * derived.grad_accum, flops_per_image, peak)
                record.update(step=step, samples_seen=progress.samples_seen, lr=lr, grad_norm=_grad_norm(engine),
                              skipped_steps=progress.skipped_total)
                record.update({f"data_{k}": v for k, v in loader.counters().items()})  # this rank's stream
                every_knn = cfg.monitor.knn_every_steps  # a multiple of logging.every_steps (jobs/validate.py)
                if every_knn > 0 and (step % every_knn == 0 or step == last):
                    record.update(knn_metrics(engine, monitor))
                window.reset(batches.wait_s)  # after the kNN pass, so its time is not counted as training
                if writer is not None:
                    writer.write(record)
                    log.info("step %d/%d loss %.4f lr %.3g %.1f img/s/device", step, last, record["loss"], lr,
                             record["images_per_s_per_device"])
            preempted = preemption.requested_anywhere()
            if preempted or step % cfg.checkpoint.every_steps == 0 or step == last:
                checkpoint.save(engine, ckpt_dir, step, trainer_state(progress, loader), dist.rank,
                                cfg.checkpoint.keep)
                log.info("checkpoint %s saved", checkpoint.tag_for(step))
            if preempted:
                log.info("%s received: saved step %d, exiting", preemption.signal_name or "signal on another rank",
                         step)
                return "preempted"
        return "done"
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None


def _progress_bar(mode: str, dist: Dist, start: int, total: int):
    if not dist.is_main or mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
