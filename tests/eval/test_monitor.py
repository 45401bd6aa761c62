"""KNNMonitor: loads a labelled set once through the eval loader and scores an encoder with weighted kNN."""

import torch

from jobs.eval.monitor import KNNMonitor, LabelledImages
from model.resnet import resnet50
from model.vit import vit_from_preset
from pipeline.config import DataConfig


def _cfg(shards: str) -> DataConfig:
    return DataConfig(shards=shards, mode="eval", batch_size=16, img_size=32, patch_size=4, num_views=1, workers=1,
                      device="cpu")


def test_monitor_scores_colour_classes(colour_shards):
    monitor = KNNMonitor.from_data(_cfg(colour_shards["train"]), _cfg(colour_shards["val"]), num_classes=3, k=5)
    assert monitor.memory.images.shape == (48, 3, 32, 32) and monitor.queries.labels.shape == (24,)
    torch.manual_seed(0)
    encoder = vit_from_preset("vit_tiny", img_size=32, patch_size=4).train()
    out = monitor(encoder)
    assert set(out) == {"knn_top1"}
    assert out["knn_top1"] >= 90.0  # colour alone decides the class
    assert encoder.training  # the trainer's mode is restored


def test_monitor_scores_a_resnet_with_its_default_pooling(colour_shards):
    """MSCN runs monitor a ResNet: its (N, C, h, w) map is globally averaged (forward_head), not token-pooled."""
    monitor = KNNMonitor.from_data(_cfg(colour_shards["train"]), _cfg(colour_shards["val"]), num_classes=3, k=5)
    torch.manual_seed(0)
    encoder = resnet50(width=8).train()
    assert monitor._embed(encoder.eval(), monitor.queries.images).shape == (24, 256)
    encoder.train()
    assert monitor(encoder)["knn_top1"] >= 90.0
    assert encoder.training


def test_monitor_is_at_chance_when_labels_carry_no_signal():
    torch.manual_seed(0)
    images = torch.randn(40, 3, 32, 32)
    # memory labels alternate, queries are the same images with the opposite label: every vote is wrong
    memory = LabelledImages(images, torch.arange(40) % 2)
    queries = LabelledImages(images, 1 - torch.arange(40) % 2)
    encoder = vit_from_preset("vit_tiny", img_size=32, patch_size=4)
    assert KNNMonitor(memory, queries, num_classes=2, k=1)(encoder)["knn_top1"] == 0.0
