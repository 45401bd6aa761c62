"""Config loading: strict keys, --set parsing, derived values, start-up checks that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import TrainConfig, dump_yaml, load_config
from jobs.derived import derive
from jobs.errors import ConfigError
from jobs.validate import check_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


# finetune_*.yaml are jobs/finetune.py's configs (another schema); every other file is a pre-training config.
PRETRAIN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("finetune_"))
FINETUNE_CONFIGS = sorted(CONFIGS.glob("finetune_*.yaml"))


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_builds_its_model_and_engine_settings(path):
    """What the cluster would build first, on CPU: the config, its model at full size on the meta device (no memory),
    the runtime it resolves to on CUDA (precision, compile), the optimizer over the model's groups, and DeepSpeed's own
    parse of the engine config. A wrong key, a refused combination or a DeepSpeed rejection fails here."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig as DeepSpeedJSON

    from jobs.engine import build_optimizer, deepspeed_config, resolve_runtime
    from jobs.pretrain import derived_values
    from jobs.validate import check_engine, check_model_data_agreement
    from model.build import build_model

    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    check_model_data_agreement(cfg)
    check_engine(cfg)
    with torch.device("meta"):
        model = build_model(cfg.model)
    runtime = resolve_runtime(cfg.deepspeed, cfg.optim.name, model, on_cuda=True)
    assert runtime.precision in ("bf16", "amp_bf16", "fp32")
    build_optimizer(model.param_groups(cfg.optim.weight_decay), cfg.optim)
    derived = derived_values(cfg, world_size=1)
    ds = DeepSpeedJSON(deepspeed_config(cfg.deepspeed, derived, cfg.optim.grad_clip, runtime.precision))
    assert ds.train_batch_size == cfg.optim.global_batch and ds.zero_optimization_stage == cfg.deepspeed.zero_stage
    text = path.read_text()
    assert text.splitlines()[0].startswith("#"), "each config starts with a header comment"
    assert "command:" in text and "run time:" in text and "hardware:" in text


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_finetune_config_loads(path):
    from jobs.finetune_config import FinetuneConfig, load_finetune_config

    assert isinstance(load_finetune_config(path), FinetuneConfig)
    text = path.read_text()
    assert text.startswith("#") and "command:" in text and "run time:" in text and "hardware:" in text


def test_production_config_matches_the_spec():
    cfg = load_config(CONFIGS / "can_vit_large.yaml")
    d = derive(cfg.optim.global_batch, cfg.data.batch_size, 64, cfg.optim.base_lr, cfg.optim.lr_base_batch,
               cfg.schedule.total_samples, cfg.schedule.warmup_samples)
    assert (cfg.model.preset, cfg.model.recipe, cfg.optim.global_batch) == ("vit_large", "can", 4096)
    assert d.peak_lr == pytest.approx(2.5e-4 * 4096 / 256)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.precision == "bf16"
    assert cfg.deepspeed.reduce_bucket_size == 50_000_000 and cfg.deepspeed.compile == "auto"
    assert load_config(CONFIGS / "mae_vit_large.yaml").optim.base_lr == 1.5e-4


def test_set_overrides_parse_yaml_values_and_dotted_keys():
    cfg = load_config(CONFIGS / "test_cpu.yaml", ["optim.base_lr=1e-3", "debug.nan_at_steps=[3, 4]",
                                                  "model.preset=vit_small", "optim.betas=[0.9, 0.99]",
                                                  "logging.tensorboard=false"])
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.base_lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.debug.nan_at_steps == (3, 4)
    assert cfg.model.preset == "vit_small"
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.logging.tensorboard is False


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1", "optim.lrr"),
    ("data.bogus=1", "data.bogus"),
    ("data.augment.brightnes=0.1", "data.augment.brightnes"),
    ("nope.x=1", "nope"),
    ("model.preset=vit_gigantic", "model.preset"),
    ("model.recipe=byol", "model.recipe"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("optim.global_batch=many", "optim.global_batch"),
])
def test_bad_keys_and_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(CONFIGS / "test_cpu.yaml", [override])


def test_unknown_key_in_yaml_file_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((CONFIGS / "test_cpu.yaml").read_text() + "\ncheckpoint_every: 3\n")
    with pytest.raises(ConfigError, match="unknown key checkpoint_every"):
        load_config(path)


def test_batch_split_and_effective_lr():
    d = derive(4096, 64, 16, 2.5e-4, 256, 4096 * 100, 4096 * 10)
    assert (d.grad_accum, d.peak_lr, d.total_steps, d.warmup_steps) == (4, 4e-3, 100, 10)
    with pytest.raises(ConfigError, match=r"optim\.global_batch: 100 is not divisible by .* 2 x 16 = 32"):
        derive(100, 16, 2, 1e-4, 256, 1000, 10)


def test_model_and_data_must_agree():
    cfg = load_config(CONFIGS / "test_cpu.yaml", ["data.img_size=64"])
    with pytest.raises(ConfigError, match=r"data\.img_size: 64 differs from model\.img_size 32"):
        check_config(cfg)
    cfg = load_config(CONFIGS / "test_cpu.yaml", ["model.recipe=mae"])
    with pytest.raises(ConfigError, match=r"data\.num_views: 2, but recipe 'mae' uses 1"):
        check_config(cfg)


def test_missing_data_url_is_named(s3_bucket):
    cfg = load_config(CONFIGS / "test_cpu.yaml", [f"data.shards={s3_bucket}/missing/shard-{{000000..000003}}.tar"])
    with pytest.raises(ConfigError, match=rf"data\.shards: {s3_bucket}/missing/shard-000000\.tar not found"):
        check_config(cfg)
    cfg = load_config(CONFIGS / "test_cpu.yaml", ["data.shards=s3://no-such-bucket-xyz/shards/"])
    with pytest.raises(ConfigError, match=r"data\.shards: s3://no-such-bucket-xyz/shards/"):
        check_config(cfg)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "test_cpu.yaml", ["optim.base_lr=2e-3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_resolved_yaml_hides_credentials():
    cfg = load_config(CONFIGS / "test_cpu.yaml", ["data.storage_options={key: AKIA123, secret: s3cr3t, "
                                                  "client_kwargs: {region_name: us-east-1}}"])
    text = dump_yaml(cfg)
    assert "AKIA123" not in text and "s3cr3t" not in text and "us-east-1" in text
