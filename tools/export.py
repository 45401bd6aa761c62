"""Export the encoder of a training checkpoint as timm / torchvision compatible safetensors (+ a JSON describing it).

    python -m tools.export CHECKPOINT.pt OUT.safetensors [--preset vit_large] [--global-pool avg]
    python -m tools.export CHECKPOINT.pt OUT.safetensors --img-size 224          # a ResNet-50 run
    python -m tools.export CHECKPOINT.pt OUT.safetensors --run-config runs/mscn/resolved.yaml

The JSON records the eval preprocessing the encoder was trained with ("eval_preprocessing": MSCN's high-pass sigma,
mean / std, eval resize ratio; pipeline.config.eval_preprocessing) when a run config gives it: --run-config, or by
default the resolved.yaml of the run directory the checkpoint lies in (RUN/checkpoints/TAG/FILE). The linear probe
(jobs/linear_probe.py) reads it back. A ResNet's --img-size defaults to the run config's data.img_size.

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
import sys
from pathlib import Path

import torch
import yaml

from model.export import export_encoder
from model.presets import VIT_PRESETS
from pipeline.config import run_eval_preprocessing


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    preset: str | None = None,
    global_pool: str = "avg",
    img_size: int | None = None,
    eval_preprocessing: dict | None = None,
) -> dict:
    """Load a state_dict file and export its encoder to `out`; returns the metadata written beside it.
    eval_preprocessing: recorded in the JSON when given (model.export.export_encoder)."""
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return export_encoder(state_dict, out, preset=preset, global_pool=global_pool, img_size=img_size,
                          eval_preprocessing=eval_preprocessing)


def find_run_config(checkpoint: str | Path) -> Path | None:
    """RUN/resolved.yaml for a checkpoint at RUN/checkpoints/TAG/FILE, when it exists."""
    p = Path(checkpoint).resolve()
    run_config = p.parent.parent.parent / "resolved.yaml"  # jobs.run.prepare_run_dir
    return run_config if p.parent.parent.name == "checkpoints" and run_config.is_file() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a ViT / ResNet-50 encoder to timm / torchvision safetensors.")
    parser.add_argument("checkpoint", help="state_dict file (torch.save), e.g. a DeepSpeed mp_rank_00_model_states.pt")
    parser.add_argument("out", help="output .safetensors path; the JSON goes beside it")
    parser.add_argument("--preset", choices=sorted(VIT_PRESETS), help="default: inferred from width and depth")
    parser.add_argument("--global-pool", choices=("avg", "token"), default="avg", help="ViT only")
    parser.add_argument("--img-size", type=int,
                        help="ResNet: training resolution, recorded in the JSON (default: the run config's)")
    parser.add_argument("--run-config", help="the run's resolved.yaml (or training YAML): its data.augment gives the "
                        "eval preprocessing recorded in the JSON; default: the checkpoint's run directory's, if any")
    args = parser.parse_args(argv)
    run_config_path = Path(args.run_config) if args.run_config else find_run_config(args.checkpoint)
    prep, img_size = None, args.img_size
    if run_config_path is not None:
        run_config = yaml.safe_load(run_config_path.read_text()) or {}
        prep = run_eval_preprocessing(run_config)
        img_size = img_size or (run_config.get("data") or {}).get("img_size")
        print(f"eval preprocessing from {run_config_path}: {prep}", file=sys.stderr)
    meta = export_checkpoint(args.checkpoint, args.out, args.preset, args.global_pool, img_size, prep)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
