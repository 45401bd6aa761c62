"""RNG states of torch, numpy and python as tensors and plain lists, so checkpoints load with weights_only=True.

numpy's get_state() holds an ndarray and python's getstate() nested tuples: neither is on torch's weights_only
allow-list as is, so they are converted here and converted back on restore.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one (step, rank): the model's noise and drop-path draws depend only on these three numbers,
    so a resumed run redraws exactly what the uninterrupted run drew, and no two ranks or steps share draws."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)
