"""Loss terms as plain functions: InfoNCE (SimCLR's NT-Xent), SupCon, BYOL's regression and a masked per-patch MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce_against(
    z1: torch.Tensor, z2: torch.Tensor, all_z1: torch.Tensor, all_z2: torch.Tensor, offset: int, temperature: float
) -> torch.Tensor:
    """NT-Xent of local anchors against a larger candidate set (the global batch under data parallelism).

    z1, z2: (n, E) this rank's embeddings of view 1 and view 2 (row i of each is the same image);
    all_z1, all_z2: (N, E) every rank's embeddings, this rank's rows at [offset, offset + n).
    Each of the 2n local embeddings is an anchor; its other view is the positive; the other 2N - 2 candidates are
    negatives. Returns the mean over the 2n anchors; the mean over ranks is then the loss over all 2N anchors.
    """
    n, N = z1.shape[0], all_z1.shape[0]
    # float32 whatever the training precision: logits / 0.1 in bf16 would keep ~2 significant digits.
    dtype = torch.promote_types(z1.dtype, torch.float32)
    anchors = F.normalize(torch.cat([z1, z2]).to(dtype), dim=-1)  # (2n, E)
    candidates = F.normalize(torch.cat([all_z1, all_z2]).to(dtype), dim=-1)  # (2N, E)
    logits = anchors @ candidates.T / temperature  # (2n, 2N)
    rows = torch.arange(n, device=z1.device) + offset  # global index of each local image
    self_idx = torch.cat([rows, rows + N])
    positive_idx = torch.cat([rows + N, rows])
    # An embedding is never its own negative: -inf on its own column drops it from the softmax.
    logits = logits.scatter(1, self_idx[:, None], float("-inf"))
    return F.cross_entropy(logits, positive_idx)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """z1, z2: (N, E) two views' embeddings (row i of each is the same image; normalised here).

    SimCLR's NT-Xent over the 2N embeddings: every embedding is an anchor, its other view the positive, the other
    2N - 2 embeddings the negatives; returns the mean over the 2N anchors.
    """
    return info_nce_against(z1, z2, z1, z2, 0, temperature)


def supcon_against(
    z1: torch.Tensor,
    z2: torch.Tensor,
    labels: torch.Tensor,
    all_z1: torch.Tensor,
    all_z2: torch.Tensor,
    all_labels: torch.Tensor,
    offset: int,
    temperature: float,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L^sup_out) of local anchors against the global batch.

    z1, z2: (n, E) this rank's two views; labels: (n,) long, -1 = no label; all_*: every rank's (N, E) / (N,),
    this rank's rows at [offset, offset + n). Anchor i's positives: its own other view, and both views of every other
    image with the same label (>= 0); an unlabelled anchor has only its other view, and is nobody's class-mate, so
    it is treated as in SimCLR. Every candidate but the anchor itself is in the softmax. Loss of an anchor: minus the
    mean log-probability of its positives; returns the mean over the 2n anchors (with all labels distinct or all -1
    this is info_nce_against).
    """
    n, N = z1.shape[0], all_z1.shape[0]
    dtype = torch.promote_types(z1.dtype, torch.float32)  # float32 logits, as in info_nce_against
    anchors = F.normalize(torch.cat([z1, z2]).to(dtype), dim=-1)  # (2n, E)
    candidates = F.normalize(torch.cat([all_z1, all_z2]).to(dtype), dim=-1)  # (2N, E)
    rows = torch.arange(n, device=z1.device) + offset
    self_idx, other_view_idx = torch.cat([rows, rows + N]), torch.cat([rows + N, rows])
    anchor_labels, candidate_labels = torch.cat([labels, labels]), torch.cat([all_labels, all_labels])
    positive = (anchor_labels[:, None] == candidate_labels[None, :]) & (anchor_labels[:, None] >= 0)  # (2n, 2N)
    positive[torch.arange(2 * n, device=z1.device), other_view_idx] = True
    positive[torch.arange(2 * n, device=z1.device), self_idx] = False
    logits = (anchors @ candidates.T / temperature).scatter(1, self_idx[:, None], float("-inf"))
    log_prob = logits.log_softmax(dim=1)
    # where(), not multiplication: log_prob is -inf on the anchor's own column, and -inf * 0 is NaN.
    per_anchor = -torch.where(positive, log_prob, 0.0).sum(dim=1) / positive.sum(dim=1)
    return per_anchor.mean()


def supcon(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """z1, z2: (N, E) two views (row i of each is the same image); labels: (N,) long, -1 = unlabelled.

    SupCon over the 2N embeddings of one batch (see supcon_against); equals info_nce when no two samples share a label.
    """
    return supcon_against(z1, z2, labels, z1, z2, labels, 0, temperature)


def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """p: (N, E) online predictions; z: (N, E) target projections of the other view (no gradient expected).

    BYOL's loss 2 - 2 cos(p, z) (the squared distance of the normalised vectors), averaged over the N rows.
    """
    p, z = F.normalize(p.float(), dim=-1), F.normalize(z.float(), dim=-1)
    return (2 - 2 * (p * z).sum(dim=-1)).mean()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target: (N, L, P); mask: (N, L), 1 = counted, 0 = ignored.

    Mean squared error per patch (over its P values), averaged over the counted patches.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()
