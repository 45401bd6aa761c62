"""Preemption: SIGTERM / SIGUSR1 set a flag; the training loop saves at the next step boundary and exits 0.

The handler only sets a flag: saving inside it would interrupt whatever collective the rank is in. Ranks agree on
the decision by an all-reduce, because schedulers do not signal every rank at the same instant (and a save is a
collective: one rank saving alone would hang).
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class PreemptionFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signal_name: str | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested_anywhere(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank got a signal. One tiny all-reduce: negligible beside a step."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
