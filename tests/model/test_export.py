"""Export to timm's names and shapes (a list written out by hand) and back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model.can import build_model
from model.build import build_model as build_any_model
from model.config import ModelConfig
from model.export import export_encoder, load_encoder
from pipeline.config import AugmentConfig, eval_preprocessing
from tools.export import export_checkpoint
from tools.export import main as export_cli


def timm_vit_tiny_224_keys() -> dict[str, tuple[int, ...]]:
    """timm's vit_tiny_patch16_224 with num_classes=0: 4 + 12 * 12 + 2 = 150 tensors."""
    d, hidden = 192, 768
    keys = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        keys |= {
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,),
        }  # fmt: skip
    keys |= {"norm.weight": (d,), "norm.bias": (d,)}
    return keys


def test_export_has_timms_names_and_shapes(tmp_path):
    model = build_model(ModelConfig(preset="vit_tiny", img_size=224, recipe="mae", decoder_depth=1))
    meta = export_encoder(model.state_dict(), tmp_path / "enc.safetensors")
    tensors = load_file(str(tmp_path / "enc.safetensors"))
    expected = timm_vit_tiny_224_keys()
    assert len(expected) == 150
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert meta == json.loads((tmp_path / "enc.json").read_text())
    assert meta | {"global_pool": None} == {
        "preset": "vit_tiny", "timm_model": "vit_tiny_patch16_224", "img_size": 224, "patch_size": 16,
        "embed_dim": 192, "depth": 12, "num_heads": 3, "global_pool": None,
    }  # fmt: skip


def test_a_preset_timm_lacks_exports_no_timm_name_and_loads_back(tmp_path):
    """vit_micro (ours: vit_tiny at half depth) is inferred from its shapes and has no timm name to mislead with."""
    model = build_model(ModelConfig(preset="vit_micro", img_size=32, patch_size=8, recipe="can", decoder_depth=1))
    meta = export_encoder(model.state_dict(), tmp_path / "enc.safetensors")
    assert (meta["preset"], meta["timm_model"], meta["depth"]) == ("vit_micro", None, 6)
    assert len(load_encoder(tmp_path / "enc.safetensors").blocks) == 6


TINY = ModelConfig(preset="vit_tiny", img_size=16, patch_size=4, recipe="simclr", global_pool="token")


@pytest.mark.parametrize("wrap", ["plain", "module_key", "module_prefix"])
def test_checkpoint_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    state = model.state_dict()
    state = {
        "plain": state,
        "module_key": {"module": state, "step": 7},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(state, tmp_path / "ckpt.pt")
    export_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out" / "enc.safetensors", global_pool="token")
    encoder = load_encoder(tmp_path / "out" / "enc.safetensors")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(x), model.encoder.forward_features(x))
        assert torch.equal(encoder.forward_head(encoder.forward_features(x), pre_logits=True),
                           model.encoder.forward_head(model.encoder.forward_features(x), pre_logits=True))


def test_cli_and_a_bare_encoder_state_dict(tmp_path, capsys):
    model = build_model(TINY)
    torch.save(model.encoder.state_dict(), tmp_path / "enc.pt")
    export_cli([str(tmp_path / "enc.pt"), str(tmp_path / "enc.safetensors"), "--preset", "vit_tiny"])
    assert json.loads(capsys.readouterr().out)["timm_model"] == "vit_tiny_patch4_16"
    assert torch.equal(load_encoder(tmp_path / "enc.safetensors").cls_token, model.encoder.cls_token)


def test_state_dict_without_an_encoder_is_refused(tmp_path):
    with pytest.raises(ValueError):
        export_encoder({"decoder.mask_token": torch.zeros(1, 1, 8)}, tmp_path / "x.safetensors")


MSCN_PREP = eval_preprocessing(AugmentConfig.preset("mscn_simclr"))  # high-pass sigma 5, mean 0, ImageNet std


@pytest.mark.parametrize("backbone", ["vit", "resnet50"])
def test_eval_preprocessing_is_recorded_when_given(tmp_path, backbone):
    cfg = ModelConfig(preset="vit_tiny", img_size=32, patch_size=4, recipe="mscn_simclr", backbone=backbone,
                      resnet_width=8)
    state = build_any_model(cfg).state_dict()  # SiameseModel: the encoder under "encoder."
    meta = export_encoder(state, tmp_path / "enc.safetensors", img_size=32, eval_preprocessing=MSCN_PREP)
    assert meta == json.loads((tmp_path / "enc.json").read_text()) and meta["eval_preprocessing"] == MSCN_PREP
    with safe_open(str(tmp_path / "enc.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["eval_preprocessing"]) == MSCN_PREP
    assert "eval_preprocessing" not in export_encoder(state, tmp_path / "plain.safetensors", img_size=32)


def test_cli_takes_the_preprocessing_from_the_run_config(tmp_path, capsys):
    model = build_model(TINY)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    ckpt = run / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt"
    torch.save({"module": model.state_dict()}, ckpt)
    (run / "resolved.yaml").write_text("data:\n  augment:\n    preset: mscn_byol\n    mscn: {highpass_sigma: 3.0}\n")
    export_cli([str(ckpt), str(tmp_path / "a.safetensors")])  # found beside the checkpoints
    expected = {**MSCN_PREP, "highpass_sigma": 3.0}
    assert json.loads(capsys.readouterr().out)["eval_preprocessing"] == expected
    other = tmp_path / "other.yaml"
    other.write_text("data: {augment: {eval_resize_ratio: 1.0}}\n")  # no mscn: the defaults, resize 1.0
    export_cli([str(ckpt), str(tmp_path / "b.safetensors"), "--run-config", str(other)])
    assert json.loads(capsys.readouterr().out)["eval_preprocessing"] == {
        **eval_preprocessing(AugmentConfig()), "eval_resize_ratio": 1.0}
