"""Start-up steps that every rank agrees on, so that one failing on some ranks only fails every rank at once.

A check that can differ between nodes (another node's environment: AWS_* variables the launcher did not forward, a
smaller /dev/shm, a missing package, a disk that is not shared) would otherwise end those ranks while the others wait
in the next collective until its timeout (NCCL's: 10 minutes), with only the first node's output in front of the
user. `agree` runs a step on every rank, gathers the outcomes over the gloo group (jobs.launch.cpu_group) and raises
on every rank, naming each failing rank, its host and its error.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch.distributed as dist

from jobs.errors import ConfigError
from jobs.launch import cpu_group

T = TypeVar("T")

# How long a rank looks for rank 0's marker in output_dir: a network filesystem may show a file created on another
# node a while later (NFS caches a directory's attributes and negative lookups for up to acdirmax, 60 s by
# default); a directory that is not shared never shows it. Only a failing check waits this long.
SHARED_DIR_WAIT_S = 70.0
MAX_ERRORS_SHOWN = 4  # distinct error messages in the raised one (64 ranks failing alike make one entry)


@dataclass(frozen=True)
class Outcome:
    """One rank's result of a start-up step: error is None when it passed."""
    rank: int
    host: str
    error: str | None
    config_error: bool  # a ConfigError: the user's to fix (the job exits 2 without a traceback)


def agree(step: Callable[[], T], what: str, undo: Callable[[T], None] | None = None) -> T:
    """Run `step` on this rank and return its result when it passed on every rank; else raise, on every rank, an
    error naming each failing rank, its host and its error (a ConfigError when the first failing rank's was one).
    `undo` releases this rank's result when it passed here and failed elsewhere. Collective: every rank calls it,
    in the same order; a world of one raises its own error."""
    result, error = None, None
    try:
        result = step()
    except Exception as e:  # any failure: a rank that dies alone would leave the others waiting
        error = e
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return result
    mine = Outcome(dist.get_rank(), socket.gethostname(), _describe(error), isinstance(error, ConfigError))
    outcomes: list[Outcome | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine, group=cpu_group())
    failed = [o for o in outcomes if o.error is not None]
    if not failed:
        return result
    if error is None and undo is not None:
        undo(result)
    message = failure_message(failed, len(outcomes))
    raise (ConfigError if failed[0].config_error else RuntimeError)(f"{message} ({what})") from error


def failure_message(failed: list[Outcome], world_size: int) -> str:
    """The failing ranks' errors, each distinct one once with the ranks and hosts that had it:
    "data.shards: ... [rank 1 of 2, host node-02]"."""
    by_error: dict[str, list[Outcome]] = {}
    for o in failed:
        by_error.setdefault(o.error, []).append(o)
    parts = []
    for error, outs in list(by_error.items())[:MAX_ERRORS_SHOWN]:
        hosts = list(dict.fromkeys(o.host for o in outs))
        host_text = ", ".join(hosts[:4]) + (f" and {len(hosts) - 4} more" if len(hosts) > 4 else "")
        ranks = _ranges([o.rank for o in outs])
        parts.append(f"{error} [rank{'s' if len(outs) > 1 else ''} {ranks} of {world_size}, "
                     f"host{'s' if len(hosts) > 1 else ''} {host_text}]")
    if len(by_error) > MAX_ERRORS_SHOWN:
        parts.append(f"and {len(by_error) - MAX_ERRORS_SHOWN} other errors")
    return "; ".join(parts)


def check_shared_dir(out: Path, rank: int) -> None:
    """Refuse, on every rank, a directory that is not the same on every rank: rank 0 creates `out` and a marker file
    with a fresh name in it, every rank looks for that file, and the ranks agree. A checkpoint directory on each
    node's own disk (a relative path under per-node clones, a node-local mount) would otherwise take each node's
    share of every checkpoint, with COMPLETE and `latest` on rank 0's node only, and the first resume would fail."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        out.mkdir(parents=True, exist_ok=True)
        return
    marker_name = f".shared-check-{uuid.uuid4().hex}"
    chosen = [(marker_name, f"{socket.gethostname()}:{(out / marker_name).resolve()}") if rank == 0 else None]
    dist.broadcast_object_list(chosen, src=0, group=cpu_group())
    marker_name, rank0_marker = chosen[0]
    marker = out / marker_name

    def leave_marker() -> None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{socket.gethostname()}\n")

    agree(leave_marker, f"creating output_dir {out}")

    def look() -> None:
        deadline = time.monotonic() + SHARED_DIR_WAIT_S
        while not marker.is_file():
            if time.monotonic() > deadline:
                raise ConfigError(f"output_dir: {out} is not shared by every rank: this rank (cwd {os.getcwd()}) "
                                  f"does not see rank 0's file {rank0_marker}; put output_dir on a filesystem "
                                  "every node mounts at the same path, and give it as an absolute path")
            time.sleep(0.1)

    try:
        agree(look, "output_dir check")
    finally:
        if rank == 0:
            marker.unlink(missing_ok=True)


def _describe(error: Exception | None) -> str | None:
    if error is None:
        return None
    return str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
