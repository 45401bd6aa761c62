"""Find and load the frozen encoder to evaluate, from any of the three things a user has at hand:

    runs/can_vit_large/                         a training run directory: its latest complete checkpoint
    runs/can_vit_large/checkpoints/step_00001000   one checkpoint tag (or its mp_rank_00_model_states.pt)
    runs/can_vit_large/encoder.safetensors      an encoder exported by tools/export.py (JSON beside it)

All weights are read with weights_only loading (no pickled code runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from jobs import checkpoint
from model.export import describe_encoder, encoder_state_dict, load_encoder
from model.vit import VisionTransformer

MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file holding the full module state_dict (ZeRO 0-2)


@dataclass(frozen=True)
class EncoderSource:
    """A resolved weights file: `kind` is "safetensors" or "checkpoint"; `preset` None = inferred from shapes."""

    path: Path
    kind: str
    preset: str | None = None

    def fingerprint(self) -> dict:
        """Identifies these weights for the feature cache without loading them (path, size, modification time)."""
        st = os.stat(self.path)
        return {"path": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _run_preset(run_dir: Path) -> str | None:
    resolved = run_dir / "resolved.yaml"
    if not resolved.is_file():
        return None
    return (yaml.safe_load(resolved.read_text()) or {}).get("model", {}).get("preset")


def resolve_source(path: str | Path) -> EncoderSource:
    """Map a run directory, checkpoint tag directory, state_dict file or .safetensors file to its weights file."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return EncoderSource(p, "safetensors")
    if p.is_file():
        return EncoderSource(p, "checkpoint")
    if (p / "checkpoints").is_dir():  # a run directory: its newest complete checkpoint
        tag = checkpoint.find_latest(p / "checkpoints")
        if tag is None:
            raise FileNotFoundError(f"{p}: no complete checkpoint under {p / 'checkpoints'}")
        return EncoderSource(p / "checkpoints" / tag / MODEL_STATES, "checkpoint", _run_preset(p))
    if (p / MODEL_STATES).is_file():  # a tag directory
        return EncoderSource(p / MODEL_STATES, "checkpoint", _run_preset(p.parent.parent))
    raise FileNotFoundError(f"{p}: not a run directory, checkpoint or exported encoder")


def load_source(src: EncoderSource, global_pool: str = "avg") -> VisionTransformer:
    """The encoder in eval mode, on CPU."""
    if src.kind == "safetensors":
        encoder = load_encoder(src.path)
        encoder.global_pool = global_pool
        return encoder
    with torch.serialization.safe_globals(checkpoint._safe_globals()):
        raw = torch.load(src.path, map_location="cpu", weights_only=True)
    state = encoder_state_dict(raw)
    meta = describe_encoder(state, src.preset)
    encoder = VisionTransformer(
        img_size=meta["img_size"], patch_size=meta["patch_size"], embed_dim=meta["embed_dim"], depth=meta["depth"],
        num_heads=meta["num_heads"], global_pool=global_pool,
    )
    encoder.load_state_dict(state)
    return encoder.eval()
