"""Analytic forward FLOPs of our ResNet (model/resnet.py): 2 x the multiply-adds of its convolutions.

BatchNorm, ReLU, the max-pool, the residual sums and the average pool are elementwise and left out, as in the
usual accounting (torchvision lists ResNet-50 at 224 px as 4.09 G multiply-adds, its 2 M-MAC classifier included).
"""

from __future__ import annotations

from model.resnet import EXPANSION, RESNET50_LAYERS


def conv_flops(side: int, c_in: int, c_out: int, kernel: int) -> float:
    """A square conv producing a side x side map: 2 * side^2 * k^2 * c_in * c_out."""
    return 2 * side**2 * kernel**2 * c_in * c_out


def downsampled(side: int) -> int:
    """Output side of every stride-2 layer here (7x7/2 pad 3, 3x3/2 pad 1, 1x1/2 pad 0): ceil(side / 2)."""
    return (side + 1) // 2


def resnet_forward_flops(img_size: int, width: int = 64, layers: tuple[int, ...] = RESNET50_LAYERS) -> float:
    """Forward FLOPs of one (img_size x img_size) image through the backbone, up to the pooled features."""
    side = downsampled(img_size)
    flops = conv_flops(side, 3, width, 7)  # stem conv
    side = downsampled(side)  # max-pool
    in_planes = width
    for i, blocks in enumerate(layers):
        planes = width * 2**i
        for j in range(blocks):
            out_side = downsampled(side) if (i > 0 and j == 0) else side
            flops += conv_flops(side, in_planes, planes, 1)  # reduce, at the input resolution
            flops += conv_flops(out_side, planes, planes, 3)  # the stride sits here (v1.5)
            flops += conv_flops(out_side, planes, planes * EXPANSION, 1)  # expand
            if j == 0:
                flops += conv_flops(out_side, in_planes, planes * EXPANSION, 1)  # projection shortcut
            in_planes, side = planes * EXPANSION, out_side
    return flops
