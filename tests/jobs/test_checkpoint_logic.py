"""Checkpoint bookkeeping without an engine: complete markers, the latest pointer, pruning, safe loading, RNG."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from jobs import checkpoint, rng_state
from jobs.preemption import PreemptionFlag


def _make_tag(ckpt_dir, step, complete=True):
    tag_dir = ckpt_dir / checkpoint.tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag_dir / checkpoint.COMPLETE).write_text(f"{step}\n")
    return tag_dir.name


def test_latest_ignores_incomplete_tags(tmp_path):
    good = _make_tag(tmp_path, 100)
    (tmp_path / checkpoint.LATEST).write_text(good)
    _make_tag(tmp_path, 200, complete=False)  # a save that crashed before all ranks finished
    assert checkpoint.find_latest(tmp_path) == good


def test_pointer_to_incomplete_tag_falls_back_to_newest_complete(tmp_path):
    _make_tag(tmp_path, 100)
    newest = _make_tag(tmp_path, 150)
    (tmp_path / checkpoint.LATEST).write_text(_make_tag(tmp_path, 200, complete=False))
    assert checkpoint.find_latest(tmp_path) == newest
    assert checkpoint.find_latest(tmp_path / "nothing") is None


def test_prune_keeps_last_k_and_removes_crashed_leftovers(tmp_path):
    for step in (100, 200, 300, 400):
        _make_tag(tmp_path, step)
    _make_tag(tmp_path, 250, complete=False)  # older than the newest complete one: a dead save
    _make_tag(tmp_path, 500, complete=False)  # newer: may be a save in progress, must survive
    checkpoint.prune(tmp_path, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step_00000300", "step_00000400", "step_00000500"]


def test_safe_engine_loads_deepspeed_types_without_pickled_code(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim.pt"
    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.optimizer_states, "t": torch.ones(2)}
    torch.save(state, path, _use_new_zipfile_serialization=False)  # DeepSpeed's default format
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # plain torch refuses: the allow-list is what makes it load
    loaded = checkpoint.SafeCheckpointEngine().load(str(path))
    assert loaded["zero_stage"] == ZeroStageEnum.optimizer_states and torch.equal(loaded["t"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.SafeCheckpointEngine().load(str(path))


def test_rng_state_round_trips_through_weights_only(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.randn(3), np.random.randn(3), random.random()
    path = tmp_path / "rng.pt"
    torch.save({"rng": rng_state.capture()}, path)
    expected = (torch.randn(4), np.random.randn(4), random.random())
    rng_state.restore(torch.load(path, weights_only=True)["rng"])
    got = (torch.randn(4), np.random.randn(4), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_step_seeds_are_distinct_across_steps_and_ranks_and_the_same_in_every_process():
    seeds = {rng_state.step_seed(0, step, rank) for step in range(1, 200) for rank in range(8)}
    assert len(seeds) == 199 * 8
    # A resumed run is another process (another hash seed, another interpreter): it must draw the same seed.
    import subprocess
    import sys

    other = subprocess.run([sys.executable, "-c", "from jobs.rng_state import step_seed; print(step_seed(0, 5, 1))"],
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(other.stdout) == rng_state.step_seed(0, 5, 1)


def test_preemption_signal_only_sets_a_flag():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        flag = PreemptionFlag(start_step=10)
        assert not flag.requested_anywhere(11)
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives during step 12
        assert flag.signal_name == "SIGUSR1" and flag.signal_step == 12
        assert flag.requested_anywhere(12)  # one process: no vote to wait for
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
