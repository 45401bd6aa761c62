"""Finding an encoder's tensors in whatever state_dict a run wrote (bare, DDP / DeepSpeed / compile wrapped)."""

from __future__ import annotations

from pathlib import Path

import torch

ENCODER_PREFIX = "encoder."
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DeepSpeed and torch.compile wrappers


def strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """Remove any sequence of the prefixes from the front of key ('module._orig_mod.x' -> 'x')."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def unwrap_encoder(state_dict: dict) -> dict[str, torch.Tensor]:
    """A model's state_dict, a bare encoder's, or a training checkpoint holding one under 'module' -> the encoder's
    entries under the encoder's own names (wrapper prefixes and 'encoder.' removed). Other modules' entries (a
    BYOL target_encoder, projectors, decoder) are dropped when an 'encoder.' prefix is present; a bare encoder's
    state_dict passes through."""
    if isinstance(state_dict.get("module"), dict):
        state_dict = state_dict["module"]
    state = {strip_prefixes(k, WRAPPER_PREFIXES): v for k, v in state_dict.items()}
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        state = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    return state


def meta_path(path: str | Path) -> Path:
    """The JSON beside a weights file: encoder.safetensors -> encoder.json."""
    return Path(path).with_suffix(".json")
