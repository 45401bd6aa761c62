"""Export the encoder of a training checkpoint as timm / torchvision compatible safetensors (+ a JSON describing it).

    python -m tools.export CHECKPOINT.pt OUT.safetensors [--preset vit_large] [--global-pool avg]
    python -m tools.export CHECKPOINT.pt OUT.safetensors --img-size 224          # a ResNet-50 run

CHECKPOINT is a state_dict saved with torch.save (a model's, a bare encoder's, or a DeepSpeed model-states file
holding it under 'module'); it is read with torch.load(weights_only=True). The encoder's kind (ViT or ResNet-50) is
read off its tensor names. Then, for a ViT, in timm:
    timm.create_model(meta["timm_model"], num_classes=0).load_state_dict(safetensors.torch.load_file(OUT))
for a ResNet-50, in torchvision (BatchNorm statistics included, strict):
    net = torchvision.models.resnet50(); net.fc = torch.nn.Identity(); net.load_state_dict(load_file(OUT))
and here: model.export.load_encoder(OUT).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model.export import export_encoder
from model.presets import VIT_PRESETS


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    preset: str | None = None,
    global_pool: str = "avg",
    img_size: int | None = None,
) -> dict:
    """Load a state_dict file and export its encoder to `out`; returns the metadata written beside it."""
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return export_encoder(state_dict, out, preset=preset, global_pool=global_pool, img_size=img_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a ViT / ResNet-50 encoder to timm / torchvision safetensors.")
    parser.add_argument("checkpoint", help="state_dict file (torch.save), e.g. a DeepSpeed mp_rank_00_model_states.pt")
    parser.add_argument("out", help="output .safetensors path; the JSON goes beside it")
    parser.add_argument("--preset", choices=sorted(VIT_PRESETS), help="default: inferred from width and depth")
    parser.add_argument("--global-pool", choices=("avg", "token"), default="avg", help="ViT only")
    parser.add_argument("--img-size", type=int, help="ResNet: training resolution, recorded in the JSON")
    args = parser.parse_args(argv)
    meta = export_checkpoint(args.checkpoint, args.out, args.preset, args.global_pool, args.img_size)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
