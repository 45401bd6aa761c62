"""Weighted kNN: exact scores and accuracy on hand-made embeddings, computed by hand below."""

import math

import pytest
import torch

from jobs.eval.knn import knn_accuracy, knn_scores, topk_accuracy

# Memory bank in 2-D: a=(1,0) class 0; b=(0,1) class 1; c=(1,1) class 1.
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
BANK_LABELS = torch.tensor([0, 1, 1])
# q1=(1,0.1) lies next to a but c and b outnumber it; q2=(0,1) sits on b. Both are labelled class 0.
QUERIES = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
QUERY_LABELS = torch.tensor([0, 0])


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.hypot(*u) / math.hypot(*v)


def test_scores_match_hand_computation():
    t = 0.07
    scores = knn_scores(BANK, BANK_LABELS, QUERIES, num_classes=2, k=3, temperature=t)
    q1 = (1.0, 0.1)
    expected_q1 = [
        math.exp(_cos(q1, (1, 0)) / t),
        math.exp(_cos(q1, (0, 1)) / t) + math.exp(_cos(q1, (1, 1)) / t),
    ]
    # q2 = b exactly: sims a 0, b 1, c 1/sqrt(2)
    expected_q2 = [math.exp(0.0), math.exp(1 / t) + math.exp(math.sqrt(0.5) / t)]
    torch.testing.assert_close(scores, torch.tensor([expected_q1, expected_q2]), rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "temperature, expected",
    [
        # sharp votes: q1's single very close neighbour (class 0) outweighs two farther class-1 ones -> right;
        # q2 is surrounded by class 1 -> wrong. 1 of 2 = 50 %.
        (0.07, 50.0),
        # nearly flat votes = majority vote: q1 goes to class 1 (2 neighbours against 1) -> wrong; q2 wrong. 0 %.
        (100.0, 0.0),
    ],
)
def test_accuracy_depends_on_temperature_as_computed_by_hand(temperature, expected):
    acc = knn_accuracy(BANK, BANK_LABELS, QUERIES, QUERY_LABELS, num_classes=2, k=3, temperature=temperature)
    assert acc == pytest.approx(expected)


def test_k_limits_the_neighbours():
    # k=1: q1's nearest is a (class 0) -> right; q2's nearest is b (class 1) -> wrong.
    assert knn_accuracy(BANK, BANK_LABELS, QUERIES, QUERY_LABELS, num_classes=2, k=1) == pytest.approx(50.0)
    # k larger than the bank is clipped rather than failing
    assert knn_scores(BANK, BANK_LABELS, QUERIES, num_classes=2, k=50).shape == (2, 2)


def test_feature_scale_does_not_matter():
    a = knn_scores(BANK, BANK_LABELS, QUERIES, num_classes=2, k=3)
    b = knn_scores(BANK * 7.0, BANK_LABELS, QUERIES * 0.01, num_classes=2, k=3)
    torch.testing.assert_close(a, b)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    # top-1: only row 1 right; top-2 would add row 0; top-5 (clipped to 3 classes) gets all.
    assert topk_accuracy(scores, labels, ks=(1, 5)) == pytest.approx({"top1": 100 / 3, "top5": 100.0})
    assert topk_accuracy(scores, labels, ks=(2,))["top2"] == pytest.approx(200 / 3)
