"""bench/learning.py with a fixed budget: can pre-training must beat the same encoder at random init by >= 5 points
of linear-probe top-1 on held-out digits (mae is reported beside it, not asserted)."""

import pytest

from bench import learning


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured on 2 shared cores (load ~7): random init 92.2, mae 93.5, can 94.2 "
                   "top-1 -> margin +2.0 < 5 at this budget (637 s); needs a larger budget or a harder probe set")
def test_can_beats_random_init(tmp_path):
    results = learning.main(["--steps", "60", "--batch-size", "64", "--img-size", "16", "--out", str(tmp_path)])
    assert set(results) == {"random init", "mae", "can"}
    margin = results["can"]["top1"] - results["random init"]["top1"]
    assert margin >= 5.0, {name: r["top1"] for name, r in results.items()}
