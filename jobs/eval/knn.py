"""Weighted k-nearest-neighbour classification on frozen features (InstDisc, Wu et al. 2018; DINO's eval_knn).

Each query votes with its k most cosine-similar memory samples, each weighted by exp(sim / T). Cheap and
hyper-parameter-light, so the trainer can run it every few thousand steps as a learning signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, C): sum over the k nearest memory samples of exp(cos_sim / T), per class.

    train_feats: (N, D) memory bank; train_labels: (N,) int in [0, C); test_feats: (Q, D) queries.
    Features need not be normalised (they are L2-normalised here). k is clipped to N. Queries go in chunks of
    `chunk` so the (chunk, N) similarity matrix bounds memory.
    """
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long()
    k = min(k, bank.shape[0])
    out = []
    for q in F.normalize(test_feats.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k), most similar first
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        out.append(votes.scatter_add_(1, labels[idx], weights))
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """scores: (Q, C), labels: (Q,) -> {"top1": %, "top5": %} (percent; k clipped to C). Ties go to the lower class."""
    maxk = min(max(ks), scores.shape[1])
    # stable sort on the negated scores: equal scores keep class order, so ties resolve to the lower class id
    pred = (-scores).argsort(dim=1, stable=True)[:, :maxk]
    hit = pred == labels.view(-1, 1)
    return {f"top{k}": 100.0 * hit[:, : min(k, maxk)].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in percent of the weighted kNN classifier (see knn_scores for shapes)."""
    scores = knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels.to(scores.device), ks=(1,))["top1"]
