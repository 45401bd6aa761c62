"""The training loop of both jobs (jobs/pretrain.py, jobs/finetune.py): seeded steps, non-finite guard, logging window,
checkpoint and preemption boundaries. What a job adds comes in as its step function and a LoopHooks."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from jobs import checkpoint, rng_state
from jobs.config import TrainConfig
from jobs.derived import Derived
from jobs.finetune_config import FinetuneConfig
from jobs.launch import Dist
from jobs.metrics import MetricsWriter, TimedIterator, Window, peak_flops
from jobs.preemption import PreemptionFlag
from jobs.schedules import lr_at
from jobs.step import StepOutput

log = logging.getLogger(__name__)

# (engine, batches, grad_accum, lr, poison) -> StepOutput: jobs.step.train_step, jobs.eval.finetune_loop.finetune_step
StepFn = Callable[[Any, Iterator[dict], int, float, bool], StepOutput]


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


@dataclass(frozen=True)
class LoopHooks:
    """What one job adds to the shared loop; the defaults add nothing."""

    # step -> None, on every rank after each applied update only: a skipped step changed no weights to follow.
    on_step_applied: Callable[[int], None] = lambda step: None
    # (progress, last step?) -> more metrics.jsonl fields at each logging window. Called on every rank, not only the
    # writing one: an evaluation in it may be collective (the kNN monitor under ZeRO-3).
    extra_record: Callable[[Progress, bool], dict] = lambda progress, final: {}
    # record -> the end of rank 0's "step s/last loss x" log line
    log_suffix: Callable[[dict], str] = lambda record: f"lr {record['lr']:.3g}"
    progress_bar: bool = False  # a tqdm bar as cfg.logging.progress says


def train(engine, loader, cfg: TrainConfig | FinetuneConfig, derived: Derived, dist: Dist, progress: Progress,
          out_dir: Path, flops_per_image: float, *, step_fn: StepFn, hooks: LoopHooks) -> str:
    """Runs until the schedule's end (or debug.max_steps) or a preemption; returns "done" or "preempted"."""
    preemption = PreemptionFlag(progress.step)
    guard = NonFiniteGuard(cfg.optim.max_nonfinite_in_a_row)
    writer = MetricsWriter(out_dir, cfg.logging.tensorboard) if dist.is_main else None
    window, batches = Window(dist.device), TimedIterator(iter(loader))
    peak = peak_flops(dist.device, cfg.logging.peak_flops)
    last = min(derived.total_steps, cfg.debug.max_steps or derived.total_steps)
    bar = _progress_bar(cfg.logging.progress, dist, progress.step, last) if hooks.progress_bar else None
    ckpt_dir, sched = out_dir / "checkpoints", cfg.schedule
    try:
        while progress.step < last:
            step = progress.step + 1
            torch.manual_seed(rng_state.step_seed(cfg.seed, step, dist.rank))  # noise/drop path: resume-exact
            lr = lr_at(progress.samples_seen, derived.peak_lr, sched.warmup_samples, sched.total_samples,
                       sched.min_lr_ratio)
            poison = dist.is_main and step in cfg.debug.nan_at_steps
            out = step_fn(engine, batches, derived.grad_accum, lr, poison)
            progress.step, progress.samples_seen = step, progress.samples_seen + derived.global_batch
            if out.applied:
                hooks.on_step_applied(step)
            guard.update(progress, out, step)
            window.add(out.losses)
            if bar is not None:
                bar.update(1)
            if step % cfg.logging.every_steps == 0 or step == last:
                record = window.reduce(batches.wait_s, derived.micro_batch * derived.grad_accum, flops_per_image, peak,
                                       loader.counters())
                record.update(step=step, samples_seen=progress.samples_seen, lr=lr, grad_norm=_grad_norm(engine),
                              skipped_steps=progress.skipped_total)
                record.update(hooks.extra_record(progress, step == last))
                window.reset(batches.wait_s)  # after the extras, so an evaluation among them is not training time
                if writer is not None:
                    writer.write(record)
                    log.info("step %d/%d loss %.4f %s", step, last, record["loss"], hooks.log_suffix(record))
            preempted = preemption.requested_anywhere(step)
            if preempted or step % cfg.checkpoint.every_steps == 0 or step == last:
                checkpoint.save(engine, ckpt_dir, step, trainer_state(progress, loader), dist.rank,
                                cfg.checkpoint.keep, crash=step == cfg.debug.crash_in_save_at_step)
                log.info("checkpoint %s saved", checkpoint.tag_for(step))
            if preempted:
                got = (f"{preemption.signal_name} received in step {preemption.signal_step}"
                       if preemption.signal_name else "signal on another rank")
                log.info("%s: saved step %d, exiting", got, step)
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
