"""Two (or more) real ranks for a test: spawned processes that meet at a free loopback port, each running
target(rank, port, results) and writing what it found into the shared `results` dict."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable

import torch.multiprocessing as mp


@dataclass
class RankRun:
    results: dict  # what the ranks wrote
    exit_codes: list[int | None]  # per rank; a rank killed at the deadline has a negative code
    hung: list[int]  # the ranks still running at the deadline (killed)


def run_ranks(target: Callable, world: int = 2, timeout_s: float = 90.0) -> RankRun:
    """Start `world` ranks of target(rank, port, results); wait up to timeout_s for all (shared), kill the rest."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=target, args=(r, port, results)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        return RankRun(dict(results), [p.exitcode for p in procs], hung)
