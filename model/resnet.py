"""ResNet-50 (He et al. 2016, torchvision's v1.5: stride on the 3x3 conv) without its classifier.

Module names are torchvision's (conv1, bn1, layer1.0.conv1, ..., layer1.0.downsample.0/1, ..., layer4.2.bn3), so a
state_dict loads into torchvision.models.resnet50() with fc = nn.Identity() (or timm's resnet50 with
num_classes=0) unchanged. The interface is the ViT's (timm's): forward_features -> feature map, forward_head
(pre_logits=True) -> globally average-pooled features, num_features wide (2048 for ResNet-50).
"""

from __future__ import annotations

import torch
from torch import nn

RESNET50_LAYERS = (3, 4, 6, 3)  # bottleneck blocks per stage
EXPANSION = 4  # a bottleneck's output is 4x its inner width


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, v1.5) -> 1x1 expand, each followed by BatchNorm; ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        # The projection shortcut exists only where the shape changes (first block of each stage), as in torchvision.
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or in_planes != out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_planes, H, W) -> (N, 4 * planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """Stem (7x7/2 conv, 3x3/2 max-pool) and four bottleneck stages; global average pool; no classifier.

    width: the stem's and first stage's inner width (64 = ResNet-50; smaller values only for fast tests).
    zero_init_residual: start every block's last BN gamma at 0 so each residual block begins as the identity
    (Goyal et al. 2017, "Accurate, large minibatch SGD"; helps large-batch LARS training).
    """

    def __init__(self, layers: tuple[int, ...] = RESNET50_LAYERS, width: int = 64, zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stage = [Bottleneck(in_planes, planes, stride)]
            in_planes = planes * EXPANSION
            stage += [Bottleneck(in_planes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = in_planes  # 2048 for ResNet-50
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool) -> None:
        """torchvision's init: He (fan_out) normal convs, unit-gamma zero-beta BatchNorm."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) normalised -> feature map (N, num_features, H / 32, W / 32) (rounded up per stride)."""
        x = x.to(self.conv1.weight.dtype)  # views arrive in float32; under DeepSpeed bf16 the weights are bf16
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Feature map (N, C, h, w) -> globally average-pooled (N, C). There is no classifier: pre_logits only."""
        if not pre_logits:
            raise ValueError("this ResNet has no classifier; use pre_logits=True (a probe adds its own head)")
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) -> (N, num_features) pooled features."""
        return self.forward_head(self.forward_features(x))


def resnet50(width: int = 64, zero_init_residual: bool = False) -> ResNet:
    return ResNet(RESNET50_LAYERS, width, zero_init_residual)
