"""Pre-train an encoder under DeepSpeed: CAN and its mae / simclr / can_no_noise recipes (ViT), and the
joint-embedding recipes mscn_simclr, mscn_byol, supcon (ResNet-50 or ViT; model.recipes).

    deepspeed --num_gpus 8 jobs/pretrain.py --config jobs/configs/can_vit_large.yaml [--set optim.base_lr=2e-4 ...]
    torchrun --nproc_per_node 8 jobs/pretrain.py --config ...        # same script; RANK/WORLD_SIZE from the launcher
    python jobs/pretrain.py --config jobs/configs/demo_cpu.yaml       # one process

Starting again with the same output_dir resumes from its latest complete checkpoint. SIGTERM / SIGUSR1 save a
checkpoint at the next step boundary and exit 0 (see jobs/preemption.py).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from jobs.config import MonitorConfig, TrainConfig, dump_yaml, load_config
from jobs.derived import Derived, derive
from jobs.engine import build_engine, resolve_runtime
from jobs.errors import ConfigError
from jobs.eval.monitor import KNNMonitor
from jobs.launch import Dist, init_distributed
from jobs.loop import LoopHooks, Progress, train
from jobs.run import build_data, parse_job_args, prepare_run_dir, resume, setup_logging
from jobs.startup import agree
from jobs.plots import plot_run
from jobs.step import train_step
from jobs.validate import check_config
from model.build import build_model
from model.config import ModelConfig
from model.distributed import convert_sync_batchnorm
from model.flops import train_flops_per_image
from pipeline.config import AugmentConfig, DataConfig, eval_preprocessing

log = logging.getLogger("jobs.pretrain")


def derived_values(cfg: TrainConfig, world_size: int) -> Derived:
    o, s = cfg.optim, cfg.schedule
    return derive(o.global_batch, cfg.data.batch_size, world_size, o.base_lr, o.lr_base_batch, s.total_samples,
                  s.warmup_samples)


def build_network(cfg: ModelConfig, seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
    # Projector BatchNorm (recipes that have one) must see the global batch: SyncBatchNorm on multi-GPU runs.
    return convert_sync_batchnorm(build_model(cfg), device)


def build_monitor(cfg: MonitorConfig, data: DataConfig, zero_stage: int, dist: Dist) -> KNNMonitor | None:
    """The kNN monitor (decodes its labelled sets once, here) on rank 0, or None when off or on other ranks.

    Under ZeRO-3 every rank runs it: the encoder's forward hooks all-gather each layer collectively, so one rank
    alone would wait for the others forever (GatheredParameters does not stop those hooks). The ranks compute the
    same number; rank 0 logs it.
    """
    if cfg.knn_every_steps <= 0 or not (dist.is_main or zero_stage == 3):
        return None
    memory, query = (data.with_(shards=url, mode="eval") for url in (cfg.knn_memory_shards, cfg.knn_query_shards))
    # pool=None: the encoder's own forward_head, so the ResNet and the ViT (with its global_pool) are both scored
    # on the features a probe would see.
    monitor = KNNMonitor.from_data(memory, query, cfg.knn_num_classes, k=cfg.knn_k, temperature=cfg.knn_temperature,
                                   pool=None)
    log.info("kNN monitor: %d memory and %d query images, every %d steps", len(monitor.memory.labels),
             len(monitor.queries.labels), cfg.knn_every_steps)
    return monitor


def pretrain_hooks(engine, loader, cfg: TrainConfig, derived: Derived, monitor: KNNMonitor | None) -> LoopHooks:
    """Pre-training's part of jobs.loop.train; monitor: this rank's kNN monitor or None (build_monitor says which)."""
    import deepspeed

    every_knn = cfg.monitor.knn_every_steps  # a multiple of logging.every_steps (jobs/validate.py)

    def extra_record(progress: Progress, final: bool) -> dict:
        record = {f"data_{k}": v for k, v in loader.counters().items()}  # this rank's stream
        if monitor is not None and every_knn > 0 and (progress.step % every_knn == 0 or final):
            encoder = engine.module.encoder
            # ZeRO-3 gathers a layer's weights in that layer's forward hooks; the encoder's own parameters (cls token)
            # are read by a method, not a forward, so they are gathered here (every rank: a collective).
            with deepspeed.zero.GatheredParameters(list(encoder.parameters(recurse=False)),
                                                   enabled=engine.zero_optimization_stage() == 3):
                record.update(monitor(encoder))  # {"knn_top1"}
        return record

    # every rank: BYOL moves its EMA target here; the other models do nothing
    return LoopHooks(on_step_applied=lambda step: engine.module.on_step_applied(step, derived.total_steps),
                     extra_record=extra_record,
                     log_suffix=lambda r: f"lr {r['lr']:.3g} {r['images_per_s_per_device']:.1f} img/s/device",
                     progress_bar=True)


def export_encoder(engine, cfg: ModelConfig, augment: AugmentConfig, out_dir: Path, dist: Dist) -> None:
    """encoder.safetensors (+ .json) for timm and the probes; ZeRO-3 first gathers the partitioned weights.

    The JSON records the eval preprocessing of `augment` (MSCN's high-pass), so a copied export is probed on the images
    its encoder was trained on, without the run directory's resolved.yaml."""
    import deepspeed
    from model.export import export_encoder as write_encoder

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        if dist.is_main:
            state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
            write_encoder(state, out_dir / "encoder.safetensors", preset=cfg.preset, global_pool=cfg.global_pool,
                          img_size=cfg.img_size, eval_preprocessing=eval_preprocessing(augment))
            log.info("encoder exported to %s", out_dir / "encoder.safetensors")


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(argv, __doc__, "optim.base_lr=1.0e-3")
    cfg = load_config(args.config, args.set)
    dist = init_distributed(cfg.deepspeed.dist_backend)
    setup_logging(dist.rank)
    agree(lambda: check_config(cfg), "start-up checks")  # every rank fails alike, though a node's environment differs
    derived = derived_values(cfg, dist.world_size)
    network = build_network(cfg.model, cfg.seed, dist.device)
    runtime = resolve_runtime(cfg.deepspeed, cfg.optim.name, network, dist.device.type == "cuda")
    out_dir = prepare_run_dir(cfg.output_dir, derived, runtime, lambda extra: dump_yaml(cfg, extra), dist)
    engine = build_engine(network, cfg.optim, cfg.deepspeed, derived, runtime)
    progress, loader_state = resume(engine, out_dir / "checkpoints", dist, cfg.checkpoint.resume)
    loader = build_data(cfg.data, dist, loader_state)
    monitor = agree(lambda: build_monitor(cfg.monitor, cfg.data, cfg.deepspeed.zero_stage, dist), "the kNN monitor")
    outcome = train(engine, loader, cfg, derived, dist, progress, out_dir, train_flops_per_image(cfg.model),
                    step_fn=train_step, hooks=pretrain_hooks(engine, loader, cfg, derived, monitor))
    loader.close()
    if dist.is_main:  # for schedulers: jobs/slurm_pretrain.sh requeues itself unless the run is done
        (out_dir / "status.json").write_text(json.dumps({"outcome": outcome, "step": progress.step}) + "\n")
    if outcome == "done":
        if cfg.checkpoint.export_encoder:
            export_encoder(engine, cfg.model, cfg.data.augment, out_dir, dist)
        if cfg.logging.plot and dist.is_main:
            log.info("loss curves: %s", plot_run(out_dir))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        # A bad config is the user's to fix: one line naming the field, no traceback.
        logging.getLogger("jobs.pretrain").error("config error: %s", e)
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
