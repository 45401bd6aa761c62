"""Shared-memory slots through which a loader worker process hands a batch's encoded images to the training process.

The training process creates a worker's ring (K slots of slot_bytes) and, once the worker has mapped it, unlinks the
names: the mappings outlive the names, so the memory goes back when both processes exit, however they exit (a SIGKILLed
run leaves nothing in /dev/shm; DeepSpeed's own shared-memory buffers taught us that, jobs/launch.py). The worker
writes a batch's images into a free slot at a uniform stride; the training process feeds DALI one numpy view of that
slot (no copy on either side) and gives the slot back once DALI has produced that batch's outputs.
"""

from __future__ import annotations

import math
import os
from multiprocessing.shared_memory import SharedMemory

import numpy as np

SHM_DIR = "/dev/shm"


def byte_lengths(images: list) -> np.ndarray:
    """int32 [n]: the sizes in bytes of n encoded images (how the loader and DALI learn where each one ends)."""
    return np.fromiter(map(len, images), np.int32, len(images))


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

    def write(self, slot: int, images: list[bytes], tail: np.ndarray | None = None) -> tuple[np.ndarray, int] | None:
        """Copy `images` into `slot`, and `tail` (an array that would otherwise be pickled through the pipe, which
        takes a syscall and a wake-up per 64 KB) at the slot's end; returns (the images' lengths, int32 [n], stride),
        or None when they do not fit (the caller sends that batch another way). Image i starts at i * stride: the
        stride is the longest image rounded up to 64 bytes, so the loader hands DALI the batch as one [n, stride]
        array (feed_input of one array costs ~30 us of the training process's CPU, of a list of 64 arrays ~400 us,
        on this VM). A batch whose n x stride does not fit (one large image among small ones) goes back to back
        instead: stride 0."""
        room = self._tail_start(tail.nbytes) if tail is not None else self.slot_bytes  # where the tail starts
        lengths = byte_lengths(images)
        stride = -(-int(lengths.max(initial=0)) // 64) * 64
        if stride * len(images) <= room:
            starts = range(0, stride * len(images), stride or 1)
        elif int(lengths.sum()) <= room:
            stride, starts = 0, np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).tolist()
        else:
            return None
        buf = self.segments[slot].buf
        for b, start in zip(images, starts):
            buf[start:start + len(b)] = b
        if tail is not None:
            buf[room:room + tail.nbytes] = np.ascontiguousarray(tail).view(np.uint8).reshape(-1)
        return lengths, stride

    def _tail_start(self, nbytes: int) -> int:
        return max(0, (self.slot_bytes - nbytes) // 64 * 64)

    def tail(self, slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The array write() put at the slot's end, as a view (no copy): valid until the slot is written again, so a
        caller keeps a copy of what it needs before giving the slot back."""
        count = math.prod(shape)  # (np.prod costs ~10 us a call here, on the training process's thread)
        return np.frombuffer(self.segments[slot].buf, dtype, count=count,
                             offset=self._tail_start(count * np.dtype(dtype).itemsize)).reshape(shape)

    def views(self, slot: int, lengths: np.ndarray, stride: int) -> np.ndarray | list[np.ndarray]:
        """The images in `slot`, no copy, valid until the slot is written again: an [n, stride] uint8 array whose row
        i holds image i and then padding (DALI cuts each row to its length), or with stride 0 a list of n arrays."""
        if stride:
            return np.frombuffer(self.segments[slot].buf, np.uint8, count=stride * len(lengths)).reshape(-1, stride)
        arr = np.frombuffer(self.segments[slot].buf, np.uint8, count=int(lengths.sum()))
        bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
        return [arr[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def close(self) -> None:
        for s in self.segments:
            try:
                s.close()
            except BufferError:
                # Views of the slot are still alive (DALI's no_copy inputs, or a caller's array): the mapping goes
                # with the last of them. Drop our handles so SharedMemory.__del__ does not try again and warn.
                s._buf = s._mmap = None
