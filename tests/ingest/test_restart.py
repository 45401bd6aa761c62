"""kill -9 at several points, then rerun: the output equals a clean run's; the Ray engine gives the same shards.

Kill points: after the 2nd staged unit and after the 3rd written shard (test hook), and at two random delays,
one early (start-up or staging) and one late (staging, sharding or the final files); the delay drawn is in the
failure message. The reference is an in-process run with 1 worker; reruns use 2 worker processes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.ingest.config import IngestConfig
from pipeline.ingest.engine import KILL_HOOK_ENV, run_ingest
from tests.ingest.helpers import check_readable, shard_contents

_ARGS = ["--unit-size", "10", "--samples-per-shard", "8", "--quiet"]
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("killdump")
    rng = np.random.default_rng(0)
    for i in range(60):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((160 + i, 120), Image.Resampling.BILINEAR)
        img.save(root / f"img{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def reference(dump, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ds"
    run_ingest(IngestConfig(sources=(str(dump),), output=str(out), unit_size=10, samples_per_shard=8, workers=1, quiet=True))
    return shard_contents(out)


def _cli(dump, out, workers: int, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "tools/shard.py", str(dump), "--output", str(out), "--workers", str(workers), *_ARGS]
    return subprocess.Popen(cmd, env=env, cwd=_REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _rerun_and_compare(dump, out, reference):
    proc = _cli(dump, out, workers=2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert shard_contents(out) == reference
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (out / "_ingest" / "stage").exists()
    check_readable(out)


@pytest.mark.parametrize("hook", ["stage:2", "shard:3"])
def test_kill_at_a_phase_then_rerun(dump, reference, tmp_path, hook):
    proc = _cli(dump, tmp_path / "ds", workers=2, env_extra={KILL_HOOK_ENV: hook})
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "ds" / "report.json").exists()
    _rerun_and_compare(dump, tmp_path / "ds", reference)


@pytest.mark.parametrize("window", [(0.3, 2.0), (2.0, 4.5)], ids=["early", "late"])
def test_kill_after_a_random_delay_then_rerun(dump, reference, tmp_path, window):
    delay = round(random.uniform(*window), 2)
    proc = _cli(dump, tmp_path / "ds", workers=2)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    try:
        _rerun_and_compare(dump, tmp_path / "ds", reference)
    except AssertionError as e:
        raise AssertionError(f"killed after {delay} s: {e}") from e


def test_ray_engine_matches_local(dump, reference, tmp_path):
    import ray

    # Ray 2.x dropped local_mode; one CPU keeps it to a single worker process.
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        run_ingest(IngestConfig(sources=(str(dump),), output=str(tmp_path / "ds"), unit_size=10, samples_per_shard=8,
                                engine="ray", quiet=True))
    finally:
        ray.shutdown()
    assert shard_contents(tmp_path / "ds") == reference
