"""jobs/finetune.py end to end on CPU: real shards and loaders, an exported encoder, DeepSpeed on one rank.

Fine-tuning vs probing: the encoder is a *collapsed* one (final LayerNorm gain and bias 0, the constant representation
a failed self-supervised run ends in), on the three colour classes of tests/eval/conftest.py. Its frozen features are
the same for every image, so a linear probe is at chance whatever it does; fine-tuning trains the encoder and reaches
the colours. (A from-scratch spatial task where a random ViT is weak, e.g. "which quadrant holds the square", was
tried first: 36-96 fine-tune steps on 2 CPU cores learn nothing that generalises, so it could not be a stable test.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs.eval.finetune_model import Classifier, set_layer_lrs
from jobs.eval.probe import ProbeConfig
from jobs.launch import Dist
from jobs.linear_probe import LinearProbeConfig, linear_probe
from jobs.plots import read_metrics
from model.export import export_encoder
from model.vit import vit_from_preset

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "finetune_test_cpu.yaml"
STEPS = 18  # 6 epochs of 48 images at batch 16 (finetune_test_cpu.yaml)


@pytest.fixture(scope="module")
def collapsed_encoder(tmp_path_factory) -> Path:
    """vit_tiny at 16 px, patch 4, random blocks, final LayerNorm gain and bias zeroed: every image maps to 0."""
    torch.manual_seed(0)
    vit = vit_from_preset("vit_tiny", img_size=16, patch_size=4)
    with torch.no_grad():
        vit.norm.weight.zero_()
        vit.norm.bias.zero_()
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    export_encoder(vit.state_dict(), path, preset="vit_tiny")
    return path


class Finetune:
    def __init__(self, encoder: Path, shards: dict[str, str]):
        self.sets = [f"encoder={encoder}", f"train_data.shards={shards['train']}", f"val_data.shards={shards['val']}"]
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def start(self, out: Path) -> tuple[subprocess.Popen, Path]:
        out.mkdir(parents=True, exist_ok=True)
        log = out / f"launch-{len(list(out.glob('launch-*.log'))) + 1}.log"
        args = [a for s in [*self.sets, f"output_dir={out}"] for a in ("--set", s)]
        proc = subprocess.Popen([sys.executable, "jobs/finetune.py", "--config", str(CONFIG), *args], cwd=REPO,
                                env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log

    def run(self, out: Path) -> str:
        proc, log = self.start(out)
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"fine-tune did not finish in 300 s:\n{log.read_text()[-3000:]}")
        assert code == 0, log.read_text()[-3000:]
        return log.read_text()


@pytest.fixture(scope="module")
def runner(collapsed_encoder, colour_shards) -> Finetune:
    return Finetune(collapsed_encoder, colour_shards)


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory) -> Path:
    """One uninterrupted fine-tune run."""
    out = tmp_path_factory.mktemp("ft_ref")
    runner.run(out)
    return out


def test_finetune_beats_the_linear_probe_of_the_same_encoder(reference, collapsed_encoder, colour_shards, tmp_path):
    result = json.loads((reference / "finetune.json").read_text())
    assert result["num_val"] == 24 and result["step"] == STEPS
    probe = linear_probe(LinearProbeConfig(encoder=str(collapsed_encoder), train_shards=colour_shards["train"],
                                           val_shards=colour_shards["val"], output=str(tmp_path / "probe.json"),
                                           batch_size=16, workers=1, num_classes=3,
                                           probe=ProbeConfig(epochs=30, warmup_epochs=3, batch_size=16)),
                         Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert probe["top1"] <= 50.0, probe  # constant features: at most the majority class of 24 images
    assert result["top1"] >= 90.0 and result["top1"] >= probe["top1"] + 40, (result, probe)
    assert result["top5"] == 100.0  # 3 classes


def test_metrics_and_schedule(reference):
    records = read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    peak = 0.1 * 16 / 256
    lrs = [r["lr"] for r in records]  # warm-up (1 epoch = 3 steps) from 0, then cosine down
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(peak) and lrs[-1] < 0.02 * peak
    assert records[-1]["loss"] < records[0]["loss"] - 0.2
    resolved = (reference / "resolved.yaml").read_text()
    assert "layer_decay: 0.75" in resolved and "label_smoothing: 0.1" in resolved and "drop_path: 0.1" in resolved


def test_sigterm_then_rerun_resumes_and_matches_the_uninterrupted_run(runner, reference, tmp_path):
    proc, log = runner.start(tmp_path)
    latest, deadline = tmp_path / "checkpoints" / "latest", time.monotonic() + 300
    while not latest.is_file():  # the step-6 checkpoint
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["outcome"] == "preempted" and 6 <= status["step"] < STEPS, status
    assert latest.read_text().strip() == f"step_{status['step']:08d}"  # saved at the step boundary after the signal

    resumed_log = runner.run(tmp_path)
    assert f"resumed from step_{status['step']:08d}: step {status['step']}" in resumed_log
    ref, res = read_metrics(reference / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in res] == list(range(1, STEPS + 1))
    for a, b in zip(ref, res):  # loader, drop path and optimizer state all restored: the same run
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), (a["step"], a["loss"], b["loss"])
    assert json.loads((tmp_path / "finetune.json").read_text())["top1"] == \
        json.loads((reference / "finetune.json").read_text())["top1"]


def test_each_block_gets_lr_times_decay_to_the_depth_minus_its_index():
    depth, lr = 12, 1e-3
    model = Classifier(vit_from_preset("vit_tiny", img_size=16, patch_size=4, num_classes=3), 0.75, 0.1)
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=0.0)
    set_layer_lrs(optimizer, lr)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.vit.named_parameters():
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            assert lr_of[id(p)] == pytest.approx(lr * 0.75 ** (depth - i)), name
    assert lr_of[id(model.vit.head.weight)] == lr and lr_of[id(model.vit.norm.weight)] == lr
    assert lr_of[id(model.vit.patch_embed.proj.weight)] == pytest.approx(lr * 0.75 ** (depth + 1))
