"""Process-group start-up, the same for `python`, `torchrun` and the `deepspeed` launcher.

torchrun and deepspeed export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; deepspeed.init_distributed
reads them. A plain `python jobs/pretrain.py` has none, so we describe a world of one on a free loopback port:
DeepSpeed's engine wants a process group even for a single process.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto") -> Dist:
    """Join (or create) the process group; nccl on CUDA, gloo on CPU unless the config says otherwise."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(local_rank)  # before any CUDA work, so NCCL binds each rank to its own GPU
    if backend == "auto":
        backend = "nccl" if on_cuda else "gloo"
    # On CPU DeepSpeed also JIT-builds a shared-memory all-reduce op the first time (about a minute, cached under
    # ~/.cache/torch_extensions), then uses it for same-host reductions.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
