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

    def requested_anywhere(self) -> bool:
        """True on every rank as soon as any rank got a signal.

        The vote is a one-element all-reduce of a CPU tensor over gloo: a CUDA tensor would make the host wait for the
        step's kernels (a host-device sync every step) just to read one flag.
        """
        local = self.signal_name is not None
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return local
        flag = torch.tensor([1.0 if local else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_cpu_group())
        return bool(flag.item())


_CPU_GROUP: list = []


def _cpu_group():
    """The default group when it already runs on gloo (CPU runs), else a gloo group over the same ranks, made once.

    Every rank reaches the first call at the same step boundary, which new_group (a collective) requires.
    """
    if dist.get_backend() == "gloo":
        return None
    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(backend="gloo"))
    return _CPU_GROUP[0]
