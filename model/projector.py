"""The contrastive projector: an MLP from pooled encoder features to the InfoNCE embedding space (SimCLR)."""

from __future__ import annotations

from torch import nn

from model.block import init_weights


def build_projector(
    in_dim: int, hidden_dim: int, out_dim: int, depth: int = 2, batchnorm: bool = False, out_batchnorm: bool = False
) -> nn.Module:
    """(N, in_dim) -> (N, out_dim): `depth` Linear layers, ReLU (after BatchNorm, if asked) between them.

    The CAN authors' port uses Linear(D, D) -> ReLU -> Linear(D, 128): depth 2, hidden D, no BatchNorm. SimCLR's
    head (as MSCN uses it) also normalises the output: out_batchnorm. BYOL's projector and predictor do not. With
    BatchNorm under data parallelism, convert to SyncBatchNorm (model.distributed.convert_sync_batchnorm).
    """
    if depth < 1:
        raise ValueError(f"projector depth must be >= 1, got {depth}")
    dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < depth - 1:
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
    if out_batchnorm:
        layers.append(nn.BatchNorm1d(out_dim))
    projector = nn.Sequential(*layers)
    projector.apply(init_weights)
    return projector
