"""Fine-tune a pre-trained encoder end to end with a linear head (CAN_SPEC.md evaluation protocol), under DeepSpeed.

    deepspeed --num_gpus 8 jobs/finetune.py --config jobs/configs/finetune_vit_base.yaml \
        --set encoder=runs/can_vit_base --set train_data.shards=... --set val_data.shards=...
    torchrun --nproc_per_node 8 jobs/finetune.py --config ...     # same script; RANK/WORLD_SIZE from the launcher
    python jobs/finetune.py --config jobs/configs/finetune_test_cpu.yaml --set ...   # one process

--set encoder=: a pre-training run directory (its latest complete checkpoint), a checkpoint, or an exported
encoder.safetensors. Layer-wise lr decay, drop path and label smoothing come from the `head` section. Checkpoints,
resume and preemption behave as in jobs/pretrain.py: the same output_dir resumes from its latest complete checkpoint;
SIGTERM / SIGUSR1 save at the next step boundary and exit 0. At the end every rank scores its share of the validation
shards; rank 0 logs top-1 / top-5 and writes OUTPUT_DIR/finetune.json.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from jobs.derived import Derived, derive
from jobs.engine import build_engine, resolve_runtime
from jobs.errors import ConfigError
from jobs.eval.encoder_source import resolve_source
from jobs.eval.finetune_loop import evaluate, finetune_hooks, finetune_step
from jobs.eval.finetune_model import Classifier, build_classifier
from jobs.finetune_config import FinetuneConfig, check_finetune_config, dump_finetune_yaml, load_finetune_config
from jobs.launch import Dist, init_distributed
from jobs.loop import train
from jobs.run import build_data, parse_job_args, prepare_run_dir, resume, setup_logging
from jobs.startup import agree
from jobs.validate import check_shards
from model.flops import block_flops

log = logging.getLogger("jobs.finetune")


def derived_values(cfg: FinetuneConfig, world_size: int) -> Derived:
    o, s = cfg.optim, cfg.schedule
    return derive(o.global_batch, cfg.train_data.batch_size, world_size, o.base_lr, o.lr_base_batch, s.total_samples,
                  s.warmup_samples)


def build_network(cfg: FinetuneConfig) -> Classifier:
    torch.manual_seed(cfg.seed)  # the same head init on every rank
    h = cfg.head
    return build_classifier(resolve_source(cfg.encoder), h.num_classes, h.global_pool, h.drop_path, h.layer_decay,
                            h.label_smoothing, h.head_init_std)


def train_flops_per_image(vit) -> float:
    """3 x the encoder's forward on all 1 + L tokens (the head is negligible): the cost model of CAN_SPEC.md."""
    return 3.0 * vit.depth * block_flops(1 + vit.num_patches, vit.embed_dim)


def check_input_shape(model: Classifier, cfg: FinetuneConfig) -> None:
    pe = model.vit.patch_embed
    if (cfg.train_data.img_size, cfg.train_data.patch_size) != (pe.img_size, pe.patch_size):
        raise ConfigError(f"train_data.img_size / patch_size: {cfg.train_data.img_size} / {cfg.train_data.patch_size}, "
                          f"but the encoder was trained at {pe.img_size} px with patch {pe.patch_size}")


def check_finetune_start(cfg: FinetuneConfig) -> None:
    """The config, and that both data sources exist and can be read."""
    check_finetune_config(cfg)
    for section, data in (("train_data", cfg.train_data), ("val_data", cfg.val_data)):
        try:
            check_shards(data.sources, data.storage_options, data.mode)
        except ConfigError as e:
            raise ConfigError(f"{section}.{str(e).removeprefix('data.')}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(argv, __doc__, "encoder=runs/x")
    cfg = load_finetune_config(args.config, args.set)
    world = init_distributed(cfg.deepspeed.dist_backend)
    setup_logging(world.rank)
    agree(lambda: check_finetune_start(cfg), "start-up checks")  # every rank fails alike (jobs/startup.py)
    derived = derived_values(cfg, world.world_size)
    model = build_network(cfg)
    check_input_shape(model, cfg)
    runtime = resolve_runtime(cfg.deepspeed, cfg.optim.name, model, world.device.type == "cuda")
    out_dir = prepare_run_dir(cfg.output_dir, derived, runtime, lambda extra: dump_finetune_yaml(cfg, extra), world)
    flops = train_flops_per_image(model.vit)
    engine = build_engine(model, cfg.optim, cfg.deepspeed, derived, runtime)
    progress, loader_state = resume(engine, out_dir / "checkpoints", world, cfg.checkpoint.resume)
    loader = build_data(cfg.train_data, world, loader_state)
    outcome = train(engine, loader, cfg, derived, world, progress, out_dir, flops, step_fn=finetune_step,
                    hooks=finetune_hooks(cfg.schedule))
    loader.close()
    if world.is_main:  # for schedulers, as jobs/pretrain.py
        (out_dir / "status.json").write_text(json.dumps({"outcome": outcome, "step": progress.step}) + "\n")
    if outcome == "done":
        report(engine, cfg, progress.step, world, out_dir)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


def report(engine, cfg: FinetuneConfig, step: int, world: Dist, out_dir: Path) -> None:
    """Validation top-1 / top-5 of the final weights: terminal (rank 0's log) and OUTPUT_DIR/finetune.json."""
    val = build_data(cfg.val_data, world, None)
    scores = evaluate(engine, val, world.device, cfg.val_data.img_size)
    val.close()
    if world.is_main:
        result = scores | {"step": step, "encoder": cfg.encoder, "num_classes": cfg.head.num_classes}
        (out_dir / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
        log.info("fine-tune: top-1 %.2f %%, top-5 %.2f %% on %d validation images -> %s", scores["top1"],
                 scores["top5"], scores["num_val"], out_dir / "finetune.json")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        logging.getLogger("jobs.finetune").error("config error: %s", e)
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
