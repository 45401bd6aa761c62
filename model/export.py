"""Encoder weights <-> a timm-compatible safetensors file plus a JSON that describes the architecture.

Our VisionTransformer already uses timm's parameter names, so export only strips wrapper prefixes ('module.',
'encoder.') and keeps the encoder's tensors: timm.create_model("vit_large_patch16_224", num_classes=0)
.load_state_dict(safetensors.torch.load_file(path)) then loads it strictly (timm's default global_pool="token"
keeps the final `norm`; pool the patch tokens yourself for the mean-pooled features CAN is probed with).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.presets import VIT_PRESETS, timm_model_name
from model.vit import VisionTransformer

ENCODER_PREFIX = "encoder."
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DeepSpeed and torch.compile wrappers
TIMM_ROOT_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def encoder_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """A CANModel / VisionTransformer state_dict, or a training checkpoint holding one under 'module', ->
    the encoder's tensors under timm's names (float32, CPU, contiguous). Classifier heads are dropped."""
    if isinstance(state_dict.get("module"), dict):
        state_dict = state_dict["module"]
    state = {_strip(k, WRAPPER_PREFIXES): v for k, v in state_dict.items()}
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        state = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    keep = [k for k in state if k.startswith(TIMM_ROOT_KEYS)]
    out = {k: state[k].detach().to("cpu", torch.float32).contiguous() for k in keep}
    if "cls_token" not in out or "patch_embed.proj.weight" not in out:
        raise ValueError("no ViT encoder found in this state_dict (expected 'encoder.cls_token' or 'cls_token')")
    return out


def describe_encoder(state: dict[str, torch.Tensor], preset: str | None = None) -> dict:
    """Architecture read off the tensor shapes; the head count (not in any shape) comes from the matching preset."""
    embed_dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    if preset is None:
        matches = [n for n, p in VIT_PRESETS.items() if (p.embed_dim, p.depth) == (embed_dim, depth)]
        if len(matches) != 1:
            raise ValueError(f"no unique preset has width {embed_dim} and depth {depth}; pass preset=")
        preset = matches[0]
    p = VIT_PRESETS[preset]
    if (p.embed_dim, p.depth) != (embed_dim, depth):
        raise ValueError(f"weights are {embed_dim} wide and {depth} deep, preset {preset} is not")
    img_size = grid * patch_size
    return {
        "preset": preset,
        "timm_model": timm_model_name(preset, patch_size, img_size),
        "img_size": img_size,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": p.num_heads,
    }


def meta_path(path: str | Path) -> Path:
    """The JSON beside a weights file: encoder.safetensors -> encoder.json."""
    return Path(path).with_suffix(".json")


def export_encoder(state_dict: dict, path: str | Path, preset: str | None = None, global_pool: str = "avg") -> dict:
    """Write the encoder in `state_dict` (see encoder_state_dict) to `path` (safetensors) and its JSON beside it.

    global_pool records how features were pooled in training, for load_encoder. Returns the JSON's content.
    """
    state = encoder_state_dict(state_dict)
    meta = {**describe_encoder(state, preset), "global_pool": global_pool}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={k: str(v) for k, v in meta.items()})
    meta_path(path).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_encoder(path: str | Path) -> VisionTransformer:
    """An exported encoder (safetensors + JSON beside it) back as our VisionTransformer, in eval mode."""
    meta = json.loads(meta_path(path).read_text())
    encoder = VisionTransformer(
        img_size=meta["img_size"],
        patch_size=meta["patch_size"],
        embed_dim=meta["embed_dim"],
        depth=meta["depth"],
        num_heads=meta["num_heads"],
        global_pool=meta.get("global_pool", "avg"),
    )
    encoder.load_state_dict(load_file(str(path)))
    return encoder.eval()
