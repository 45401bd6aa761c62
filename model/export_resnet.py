"""ResNet-50 encoder weights <-> safetensors under torchvision's names, plus a JSON describing it.

Our ResNet already uses torchvision's names, so export keeps the backbone's tensors (BatchNorm running statistics
and num_batches_tracked included) as they are. In torchvision:
    net = torchvision.models.resnet50(); net.fc = torch.nn.Identity()
    net.load_state_dict(safetensors.torch.load_file(path))        # strict: 318 tensors = 320 minus fc.weight/bias
timm's resnet50(num_classes=0) uses the same names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.resnet import RESNET50_LAYERS, ResNet
from model.state_keys import meta_path, unwrap_encoder

RESNET_ROOT_KEYS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


def is_resnet(state_dict: dict) -> bool:
    """Whether the encoder in this state_dict (any wrapping model.state_keys.unwrap_encoder accepts) is a ResNet."""
    return "conv1.weight" in unwrap_encoder(state_dict)


def resnet_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """The backbone's tensors under torchvision's names: floating ones float32, integer counters kept int64; CPU,
    contiguous. A classifier (fc.*) and the model's other modules are dropped."""
    state = unwrap_encoder(state_dict)
    if "conv1.weight" not in state:
        raise ValueError("no ResNet encoder found in this state_dict (expected 'encoder.conv1.weight')")
    out = {}
    for k, v in state.items():
        if k.startswith(RESNET_ROOT_KEYS):
            v = v.detach().to("cpu")
            out[k] = (v.float() if v.is_floating_point() else v).contiguous()
    return out


def describe_resnet(state: dict[str, torch.Tensor], img_size: int | None) -> dict:
    """Architecture read off the tensors; img_size (the training resolution) is not in them and is passed in."""
    width = state["conv1.weight"].shape[0]
    layers = [1 + max(int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")) for i in range(1, 5)]
    if tuple(layers) != RESNET50_LAYERS:
        raise ValueError(f"blocks per stage {layers} are not ResNet-50's {list(RESNET50_LAYERS)}")
    standard = "resnet50" if width == 64 else None  # torchvision / timm have no narrower ResNet-50
    return {
        "arch": "resnet50",
        "torchvision_model": standard,
        "timm_model": standard,
        "img_size": img_size,
        "width": width,
        "layers": layers,
        "num_features": width * 32,
        "global_pool": "avg",
    }


def export_resnet(
    state_dict: dict, path: str | Path, img_size: int | None = None, eval_preprocessing: dict | None = None
) -> dict:
    """Write the ResNet in `state_dict` to `path` (safetensors) and its JSON beside it; returns the JSON's content.

    eval_preprocessing (model.export.export_encoder) is recorded under that key when given."""
    state = resnet_state_dict(state_dict)
    meta = describe_resnet(state, img_size)
    if eval_preprocessing is not None:
        meta["eval_preprocessing"] = dict(eval_preprocessing)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    meta_path(path).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_resnet(path: str | Path) -> ResNet:
    """An exported ResNet (safetensors + JSON beside it) back as our ResNet, in eval mode, loaded strictly."""
    meta = json.loads(meta_path(path).read_text())
    net = ResNet(tuple(meta["layers"]), meta["width"])
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def resnet_from_state_dict(state_dict: dict) -> ResNet:
    """The ResNet in a training state_dict (see resnet_state_dict: a SiameseModel's / BYOLModel's online
    `encoder.`, any wrapping) built to its shape and loaded strictly, in eval mode."""
    state = resnet_state_dict(state_dict)
    meta = describe_resnet(state, None)
    net = ResNet(tuple(meta["layers"]), meta["width"])
    net.load_state_dict(state)
    return net.eval()
