"""Find and load the frozen encoder to evaluate, from any of the three things a user has at hand:

    runs/can_vit_large/                         a training run directory: its latest complete checkpoint
    runs/can_vit_large/checkpoints/step_00001000   one checkpoint tag (or its mp_rank_00_model_states.pt)
    runs/can_vit_large/encoder.safetensors      an encoder exported by tools/export.py (JSON beside it)

The encoder is a ViT or a ResNet (MSCN runs), told apart by its tensor names. Besides the weights, the source knows
what evaluation must do to images for this encoder (`eval_preprocessing`: MSCN's high-pass, mean / std, resize
ratio): from the export's JSON, else from the training run's resolved.yaml (data.augment), else the defaults.

All weights are read with weights_only loading (no pickled code runs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from jobs import checkpoint
from model.export import describe_encoder, encoder_state_dict, load_encoder
from model.export_resnet import is_resnet, resnet_from_state_dict
from model.state_keys import meta_path
from model.vit import VisionTransformer
from pipeline.config import run_eval_preprocessing

MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file holding the full module state_dict (ZeRO 0-2)
RUN_CONFIG = "resolved.yaml"  # written into every run directory by jobs.run.prepare_run_dir


@dataclass(frozen=True)
class EncoderSource:
    """A resolved weights file: `kind` is "safetensors", "checkpoint" (a state_dict file: ZeRO 0-2's whole module) or
    "zero3" (a ZeRO-3 checkpoint tag directory, gathered from its partitions); `preset` None = inferred from shapes;
    `run_dir` the training run directory whose resolved.yaml describes it (None = not known)."""

    path: Path
    kind: str
    preset: str | None = None
    run_dir: Path | None = None

    def fingerprint(self) -> dict:
        """Identifies these weights for the feature cache without loading them (path, size, modification time)."""
        st = os.stat(self.path)
        return {"path": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def export_meta(self) -> dict:
        """The export's JSON (model.export), or {} for a checkpoint or an export without one."""
        p = meta_path(self.path)
        return json.loads(p.read_text()) if self.kind == "safetensors" and p.is_file() else {}

    def run_config(self) -> dict:
        """The run's resolved.yaml as plain values, or {} when there is none."""
        return read_run_config(self.run_dir) if self.run_dir is not None else {}

    def eval_preprocessing(self) -> tuple[dict | None, str]:
        """(what evaluation does to images for this encoder, where that was read) - pipeline.config.eval_preprocessing's
        dict, or None for the defaults when nothing records it (the CAN / MAE / SimCLR exports of before)."""
        recorded = self.export_meta().get("eval_preprocessing")
        if recorded is not None:
            return recorded, str(meta_path(self.path))
        prep = run_eval_preprocessing(self.run_config())
        if prep is not None:
            return prep, str(self.run_dir / RUN_CONFIG)
        return None, "defaults (nothing recorded)"

    def img_size(self) -> int | None:
        """The training resolution when something records it: the export's JSON, else the run's data.img_size."""
        size = self.export_meta().get("img_size")
        if size is None:
            cfg = self.run_config()
            size = (cfg.get("data") or {}).get("img_size") or (cfg.get("model") or {}).get("img_size")
        return int(size) if size is not None else None


def read_run_config(run_dir: str | Path) -> dict:
    resolved = Path(run_dir) / RUN_CONFIG
    return (yaml.safe_load(resolved.read_text()) or {}) if resolved.is_file() else {}


def _run_preset(run_dir: Path) -> str | None:
    return (read_run_config(run_dir).get("model") or {}).get("preset")


def _run_dir(p: Path) -> Path | None:
    return p if (p / RUN_CONFIG).is_file() else None


def resolve_source(path: str | Path) -> EncoderSource:
    """Map a run directory, checkpoint tag directory, state_dict file or .safetensors file to its weights file."""
    p = Path(path)
    if p.suffix == ".safetensors":  # pretrain.py writes RUN/encoder.safetensors beside RUN/resolved.yaml
        return EncoderSource(p, "safetensors", run_dir=_run_dir(p.parent))
    if p.is_file():  # RUN/checkpoints/TAG/FILE or a loose state_dict
        run = _run_dir(p.parent.parent.parent) if p.parent.parent.name == "checkpoints" else None
        return EncoderSource(p, "checkpoint", _run_preset(run) if run else None, run)
    if (p / "checkpoints").is_dir():  # a run directory: its newest complete checkpoint
        tag = checkpoint.find_latest(p / "checkpoints")
        if tag is None:
            raise FileNotFoundError(f"{p}: no complete checkpoint under {p / 'checkpoints'}")
        p = p / "checkpoints" / tag
    run = p.parent.parent
    if (p / MODEL_STATES).is_file():  # a tag directory
        return EncoderSource(p / MODEL_STATES, "checkpoint", _run_preset(run), _run_dir(run))
    if (p / checkpoint.ZERO3_MODEL_STATES).is_file():  # a ZeRO-3 tag: partitions only
        return EncoderSource(p, "zero3", _run_preset(run), _run_dir(run))
    raise FileNotFoundError(f"{p}: not a run directory, checkpoint or exported encoder")


def load_source(src: EncoderSource, global_pool: str = "avg") -> nn.Module:
    """The encoder (VisionTransformer or ResNet) in eval mode, on CPU. global_pool: how the ViT pools its tokens
    in forward_head; a ResNet has global average pooling only ("avg")."""
    if src.kind == "safetensors":
        encoder = load_encoder(src.path)
    else:
        if src.kind == "zero3":
            raw = checkpoint.zero3_module_state(src.path)
        else:
            with torch.serialization.safe_globals(checkpoint._safe_globals()):
                raw = torch.load(src.path, map_location="cpu", weights_only=True)
        if is_resnet(raw):
            encoder = resnet_from_state_dict(raw)
        else:
            state = encoder_state_dict(raw)
            meta = describe_encoder(state, src.preset)
            encoder = VisionTransformer(
                img_size=meta["img_size"], patch_size=meta["patch_size"], embed_dim=meta["embed_dim"],
                depth=meta["depth"], num_heads=meta["num_heads"],
            )
            encoder.load_state_dict(state)
    if isinstance(encoder, VisionTransformer):
        encoder.global_pool = global_pool
    elif global_pool != "avg":
        raise ValueError(f"{src.path}: a {type(encoder).__name__} has global average pooling only, not {global_pool!r}")
    return encoder.eval()
