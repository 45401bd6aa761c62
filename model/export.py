"""Encoder weights <-> a timm (ViT) or torchvision (ResNet-50) compatible safetensors file plus a JSON that
describes the architecture. export_encoder and load_encoder handle both; the ResNet side is model/export_resnet.py.

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
from torch import nn

from model.export_resnet import export_resnet, is_resnet, load_resnet
from model.presets import VIT_PRESETS, timm_model_name
from model.state_keys import meta_path, unwrap_encoder
from model.vit import VisionTransformer

TIMM_ROOT_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def encoder_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """A CANModel / VisionTransformer state_dict, or a training checkpoint holding one under 'module', ->
    the encoder's tensors under timm's names (float32, CPU, contiguous). Classifier heads are dropped."""
    state = unwrap_encoder(state_dict)
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


def export_encoder(
    state_dict: dict,
    path: str | Path,
    preset: str | None = None,
    global_pool: str = "avg",
    img_size: int | None = None,
    eval_preprocessing: dict | None = None,
) -> dict:
    """Write the encoder in `state_dict` (see encoder_state_dict) to `path` (safetensors) and its JSON beside it.

    A ResNet encoder (recognised by its tensor names) goes to model.export_resnet.export_resnet with img_size (the
    training resolution, which its weights do not record); preset and global_pool apply to the ViT, whose
    img_size comes from its position embedding. global_pool records how features were pooled in training, for
    load_encoder. eval_preprocessing (pipeline.config.eval_preprocessing's dict: highpass_sigma, mean, std,
    eval_resize_ratio) is what evaluation must do to images for this encoder (MSCN's high-pass); recorded under
    that key when given, for the probes. Returns the JSON's content.
    """
    if is_resnet(state_dict):
        return export_resnet(state_dict, path, img_size, eval_preprocessing)
    state = encoder_state_dict(state_dict)
    meta = {**describe_encoder(state, preset), "global_pool": global_pool}
    if eval_preprocessing is not None:
        meta["eval_preprocessing"] = dict(eval_preprocessing)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    meta_path(path).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_encoder(path: str | Path) -> nn.Module:
    """An exported encoder (safetensors + JSON beside it) back as our VisionTransformer (or ResNet), in eval mode."""
    meta = json.loads(meta_path(path).read_text())
    if meta.get("arch", "vit") != "vit":
        return load_resnet(path)
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
