"""Process-group start-up, the same for `python`, `torchrun` and the `deepspeed` launcher.

torchrun and deepspeed export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; deepspeed.init_distributed
reads them. A bare `srun python ...` or `mpirun python ...` exports only its own variables: rank_environment takes the
ranks from those (MASTER_ADDR and MASTER_PORT must then be exported by hand, as jobs/slurm_pretrain.sh does). A plain
`python jobs/pretrain.py` has none, so we describe a world of one on a free loopback port: DeepSpeed's engine wants a
process group even for a single process.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Mapping, MutableMapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Where each launcher says which device of its node a process owns: torchrun and the deepspeed launcher export
# LOCAL_RANK (jobs/slurm_pretrain.sh sets it from SLURM_LOCALID); a bare `srun python ...` leaves only SLURM_LOCALID;
# Open MPI's mpirun sets OMPI_COMM_WORLD_LOCAL_RANK. The first one present wins.
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


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

    os.environ.update(rank_environment(os.environ))
    on_cuda, local = torch.cuda.is_available(), local_rank()
    device = rank_device(local, on_cuda, torch.cuda.device_count() if on_cuda else 0)
    if on_cuda:
        torch.cuda.set_device(device)  # before any CUDA work, so NCCL (and DALI) bind each rank to its own GPU
    if backend == "auto":
        backend = "nccl" if on_cuda else "gloo"
    choose_gloo_interface(os.environ)
    # On CPU DeepSpeed also JIT-builds a shared-memory all-reduce op the first time (about a minute, cached under
    # ~/.cache/torch_extensions), then uses it for same-host reductions.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    start_cpu_group()
    if not on_cuda:
        release_shm_allreduce_name(rank)
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def choose_gloo_interface(env: MutableMapping[str, str]) -> None:
    """Set GLOO_SOCKET_IFNAME, unless the user did, to the interface that routes to MASTER_ADDR.

    Gloo (the CPU group, and the default group of CPU runs) otherwise advertises the address the hostname resolves
    to, which is 127.0.1.1 on a Debian/Ubuntu node's /etc/hosts and in some host-network containers: every peer
    then connects to its own loopback and the group never forms. The route to MASTER_ADDR is the one the
    rendezvous (TCPStore) itself uses, so it reaches the other nodes. On the master node itself, when MASTER_ADDR
    is this host's own name and that resolves to loopback here (jobs/slurm_pretrain.sh exports the first node's
    name; Debian maps it to 127.0.1.1), the other nodes reach it on another interface: the default route's is
    taken. A loopback MASTER_ADDR (127.x, localhost: a one-node run) changes nothing."""
    if env.get("GLOO_SOCKET_IFNAME") or not env.get("MASTER_ADDR"):
        return
    master = env["MASTER_ADDR"]
    name, why = interface_towards(master), "the interface that routes to MASTER_ADDR"
    if name is None and _names_this_host(master):
        name, why = interface_towards(_OFF_HOST), "the default route's: MASTER_ADDR names this host, loopback here"
    if name is not None:
        env["GLOO_SOCKET_IFNAME"] = name
        log.info("GLOO_SOCKET_IFNAME=%s (%s %s)", name, why, master)


_OFF_HOST = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never a local address, so the kernel routes it by the default route


def _names_this_host(host: str) -> bool:
    """Whether `host` is this machine's own host name (short or fully qualified), not localhost or an address."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    names |= {n.split(".")[0] for n in names}
    return host.lower() in names and host.lower() != "localhost"


def interface_towards(host: str) -> str | None:
    """The name of the network interface that holds the source address of this host's route to `host` (a name or
    an IPv4 address), or None when that address is loopback or unknown. On the node that is `host` itself, the
    interface holding `host`'s address (not lo)."""
    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP: nothing is sent; the kernel picks the route and the source address
            source = s.getsockname()[0]
    except OSError:  # unresolvable, or no route: leave gloo's default
        return None
    if ipaddress.ip_address(source).is_loopback:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == source for a in addrs):
            return name
    return None


# Gloo's connect retries a refused connection until the group's timeout; a group that cannot form is a network
# setting to fix, so it should fail in a minute, not after the 10-30 minutes collectives are given.
GLOO_CONNECT_TIMEOUT = timedelta(seconds=60)

_CPU_GROUP: list = []


def start_cpu_group() -> None:
    """Make the gloo group over every rank that host-side collectives use (the preemption vote, the start-up checks'
    all_gather_object): at start, so a cluster where gloo cannot connect across nodes fails here, in a minute,
    rather than after a full start-up, a compile and the first step. A CPU run's default group is gloo already."""
    _CPU_GROUP.clear()
    if dist.get_backend() == "gloo":
        _CPU_GROUP.append(None)
        return
    try:
        group = dist.new_group(backend="gloo", timeout=GLOO_CONNECT_TIMEOUT)  # gloo connects the full mesh here
    except RuntimeError as e:
        raise RuntimeError(f"the gloo group (CPU collectives) could not connect across ranks "
                           f"(GLOO_SOCKET_IFNAME={os.environ.get('GLOO_SOCKET_IFNAME', '<unset>')}): set "
                           "GLOO_SOCKET_IFNAME to the network interface the nodes reach each other on") from e
    dist.distributed_c10d._set_pg_timeout(dist.default_pg_timeout, group)  # later collectives may wait on a slow rank
    _CPU_GROUP.append(group)


def cpu_group():
    """The gloo group start_cpu_group made (None: the default group, when that runs on gloo)."""
    if not _CPU_GROUP:
        raise RuntimeError("no CPU process group: start the process group with jobs.launch.init_distributed")
    return _CPU_GROUP[0]


# (rank, world size, local rank) variables of the launchers that do not export RANK: an srun task (SLURM_STEP_NUM_TASKS
# exists in a job step only; a batch script, which is not a rank, has SLURM_PROCID=0 and SLURM_NTASKS as well) and an
# Open MPI process.
RANK_SOURCES = {"srun": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
                "mpirun": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")}


def rank_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The variables torch.distributed's env:// start-up needs that `env` lacks: none under torchrun or deepspeed
    (RANK and LOCAL_RANK are set); the ranks of an srun or mpirun task; else a world of one on a free loopback port."""
    if env.get("RANK", "") != "":  # LOCAL_RANK too, from the launcher's own variable when only RANK was exported
        return {} if env.get("LOCAL_RANK", "") != "" else {"LOCAL_RANK": str(local_rank(env))}
    for launcher, (rank, size, local) in RANK_SOURCES.items():
        if env.get(rank, "") == "" or env.get(size, "") == "":
            continue
        if int(env[size]) == 1:
            break
        if not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise RuntimeError(f"started by {launcher} as rank {env[rank]} of {env[size]} ({rank}, {size}) without "
                               "MASTER_ADDR and MASTER_PORT: export them in every task (the first node's address and "
                               "a free port, as jobs/slurm_pretrain.sh does), or start with torchrun or deepspeed")
        return {"RANK": env[rank], "WORLD_SIZE": env[size], "LOCAL_RANK": env.get(local, "0")}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port())}


def local_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's index among the processes of its node (LOCAL_RANK_VARS), 0 when no launcher set one."""
    for name in LOCAL_RANK_VARS:
        if env.get(name, "") != "":
            return int(env[name])
    return 0


def rank_device(local: int, on_cuda: bool, visible: int = 0) -> torch.device:
    """The device a rank trains on: its own GPU of the node (cuda:LOCAL_RANK among `visible` GPUs), or the CPU.
    Always with an index on CUDA: a bare "cuda" means the current device, GPU 0 until set_device, which every rank
    would share. A task that sees one GPU only (srun --gpus-per-task or --gpu-bind, a per-task CUDA_VISIBLE_DEVICES)
    trains on that one, cuda:0, whatever its local rank."""
    if not on_cuda:
        return torch.device("cpu")
    if visible == 1:
        return torch.device("cuda", 0)
    if local >= visible:
        raise RuntimeError(f"local rank {local} (LOCAL_RANK / SLURM_LOCALID) but this process sees {visible} GPUs "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): start one "
                           "process per GPU of the node, and let each see all of the node's GPUs or only its own")
    return torch.device("cuda", local)


SHM_DIR = Path("/dev/shm")


def shm_allreduce_buffer(rank: int, addr: str | None = None, port: str | None = None) -> Path:
    """The POSIX shared-memory object DeepSpeed's CPU all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates for
    `rank` of the process group at addr:port (default: this process's MASTER_ADDR and MASTER_PORT)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_allreduce_name(rank: int) -> None:
    """Unlink this rank's shared-memory all-reduce buffer as soon as every rank has mapped it.

    DeepSpeed's CPU backend creates one 67 MB buffer per rank under /dev/shm and never unlinks it, so every CPU run,
    finished or killed, leaves them behind until /dev/shm (which is RAM) fills: measured here, 316 of them, 21 GB of
    24, after two days of test runs, and then compilers and trainers starved. init_distributed returns on a rank only
    after it has mapped every peer's buffer, so after a barrier the names are no longer needed: the mappings outlive
    the name, and the kernel frees the memory when the last rank exits, however it exits (SIGKILL included).
    """
    dist.barrier()
    # Absent where DeepSpeed chose not to use shared memory (ranks on several hosts, or no LOCAL_SIZE, as for a
    # plain `python jobs/pretrain.py`): nothing to release then.
    shm_allreduce_buffer(rank).unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
