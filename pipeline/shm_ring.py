"""Shared-memory slots through which a loader worker process hands a batch's encoded images to the training process.

The training process creates a worker's ring (K slots of slot_bytes) and, once the worker has mapped it, unlinks the
names: the mappings outlive the names, so the memory goes back when both processes exit, however they exit (a SIGKILLed
run leaves nothing in /dev/shm; DeepSpeed's own shared-memory buffers taught us that, jobs/launch.py). The worker
writes a batch's images back to back into a free slot; the training process feeds DALI numpy views of that slot (no
copy on either side) and gives the slot back once DALI has produced that batch's outputs.
"""

from __future__ import annotations

import os
from multiprocessing.shared_memory import SharedMemory

import numpy as np

SHM_DIR = "/dev/shm"


class SlotRing:
    """K slots of `slot_bytes` each, one SharedMemory segment per slot."""

    def __init__(self, segments: list[SharedMemory], slot_bytes: int):
        self.segments, self.slot_bytes = segments, slot_bytes

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    @classmethod
    def create(cls, slots: int, slot_bytes: int, owner: str) -> "SlotRing":
        """Create the slots, after checking that /dev/shm can hold them: tmpfs commits pages only when written, so a
        too small /dev/shm (containers default to 64 MB) would otherwise kill the worker with SIGBUS mid-run."""
        need = slots * slot_bytes
        if os.path.isdir(SHM_DIR):
            st = os.statvfs(SHM_DIR)
            free = st.f_bavail * st.f_frsize
            if free < need:
                raise MemoryError(f"{owner}: needs {need / 2**20:.0f} MiB of shared memory ({slots} slots x "
                                  f"{slot_bytes / 2**20:.0f} MiB) but {SHM_DIR} has {free / 2**20:.0f} MiB free: give "
                                  "the container a larger /dev/shm (docker --shm-size), or lower data.workers, "
                                  "data.worker_prefetch or data.slot_bytes_per_sample")
        ring = cls([], slot_bytes)
        try:
            for _ in range(slots):
                ring.segments.append(SharedMemory(create=True, size=slot_bytes))
                # Reserve the pages now: the check above sees one ring, while the ranks and workers of a node create
                # theirs at the same time; a reservation that fails here is an error naming the owner, not a SIGBUS
                # in a worker mid-run.
                os.posix_fallocate(ring.segments[-1]._fd, 0, slot_bytes)
        except OSError as e:
            ring.unlink()
            ring.close()
            raise MemoryError(f"{owner}: could not reserve {need / 2**20:.0f} MiB of shared memory in {SHM_DIR} "
                              f"({e.strerror}): give the container a larger /dev/shm (docker --shm-size), or lower "
                              "data.workers, data.worker_prefetch or data.slot_bytes_per_sample") from e
        return ring

    @classmethod
    def attach(cls, names: list[str], slot_bytes: int) -> "SlotRing":
        # Attaching registers the names with the resource tracker again (Python < 3.13), but worker processes share
        # the training process's tracker (forkserver passes its connection on), whose set of names holds each once:
        # the creator's unlink removes them.
        return cls([SharedMemory(name=n) for n in names], slot_bytes)

    def unlink(self) -> None:
        """Remove the names (the mappings stay). Again on an unlinked ring: nothing to do."""
        for s in self.segments:
            try:
                s.unlink()
            except FileNotFoundError:
                pass

    def write(self, slot: int, images: list[bytes]) -> np.ndarray | None:
        """Copy `images` back to back into `slot`; returns their offsets (n + 1 int64), or None when they do not fit
        (the caller sends that batch another way)."""
        offsets = np.zeros(len(images) + 1, np.int64)
        np.cumsum([len(b) for b in images], out=offsets[1:])
        if offsets[-1] > self.slot_bytes:
            return None
        buf = self.segments[slot].buf
        for b, start in zip(images, offsets[:-1].tolist()):
            buf[start:start + len(b)] = b
        return offsets

    def views(self, slot: int, offsets: np.ndarray) -> list[np.ndarray]:
        """uint8 views of the images in `slot` (no copy): valid until the slot is written again."""
        arr = np.frombuffer(self.segments[slot].buf, np.uint8, count=int(offsets[-1]))
        bounds = offsets.tolist()
        return [arr[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def close(self) -> None:
        for s in self.segments:
            try:
                s.close()
            except BufferError:
                # Views of the slot are still alive (DALI's no_copy inputs, or a caller's array): the mapping goes
                # with the last of them. Drop our handles so SharedMemory.__del__ does not try again and warn.
                s._buf = s._mmap = None
