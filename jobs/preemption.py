"""Preemption: SIGTERM / SIGUSR1 set a flag; every rank saves at the end of the step after the one the signal
arrived in, and exits 0.

The handler only sets a flag: saving inside it would interrupt whatever collective the rank is in. Ranks agree on
the decision by an all-reduce, because schedulers do not signal every rank at the same instant (and a save is a
collective: one rank saving alone would hang). The vote never makes the host wait: each step boundary starts one
(asynchronously, on the gloo group jobs.launch made at start) and reads the previous one, which every rank joined a
whole step earlier. That costs one step of delay (well inside SLURM's 180 s warning) and keeps the host free to queue
the next step's GPU work.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from jobs.launch import cpu_group

log = logging.getLogger(__name__)


class PreemptionFlag:
    def __init__(self, start_step: int = 0, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signal_name: str | None = None
        self.signal_step: int | None = None  # the training step this rank's signal arrived in
        self.last_boundary = start_step  # the step whose boundary requested_anywhere last saw
        self._pending: tuple | None = None  # (work, flag) of the vote started at the last call
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self.signal_step = self.last_boundary + 1  # this step's boundary is the first to carry it
        log.warning("%s received during step %d", self.signal_name, self.signal_step)

    def requested_anywhere(self, step: int) -> bool:
        """Called at the end of every step, on every rank: True on every rank, at the same step, one step after the
        one in which any rank first had a signal.

        The vote is a one-element all-reduce of a CPU tensor over gloo, started here without waiting (a CUDA tensor
        would make the host wait for the step's kernels just to read one flag); the one read here was started at the
        previous call.
        """
        self.last_boundary = step
        local = self.signal_name is not None
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return local
        previous = self._pending
        flag = torch.tensor([1.0 if local else 0.0])
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group(), async_op=True), flag)
        if previous is None:
            return False
        work, voted = previous
        work.wait()  # every rank started it a step ago: done
        return bool(voted.item())

