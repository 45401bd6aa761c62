"""Crash-safe DeepSpeed checkpoints with per-rank trainer state, loaded without executing code.

Layout under CKPT = OUTPUT_DIR/checkpoints:
    step_00000100/            DeepSpeed's files (model states, ZeRO optimizer partitions of every rank)
    step_00000100/trainer_rank00000.pt   step, samples seen, this rank's data-stream state, RNG states
    step_00000100/COMPLETE    written by rank 0 only after every rank's files are on disk (barrier)
    latest                    the newest complete tag, replaced atomically (os.replace) after COMPLETE

A crash during a save leaves a tag without COMPLETE: `latest` still names the previous good tag, resume ignores the
incomplete one, and the next prune deletes it. The output directory must be on a filesystem every rank sees.

DeepSpeed's own loader calls torch.load(weights_only=False), which unpickles arbitrary code; SafeCheckpointEngine
loads the same files with weights_only=True and an explicit allow-list of the few DeepSpeed/python types they hold.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _safe_globals() -> list:
    """Non-tensor types DeepSpeed puts in its checkpoints (found by loading each ZeRO stage's files)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, but loading with weights_only=True (no pickled code runs)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3 writes one of these per rank, no whole module


def zero3_module_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole module's fp32 state_dict of a ZeRO-3 checkpoint tag, gathered offline from every rank's partitions
    (DeepSpeed's zero_to_fp32), with its files read weights_only: that utility calls torch.load(weights_only=False),
    so torch.load is routed through the allow-list for the duration of the call (one thread, at start-up)."""
    from deepspeed.utils import zero_to_fp32

    real_load = torch.load

    def weights_only_load(f, map_location=None, weights_only=None, mmap=None, **kwargs):
        with torch.serialization.safe_globals(_safe_globals()):
            return real_load(f, map_location=map_location, weights_only=True, mmap=bool(mmap))

    torch.load = weights_only_load
    try:
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    finally:
        torch.load = real_load


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"trainer_rank{rank:05d}.pt"


def save(engine, ckpt_dir: Path, step: int, trainer_state: dict, rank: int, keep: int, crash: bool = False) -> Path:
    """Collective: every rank calls it at the same step. Returns the tag directory. crash: rank 0 dies by SIGKILL after
    every file is written and before the tag is marked complete (debug.crash_in_save_at_step)."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / COMPLETE).unlink(missing_ok=True)  # re-saving a step (after a resume) starts incomplete again
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={}, save_latest=False)
    _atomic_torch_save(trainer_state, _rank_file(tag_dir, rank))  # each rank's data stream is its own
    if crash and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # all ranks' files are written before the tag is declared complete
    if rank == 0:
        _atomic_write_bytes(tag_dir / COMPLETE, f"{step}\n".encode())
        _atomic_write_bytes(ckpt_dir / LATEST, f"{tag}\n".encode())
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def find_latest(ckpt_dir: Path) -> str | None:
    """The `latest` pointer when it names a complete tag, else the newest complete tag, else None."""
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
        log.warning("checkpoint pointer names %s, which is incomplete; scanning for complete tags", tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete tags; delete older ones and incomplete leftovers older than the newest."""
    complete = complete_tags(ckpt_dir)
    doomed = set(complete[:-keep])
    newest = complete[-1] if complete else None
    for p in ckpt_dir.iterdir():
        if _TAG.match(p.name) and p.name not in complete and newest is not None and p.name < newest:
            doomed.add(p.name)
    for name in sorted(doomed):
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def agreed_latest(ckpt_dir: Path, rank: int) -> str | None:
    """Rank 0 chooses the tag to resume from and tells the others, so all ranks load the same one."""
    choice = [find_latest(ckpt_dir) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Restore engine (weights + optimizer) and return this rank's trainer state. Refuses, before loading anything, a
    checkpoint written by another number of ranks: each rank's data stream position is its own file."""
    saved = len(list((ckpt_dir / tag).glob("trainer_rank*.pt")))  # _rank_file names
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved != world:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} was written by {saved} ranks and this run has {world}: "
                           "resuming needs the same number of ranks (each rank's data stream position is its own)")
    path = _rank_file(ckpt_dir / tag, rank)
    engine.checkpoint_engine = SafeCheckpointEngine()
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return torch.load(path, weights_only=True)
