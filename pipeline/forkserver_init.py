"""Imported once, by the forkserver that loader workers are forked from (worker_pool._context), and by nothing else.

SLURM (--signal without B:, scancel, preemption) and a terminal's Ctrl-C signal every process of a job step: the
forkserver too, and a worker between its fork and its own first line. Both ignore those signals from here on (a
forked child keeps the dispositions), so a preemption notice reaches the ranks, which save, and nothing else. Not in
pipeline/worker.py: the training process imports that module, and must keep its own handlers.
"""

import signal

import pipeline.worker  # noqa: F401  (preloaded: workers start without importing it again)

for _signal in pipeline.worker.IGNORED_SIGNALS:
    signal.signal(_signal, signal.SIG_IGN)
