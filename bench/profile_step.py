"""Host-side cost of one training step: the trainer's real loop (jobs.loop.train) under torch.profiler, on CPU.

    python -m bench.profile_step                                   # vit_tiny, 32 px, patch 8 (test_cpu.yaml's model)
    python -m bench.profile_step --steps 6 --set model.recipe=simclr --trace /tmp/step.json   # + a Chrome trace

Each run profiles the step twice in one process, eager and with the transformer blocks compiled (the trainer's
deepspeed.compile=blocks, jobs.engine.compile_blocks; --compile off|blocks for one of them), and prints both and
their ratio. The compiled variant's first steps compile (about a minute on 2 CPU cores): --warmup covers them.

The loop is fed a synthetic batch (no loader cost) and runs --warmup + --steps steps with logging every
--log-every steps; a loop iteration is the time between two batch fetches, so it holds train_step and everything the
loop does per step (schedule, non-finite guard, metrics window, preemption check). Reported per step:
- wall time, and the share of it outside ATen ops: Python, the autograd engine's and DeepSpeed's bookkeeping. On a
  GPU this is the time the host needs to launch the step; it is hidden only while it stays below the device time.
- ATen ops per step (each one is at least one kernel launch on a GPU).
- host-device syncs: aten::_local_scalar_dense (.item(), bool(), float() of a tensor) and ops whose output size
  depends on the data (nonzero, masked_select, unique); .tolist() does not pass the dispatcher: the metrics window's
  one read per logging window is not counted. Each sync is listed with the Python line that made it (a second,
  untimed pass over the same steps under a TorchDispatchMode).
- the top ATen ops by self time and by calls per step.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import traceback
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from bench.train import synthetic_batches
from jobs.config import load_config
from jobs.derived import derive
from jobs.engine import build_engine, resolve_runtime
from jobs.launch import init_distributed
from jobs.loop import Progress, train
from jobs.pretrain import pretrain_hooks
from jobs.step import train_step
from model.build import build_model
from model.flops import train_flops_per_image

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "test_cpu.yaml"
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim")
FETCH = "bench::next_batch"


class SyntheticLoader:
    """The loader interface pre-training's loop uses (iteration, counters, state_dict), over one synthetic batch; each
    fetch is marked in the profile, so loop iterations can be cut out of it."""

    def __init__(self, batch: int, img_size: int, num_patches: int, num_views: int):
        self.it = synthetic_batches(batch, img_size, num_patches, num_views, torch.device("cpu"))
        self.fetches = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.fetches += 1
        with record_function(FETCH):
            return next(self.it)

    def counters(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}


class SyncSites(TorchDispatchMode):
    """Counts the sync ops by the first Python line outside torch that called them (a second, untimed run: the
    profiler's own stack capture is not used, it fails to parse some traces in torch 2.13)."""

    def __init__(self, loader: SyntheticLoader, first: int, last: int):
        super().__init__()
        self.loader, self.first, self.last, self.sites = loader, first, last, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"aten::{func._schema.name.split('::')[-1]}"
        if name in SYNC_OPS and self.first < self.loader.fetches <= self.last:
            frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and __file__ != f.filename]
            site = frames[-1] if frames else None
            self.sites[f"{name} at {site.filename.split('site-packages/')[-1]}:{site.lineno} ({site.name})"
                       if site else name] += 1
        return func(*args, **(kwargs or {}))


def merged_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Total length of the union of intervals, clipped to [lo, hi]."""
    total, end = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total


def analyse(events, steps: int) -> dict:
    """Per-step figures over the last `steps` loop iterations (fetch end to fetch end)."""
    fetches = sorted(e.time_range.end for e in events if e.name == FETCH)
    lo, hi = fetches[-steps - 1], fetches[-1]
    inside = [e for e in events if lo <= e.time_range.start < hi]
    aten = [(e.time_range.start, e.time_range.end) for e in inside if e.name.startswith("aten::")]
    top_level_aten = [e for e in inside if e.name.startswith("aten::")
                      and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    syncs = [e for e in inside if e.name in SYNC_OPS]
    self_aten = collections.Counter()
    for e in inside:
        if e.name.startswith("aten::"):
            self_aten[e.name] += e.self_cpu_time_total
    calls = collections.Counter(e.name for e in top_level_aten)
    wall = hi - lo
    return {
        "step_ms": wall / steps / 1e3,
        "share_outside_aten": 1 - merged_length(aten, lo, hi) / wall,
        "aten_ops_per_step": len(top_level_aten) / steps,
        "syncs_per_step": len(syncs) / steps,
        "top_aten_self_ms_per_step": {k: v / steps / 1e3 for k, v in self_aten.most_common(8)},
        "top_aten_calls_per_step": {k: v / steps for k, v in calls.most_common(8)},
    }


def profile_variant(cfg, args, compile_mode: str, out_dir: Path, dist) -> dict:
    """The analysed report of one variant: a fresh model and engine with deepspeed.compile = compile_mode."""
    from dataclasses import replace

    cfg = replace(cfg, deepspeed=replace(cfg.deepspeed, compile=compile_mode))
    o, total = cfg.optim, args.warmup + args.steps + 1  # the last step checkpoints: not analysed
    derived = derive(o.global_batch, cfg.data.batch_size, 1, o.base_lr, o.lr_base_batch, cfg.schedule.total_samples,
                     cfg.schedule.warmup_samples)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    loader = SyntheticLoader(cfg.data.batch_size, cfg.model.img_size, model.num_patches, model.num_views)
    runtime = resolve_runtime(cfg.deepspeed, o.name, model, dist.device.type == "cuda")
    engine = build_engine(model, cfg.optim, cfg.deepspeed, derived, runtime)
    flops = train_flops_per_image(cfg.model)
    hooks = pretrain_hooks(engine, loader, cfg, derived, None)  # the loop as jobs/pretrain.py runs it, less kNN
    for sub in ("timed", "sites"):
        (out_dir / sub).mkdir(parents=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        # The last step also checkpoints: it ends after the last fetch, so it falls outside the analysed window.
        train(engine, loader, cfg, derived, dist, Progress(), out_dir / "timed", flops, step_fn=train_step,
              hooks=hooks)
    report = analyse(prof.events(), args.steps)
    loader.fetches = 0
    with SyncSites(loader, args.warmup, total - 1) as sites:  # the same steps, untimed, for where syncs come from
        train(engine, loader, cfg, derived, dist, Progress(), out_dir / "sites", flops, step_fn=train_step,
              hooks=hooks)
    report["sync_sites"] = {k: v / args.steps for k, v in sites.sites.most_common()}
    report["runtime"] = {"precision": runtime.precision, "compile": runtime.compile}
    if args.trace:
        prof.export_chrome_trace(f"{args.trace}.{compile_mode}.json")
    return report


def print_report(cfg, report: dict) -> None:
    print(f"model {cfg.model.preset} {cfg.model.recipe} {cfg.model.img_size} px patch {cfg.model.resolved_patch_size}, "
          f"micro-batch {cfg.data.batch_size}, {report['runtime']}, ZeRO {cfg.deepspeed.zero_stage}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"step {report['step_ms']:.1f} ms; outside ATen {100 * report['share_outside_aten']:.1f}%; "
          f"{report['aten_ops_per_step']:.0f} ATen ops/step; {report['syncs_per_step']:.1f} host-device syncs/step")
    for title in ("sync_sites", "top_aten_self_ms_per_step", "top_aten_calls_per_step"):
        print(title)
        for k, v in report[title].items():
            print(f"  {v:9.3f}  {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3, help="unanalysed steps first (the compiled variant compiles here)")
    ap.add_argument("--log-every", type=int, default=10, help="logging.every_steps (the metrics window's sync)")
    ap.add_argument("--compile", choices=["both", "off", "blocks"], default="both")
    ap.add_argument("--trace", default=None, help="also write Chrome traces to PREFIX.off.json / PREFIX.blocks.json")
    args = ap.parse_args()
    total = args.warmup + args.steps + 1
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"output_dir={tmp}", f"debug.max_steps={total}", f"logging.every_steps={args.log_every}",
                "logging.tensorboard=false", "logging.progress='off'", f"checkpoint.every_steps={10**9}",
                "optim.global_batch=8", "data.batch_size=8", *args.set]
        cfg = load_config(args.config, sets)
        dist = init_distributed()
        for mode in (["off", "blocks"] if args.compile == "both" else [args.compile]):
            reports[mode] = profile_variant(cfg, args, mode, Path(tmp) / mode, dist)
            print_report(cfg, reports[mode])
        torch.distributed.destroy_process_group()
    if len(reports) == 2:
        off, on = reports["off"], reports["blocks"]
        print(f"compiled blocks vs eager: step {on['step_ms']:.1f} / {off['step_ms']:.1f} ms "
              f"({on['step_ms'] / off['step_ms']:.2f}x), ATen ops per step {on['aten_ops_per_step']:.0f} / "
              f"{off['aten_ops_per_step']:.0f}, host time outside ATen "
              f"{on['step_ms'] * on['share_outside_aten']:.1f} / {off['step_ms'] * off['share_outside_aten']:.1f} ms")


if __name__ == "__main__":
    main()
