"""Schedules are pure functions of samples seen: warm-up, cosine, floor, and invariance to the batch size."""

from __future__ import annotations

import math

import pytest

from jobs.schedules import lr_at, warmup_cosine


def test_warmup_is_linear_from_zero():
    assert warmup_cosine(0, 1.0, 100, 1000) == 0.0
    assert warmup_cosine(50, 1.0, 100, 1000) == pytest.approx(0.5)
    assert warmup_cosine(100, 1.0, 100, 1000) == pytest.approx(1.0)


def test_cosine_halfway_and_end():
    assert warmup_cosine(550, 2.0, 100, 1000) == pytest.approx(1.0)  # half-way down the half cosine
    assert warmup_cosine(1000, 2.0, 100, 1000) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(5000, 2.0, 100, 1000, floor=0.1) == pytest.approx(0.1)  # stays at the floor past the end


def test_monotone_after_warmup():
    values = [warmup_cosine(s, 1.0, 100, 1000, floor=0.05) for s in range(100, 1001, 10)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert min(values) == pytest.approx(0.05)


def test_same_curve_for_any_batch_size():
    """Counting samples, two runs with global batch 256 and 1024 use the same lr at the same samples seen."""
    for samples in range(0, 100_000, 1024):
        a = lr_at(samples, 1e-3, 10_000, 100_000, 0.0)
        b = lr_at(samples, 1e-3, 10_000, 100_000, 0.0)
        assert a == b
    assert lr_at(4 * 256, 1e-3, 10_000, 100_000, 0.0) == lr_at(1 * 1024, 1e-3, 10_000, 100_000, 0.0)


def test_min_lr_ratio_sets_the_floor():
    assert lr_at(100_000, 1e-3, 0, 100_000, 0.1) == pytest.approx(1e-4)
    assert not math.isnan(lr_at(0, 1e-3, 0, 0, 0.0))  # degenerate schedule does not divide by zero
