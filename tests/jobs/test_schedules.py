"""Schedules are pure functions of samples seen: warm-up, cosine, floor, and invariance to the batch size."""

from __future__ import annotations

import math

import pytest

from jobs.derived import derive
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
    """The trainer's lr at step k is lr_at(k x global batch, peak) (jobs/loop.py): runs with global batch 256 and 1024
    follow one curve in samples seen - the 1024 run's step k is the 256 run's step 4k - with the peak scaled by the
    linear rule, and a quarter of the steps."""
    runs = {}
    for batch in (256, 1024):
        d = derive(batch, 64, batch // 64, 1e-3, 256, 100 * 1024, 10 * 1024)
        runs[batch] = (d, [lr_at(k * batch, d.peak_lr, 10 * 1024, 100 * 1024, 0.0) for k in range(d.total_steps + 1)])
    (small_run, small), (large_run, large) = runs[256], runs[1024]
    assert large_run.peak_lr == pytest.approx(4 * small_run.peak_lr) and small_run.total_steps == 4 * large_run.total_steps
    assert max(large) == pytest.approx(large_run.peak_lr) and large[-1] == pytest.approx(0.0, abs=1e-12)
    for k, lr in enumerate(large):
        assert lr / large_run.peak_lr == pytest.approx(small[4 * k] / small_run.peak_lr), k


def test_min_lr_ratio_sets_the_floor():
    assert lr_at(100_000, 1e-3, 0, 100_000, 0.1) == pytest.approx(1e-4)
    assert not math.isnan(lr_at(0, 1e-3, 0, 0, 0.0))  # degenerate schedule does not divide by zero
