"""Start-up on several nodes, simulated by ranks on this machine whose environment or working directory differ: a
check that fails on some ranks only fails every rank at once, naming the failing rank; an output_dir that is not the
same directory on every rank is refused on every rank, over the gloo group made at start.

Bare gloo processes (no DeepSpeed engine, no training), so the whole module costs seconds."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from jobs.errors import ConfigError
from jobs.launch import choose_gloo_interface
from tools.local_s3 import free_port

from .conftest import CONFIG, REPO, start_ranks, wait_all


def test_a_data_source_one_rank_cannot_reach_fails_every_rank_at_once(trainer, tmp_path):
    """jobs/pretrain.py as 2 ranks started by hand; rank 1's AWS_ENDPOINT_URL is a dead port (a node the `deepspeed`
    launcher did not forward AWS_* to). Both ranks exit 2 within seconds (not rank 0 alone in a barrier), and rank 0
    says which rank, on which host, failed, and why."""
    dead = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "jobs/pretrain.py", "--config", str(CONFIG), "--set", f"data.shards={trainer.shards}",
           "--set", f"output_dir={tmp_path / 'run'}"]
    # AWS_MAX_ATTEMPTS=1: spares the test botocore's retries of the refused connection (~4 s)
    bad_node = {"AWS_ENDPOINT_URL": dead, "AWS_ENDPOINT_URL_S3": dead, "AWS_MAX_ATTEMPTS": "1"}
    procs = start_ranks(cmd, [{}, bad_node], [REPO, REPO], tmp_path / "logs", env=trainer.env)
    codes, logs = wait_all(procs, tmp_path / "logs", timeout=90)
    assert codes == [2, 2], logs
    rank0 = logs[0]
    assert "config error: data.shards:" in rank0 and "cannot be listed or read" in rank0, rank0
    assert f"[rank 1 of 2, host {socket.gethostname()}]" in rank0, rank0
    assert "rank 0 of 2" not in rank0  # rank 0's own check passed
    assert not (tmp_path / "run").exists()  # nothing started


SHARED_DIR = """
import os, sys, torch.distributed as dist
import torch.testing._internal.distributed.fake_pg  # the "fake" backend: NCCL's stand-in, its collectives do nothing
from jobs import launch, startup
from jobs.derived import derive
from jobs.engine import Runtime
from jobs.errors import ConfigError
from jobs.run import prepare_run_dir
rank = int(os.environ["RANK"])
store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), 2, rank == 0)
dist.init_process_group("fake", store=store, rank=rank, world_size=2)
launch.start_cpu_group()  # what init_distributed does right after the default group
print("cpu group:", dist.get_backend(launch.cpu_group()))
startup.SHARED_DIR_WAIT_S = 1.0
world = launch.Dist(rank=rank, world_size=2, local_rank=rank, device=launch.rank_device(rank, False))
try:
    prepare_run_dir("runs/x", derive(8, 4, 2, 1e-3, 256, 80, 8), Runtime("fp32", False), lambda extra: "", world)
except ConfigError as e:
    print("ConfigError:", e)
    sys.exit(2)
"""


def test_an_output_dir_that_is_not_shared_is_refused_on_every_rank(tmp_path):
    """Two ranks with the same relative output_dir under different working directories (two nodes, each with its
    own clone and disk): both refuse at start, naming the rank and host that cannot see rank 0's files, and rank 0
    leaves no marker behind. (A shared output_dir passes: every 2-rank run of test_train_e2e.py.)

    The default group is a stand-in for NCCL whose collectives do nothing, so the ranks agree only if
    start_cpu_group made the gloo group at start, connected, and every start-up collective goes over it."""
    nodes = [tmp_path / "node-a", tmp_path / "node-b"]
    for n in nodes:
        n.mkdir()
    codes, logs = wait_all(start_ranks([sys.executable, "-c", SHARED_DIR], [{}, {}], nodes, tmp_path / "logs"),
                           tmp_path / "logs", timeout=60)
    assert codes == [2, 2], logs
    for log in logs:
        assert "cpu group: gloo" in log, log
        assert "output_dir: runs/x is not shared by every rank" in log, log
        assert f"cwd {nodes[1]}) does not see rank 0's file {socket.gethostname()}:{nodes[0]}/runs/x/" in log, log
        assert f"[rank 1 of 2, host {socket.gethostname()}]" in log, log
    assert list((nodes[0] / "runs" / "x").iterdir()) == []


LOADER_START = """
import os, resource, sys, torch.distributed as dist
from jobs import launch
from jobs.config import load_config
from jobs.run import build_data
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
launch.start_cpu_group()
if rank == 1:  # a node whose /dev/shm cannot hold the worker's slots: the first slot's fallocate fails
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
cfg = load_config(sys.argv[1], [f"data.shards={sys.argv[2]}"]).data
world = launch.Dist(rank=rank, world_size=2, local_rank=rank, device=launch.rank_device(rank, False))
try:
    build_data(cfg, world, None).close()
except Exception as e:
    print("start-up failed:", e)
    sys.exit(2)
"""


def test_a_loader_that_cannot_start_on_one_rank_fails_every_rank_at_start(trainer, tmp_path):
    """The loader's workers, their /dev/shm slots and DALI's pipeline start inside the agreed start-up step, not in
    step 1: rank 1 cannot write its slots (a file-size limit stands in for a node short of /dev/shm), and both
    ranks fail at start naming rank 1, rather than rank 1 failing alone in its first step while rank 0 waits in
    the first collective."""
    cmd = [sys.executable, "-c", LOADER_START, str(CONFIG), trainer.shards]
    codes, logs = wait_all(start_ranks(cmd, [{}, {}], [REPO, REPO], tmp_path / "logs", env=trainer.env),
                           tmp_path / "logs", timeout=90)
    assert codes == [2, 2], logs
    for log in logs:
        assert "could not reserve" in log and "(starting the data loader)" in log, log
        assert f"[rank 1 of 2, host {socket.gethostname()}]" in log, log


def test_an_output_dir_url_is_refused_naming_the_field():
    from jobs.derived import derive
    from jobs.engine import Runtime
    from jobs.launch import Dist, rank_device
    from jobs.run import prepare_run_dir

    one = Dist(rank=0, world_size=1, local_rank=0, device=rank_device(0, False))
    with pytest.raises(ConfigError, match=r"^output_dir: s3://bucket/runs/x is a URL"):
        prepare_run_dir("s3://bucket/runs/x", derive(8, 4, 1, 1e-3, 256, 80, 8), Runtime("fp32", False),
                        lambda extra: "", one)


def test_gloo_binds_the_interface_that_routes_to_the_master():
    """GLOO_SOCKET_IFNAME comes from the route to MASTER_ADDR (jobs.launch.choose_gloo_interface): a node's own
    address gives the interface that holds it, not lo; loopback (a one-node run) and a value the user set are left
    alone."""
    import psutil

    own = [(name, a.address) for name, addrs in psutil.net_if_addrs().items() for a in addrs
           if a.family == socket.AF_INET and not a.address.startswith("127.")]
    if not own:
        pytest.skip("this machine has no non-loopback IPv4 address")
    for name, address in own:
        env = {"MASTER_ADDR": address}
        choose_gloo_interface(env)
        assert env["GLOO_SOCKET_IFNAME"] == name
    # The master node, whose own name resolves to loopback here (this VM maps its name to 127.0.0.1, Debian to
    # 127.0.1.1): the default route's interface, which other nodes reach it on.
    env = {"MASTER_ADDR": socket.gethostname()}
    choose_gloo_interface(env)
    assert env.get("GLOO_SOCKET_IFNAME") in {name for name, _ in own}, env
    for env in ({"MASTER_ADDR": "127.0.0.1"}, {"MASTER_ADDR": "localhost"},
                {"MASTER_ADDR": own[0][1], "GLOO_SOCKET_IFNAME": "ib0"}):
        before = dict(env)
        choose_gloo_interface(env)
        assert env == before
