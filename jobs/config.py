"""The trainer's typed configuration: one frozen dataclass per concept, composed from a small YAML file.

    cfg = load_config("jobs/configs/demo_cpu.yaml", ["optim.base_lr=1e-3", "model.preset=vit_small"])

YAML sections: model (model.config.ModelConfig), data (pipeline.config.DataConfig), optim, schedule, deepspeed,
logging, checkpoint, monitor, debug, plus top-level output_dir and seed. Every key is checked: an unknown key in the
file or in --set fails with its dotted name. --set values are parsed with yaml.safe_load, so 1e-3, [3, 4] and true
mean what they look like. Derived values (effective lr, steps, micro-batch, accumulation) live in jobs/derived.py.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jobs.errors import ConfigError
from model.config import ModelConfig
from model.presets import VIT_PRESETS
from model.recipes import RECIPES
from pipeline.config import AugmentConfig, DataConfig, data_config_from_dict

# Fields whose value must name an entry of an explicit registry: checked here so the error names the field.
_REGISTRIES: dict[tuple[type, str], dict] = {(ModelConfig, "preset"): VIT_PRESETS, (ModelConfig, "recipe"): RECIPES}


@dataclass(frozen=True)
class OptimConfig:
    """AdamW or LARS with the linear scaling rule (Goyal et al.): peak lr = base_lr * global_batch / lr_base_batch.

    LARS runs (SimCLR, BYOL, MSCN) keep lr_base_batch 256 and write the papers' rule as base_lr: SimCLR's
    0.3 x batch / 256 (4.8 at 4096) is base_lr 0.3, BYOL's 0.2 x batch / 256 (3.2 at 4096) is base_lr 0.2.
    """

    name: Literal["adamw", "lars"] = "adamw"  # lars needs deepspeed.zero_stage 0 (per-tensor trust ratios)
    global_batch: int = 4096  # images per optimizer step, all ranks and accumulation steps together
    base_lr: float = 2.5e-4  # per lr_base_batch images (CAN_SPEC.md; MAE's recipe uses 1.5e-4)
    lr_base_batch: int = 256
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW. MAE's beta2 = 0.95: steadier than 0.999 at large batch
    eps: float = 1e-8  # AdamW
    momentum: float = 0.9  # LARS (SimCLR, BYOL)
    trust_coefficient: float = 1e-3  # LARS eta (SimCLR, BYOL)
    # Not applied to biases, norms, position embeddings, tokens (model.param_groups). AdamW 0.05 (MAE); LARS runs
    # set SimCLR's 1e-6 or BYOL's 1.5e-6.
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # global L2 norm; MAE uses none, CAN_SPEC.md asks for it explicitly. 0 turns it off
    max_nonfinite_in_a_row: int = 5  # skipped (non-finite) steps in a row before the run stops


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warm-up then cosine decay, counted in samples so a change of batch size keeps the curve."""

    total_samples: int = 1_281_167 * 800  # 800 ImageNet-1k epochs' worth of images
    warmup_samples: int = 1_281_167 * 40
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr


@dataclass(frozen=True)
class DeepSpeedConfig:
    """The engine. Production choice for ViT-L on 64 GPUs (README "Engine settings" has the arithmetic): ZeRO 2, bf16
    weights, fp32 gradient accumulation, 50M-element buckets reduced in bf16 during the backward pass, compiled
    blocks."""

    # 2 shards optimizer state and gradients and reduce-scatters gradient buckets while the backward pass runs; 1
    # reduces them after it. 0 = plain data parallel, LARS runs only (AdamW needs ZeRO's non-finite skip).
    zero_stage: Literal[0, 1, 2, 3] = 2
    # auto: bf16 on CUDA, fp32 on CPU (no fast bf16 GEMMs there). bf16 = bf16 weights with fp32 master copies kept
    # by DeepSpeed's optimizer wrapper (flat partitions); amp_bf16 = fp32 weights under torch.autocast(bf16), which
    # leaves the optimizer the model's own tensors (LARS's per-layer trust ratio needs them). auto picks amp_bf16 on
    # CUDA for LARS and for models with BatchNorm (jobs/engine.py says why).
    precision: Literal["auto", "bf16", "amp_bf16", "fp32"] = "auto"
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    # Elements per gradient bucket: 50M (100 MB in bf16) gives a ViT-L's 330M parameters ~7 buckets, the first
    # reduced while most of the backward pass is still to run; larger buckets start later, smaller ones cost latency.
    reduce_bucket_size: int = 50_000_000
    overlap_comm: bool = True  # overlap gradient reduction with backward (ZeRO 2/3)
    # The dtype gradients are summed in across ranks (precision bf16 and amp_bf16). bf16, DeepSpeed's default: ZeRO 2
    # in DeepSpeed 0.19.8 all-reduces each bucket (use_multi_rank_bucket_allreduce), 2 x 0.66 GB per GPU per step
    # for a ViT-L, ~26 ms at 50 GB/s of NDR InfiniBand, inside the ~37 ms backward pass it overlaps at 1,150
    # images/s; fp32 doubles it to ~53 ms, ~21 ms of it exposed per step (README "Engine settings"). fp32 keeps
    # what bf16 rounds away: a ring over 64 ranks rounds the running sum to 8 bits at each of 63 hops, and a rank's
    # gradient below bf16's resolution next to the sum is lost (tests/jobs/test_reduce_dtype.py); Megatron-LM reduces
    # bf16 gradients in fp32 unless told otherwise. Choose fp32 where the network or the backward hides it (one
    # node's NVLink, a larger micro-batch) or where a run's loss misbehaves.
    reduce_dtype: Literal["fp32", "bf16"] = "bf16"
    # torch.compile of each transformer block: auto = on CUDA with ZeRO 0-2 (ZeRO-3's parameter hooks run inside the
    # blocks), off on CPU (a cold compile costs about a minute there and gains nothing).
    compile: Literal["auto", "blocks", "off"] = "auto"


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10  # losses are reduced across ranks and read back only every N steps (a host sync)
    tensorboard: bool = True
    progress: Literal["auto", "on", "off"] = "auto"  # tqdm bar; auto = when stderr is a terminal
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None = the device table (CPU: MFU is null)
    plot: bool = True  # loss-curve PNG at the end of the run


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3  # complete checkpoints kept; older ones are deleted after a newer one is marked complete
    resume: bool = True  # start from the latest complete checkpoint in output_dir when there is one
    export_encoder: bool = True  # encoder.safetensors at the end (tools/export.py)


@dataclass(frozen=True)
class MonitorConfig:
    """Weighted kNN top-1 (jobs/eval/monitor.py) on a small labelled set, logged as knn_top1 by rank 0.

    The shards are read with the training stream's img_size and augment settings in eval mode (centre crop; MSCN's
    high-pass stays on), decoded once at start-up and kept in host memory: keep the sets small (a few thousand).
    """

    knn_every_steps: int = 0  # 0 = off; else a kNN evaluation every N steps (and at the last step)
    knn_memory_shards: str = ""  # labelled shards (KEY.cls) for the memory bank (e.g. a class-balanced train subset)
    knn_query_shards: str = ""  # labelled shards scored against the bank (e.g. a validation subset)
    knn_num_classes: int = 0
    knn_k: int = 20  # DINO's weighted kNN: k = 20, temperature 0.07
    knn_temperature: float = 0.07


@dataclass(frozen=True)
class DebugConfig:
    nan_at_steps: tuple[int, ...] = ()  # rank 0's loss is made NaN at these steps: exercises the skip path
    max_steps: int | None = None  # stop after this step without changing the schedule (tests, benchmarks)
    # rank 0 SIGKILLs itself in the middle of this step's checkpoint save (its files written, not marked complete):
    # what a node failure during a save leaves behind (tests/jobs/test_production_path.py)
    crash_in_save_at_step: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    output_dir: str = "runs/default"
    seed: int = 0


def load_config(path: str | Path, overrides: list[str] = (), cls: type = TrainConfig):
    """YAML file + `key.sub=value` overrides -> cls (TrainConfig, or another job's config such as jobs/finetune.py's).

    Raises ConfigError naming the offending key."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        apply_override(raw, key.strip(), yaml.safe_load(text))
    return build(cls, raw, "")


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    """Set raw['a']['b'] = value for 'a.b', creating sections; key validity is checked later by build()."""
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    node[leaf] = value


def build(cls: type, raw: Any, where: str) -> Any:
    """Recursively build dataclass `cls` from a plain dict, rejecting unknown keys with their dotted path."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {raw!r}")
    check_keys(cls, raw, where)
    if cls is DataConfig:
        return _build_data(raw, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        registry = _REGISTRIES.get((cls, name))
        if registry is not None and value not in registry:
            raise ConfigError(f"{where}{name}: unknown {name} {value!r} (known: {', '.join(sorted(registry))})")
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: invalid {cls.__name__}: {e}") from e


def check_keys(cls: type, raw: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]} (known in {where.rstrip('.') or 'top level'}: "
                          f"{', '.join(sorted(known))})")


def _build_data(raw: dict, where: str) -> DataConfig:
    """DataConfig has its own YAML conventions (augment as preset name or overrides); we only add strict keys."""
    aug = raw.get("augment")
    if isinstance(aug, dict):
        check_keys(AugmentConfig, {k: v for k, v in aug.items() if k != "preset"}, f"{where}augment.")
    try:
        return data_config_from_dict(raw)
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where.rstrip('.')}: invalid DataConfig: {e!r}") from e


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """YAML gives lists where dataclasses want tuples, dicts where they want nested dataclasses, and strings for
    exponents without a dot (YAML 1.1 reads 1e-3 as a string). Literal fields are checked against their values."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where + ".")
    origin = typing.get_origin(hint)
    if origin is typing.Literal and value not in typing.get_args(hint):
        raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(hint)}")
    if hint is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1.28e6 in YAML
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, types.UnionType) and isinstance(value, list):  # e.g. tuple[int, ...] | None
        if any(typing.get_origin(a) is tuple for a in typing.get_args(hint)):
            return tuple(value)
    return value


def to_plain(cfg: Any) -> Any:
    """Dataclasses/tuples -> dicts/lists, for resolved.yaml and logs."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_plain(v) for k, v in cfg.items()}
    return cfg


_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def redact(value: Any) -> Any:
    """storage_options may carry credentials: keep the keys, hide the values."""
    if isinstance(value, dict):
        return {k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v) for k, v in value.items()}
    return value


def dump_yaml(cfg: TrainConfig, extra: dict[str, Any] | None = None) -> str:
    """The resolved config as YAML (credentials in data.storage_options redacted)."""
    doc = to_plain(cfg)
    doc["data"]["storage_options"] = redact(doc["data"]["storage_options"])
    if extra:
        doc["derived"] = extra
    return yaml.safe_dump(doc, sort_keys=False)
