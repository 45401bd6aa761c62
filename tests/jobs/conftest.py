"""Fixtures for the trainer's end-to-end tests: JPEG shards on the loopback S3 server, and a launcher that runs the
real entry point (`deepspeed --num_gpus 2 jobs/pretrain.py` or `python jobs/pretrain.py`) as a subprocess."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.local_s3 import free_port

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "test_cpu.yaml"
VENV_BIN = Path(sys.executable).parent


def _jpeg(rng: np.random.Generator) -> bytes:
    """48x64 image with some structure (flat blocks + noise) so reconstruction has something to learn."""
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    img[:24, :32] = rng.integers(0, 255, 3)
    img[24:, 32:] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="session")
def shards_url(s3_server) -> str:
    from pipeline.ingest.writer import write_shard

    bucket = s3_server.make_bucket("jobs-e2e")
    rng = np.random.default_rng(0)
    for s in range(4):
        samples = [(f"img{s:02d}{i:04d}", {"jpg": _jpeg(rng), "cls": str(i % 5).encode()}) for i in range(24)]
        write_shard(f"{bucket}/shards/shard-{s:06d}.tar", samples)
    return f"{bucket}/shards/"


class Trainer:
    """Starts jobs/pretrain.py with test_cpu.yaml; output goes to OUT_DIR/launch-N.log."""

    def __init__(self, s3_env: dict, shards: str):
        # Not this process's process-group variables (an in-process test may have set them): each launch sets its own.
        launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        self.env = {**{k: v for k, v in os.environ.items() if k not in launch_vars}, **s3_env, "PYTHONUNBUFFERED": "1"}
        self.shards = shards
        self.launches = 0
        self.ports: list[str] = []  # MASTER_PORT of each multi-rank launch, in order

    def command(self, out_dir: Path, ranks: int, sets: list[str], launcher: str = "deepspeed",
                config: Path = CONFIG) -> list[str]:
        """launcher: "deepspeed", "torchrun" or "slurm" (jobs/slurm_pretrain.sh under the stub srun and scontrol of
        slurm_env) for several ranks; one rank runs `python jobs/pretrain.py`."""
        overrides = [f"data.shards={self.shards}", f"output_dir={out_dir}", *sets]
        args = ["jobs/pretrain.py", "--config", str(config)] + [a for o in overrides for a in ("--set", o)]
        if ranks == 1:
            return [sys.executable, *args]
        self.ports.append(str(free_port()))
        if launcher == "slurm":
            return ["bash", "jobs/slurm_pretrain.sh", *args[2:]]
        if launcher == "torchrun":
            return [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", self.ports[-1], *args]
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", self.ports[-1], *args]

    def start(self, out_dir: Path, ranks: int = 2, sets: list[str] = (), launcher: str = "deepspeed",
              env: dict | None = None, config: Path = CONFIG) -> tuple[subprocess.Popen, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.launches += 1
        log = out_dir / f"launch-{self.launches}.log"
        cmd = self.command(out_dir, ranks, list(sets), launcher, config)
        env = {**self.env, **(env or {})}
        if launcher == "slurm":  # the script reads the port from the environment, as under sbatch
            env.update(slurm_env(out_dir.parent / f"slurm-stubs-{self.launches}", ranks, self.ports[-1]))
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        return proc, log

    def kill_after_checkpoint(self, out_dir: Path, tag: str, sets: list[str] = (), timeout: float = 300,
                              config: Path = CONFIG) -> str:
        """Start a 2-rank run, SIGKILL its whole process group (no handler runs: like a node failure) as soon as
        checkpoints/latest reaches `tag`; returns the tag it was killed at."""
        latest = out_dir / "checkpoints" / "latest"
        proc, log = self.start(out_dir, sets=sets, config=config)
        deadline = time.monotonic() + timeout
        while (latest.read_text().strip() if latest.is_file() else "") < tag:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {tag} checkpoint within {timeout} s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return latest.read_text().strip()

    def run(self, out_dir: Path, ranks: int = 2, sets: list[str] = (), timeout: float = 300,
            launcher: str = "deepspeed", env: dict | None = None, config: Path = CONFIG) -> tuple[int, str]:
        proc, log = self.start(out_dir, ranks, sets, launcher, env, config)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise AssertionError(f"trainer did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
        return code, log.read_text()


SRUN = """#!/usr/bin/env bash
# Stub of SLURM's srun for the tests: SLURM_NTASKS tasks of the command on this machine, each with its SLURM_PROCID
# and SLURM_LOCALID (one node); options are ignored; the exit code is the first failing task's, as --kill-on-bad-exit.
# SRUN_NOOP=1: the tasks have nothing left to do (a requeued job whose run already finished) and are not started.
[ -n "${SRUN_NOOP:-}" ] && exit 0
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
# Stub of SLURM's scontrol: the one host, and requeue requests appended to $SCONTROL_LOG.
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  requeue*) echo "requeue $2" >> "$SCONTROL_LOG" ;;
esac
"""


def slurm_env(stub_dir: Path, ranks: int, port: str) -> dict:
    """What sbatch gives jobs/slurm_pretrain.sh on one node, with the stubs first on PATH; requeues go to
    $SCONTROL_LOG = stub_dir/scontrol.log."""
    stub_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stub_dir / name).write_text(text)
        (stub_dir / name).chmod(0o755)
    return {"PATH": f"{stub_dir}:{VENV_BIN}:{os.environ['PATH']}", "SLURM_NTASKS": str(ranks),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-01", "SLURM_CPUS_PER_TASK": "1",
            "MASTER_PORT": port, "SCONTROL_LOG": str(stub_dir / "scontrol.log")}


HAND_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME")


def start_ranks(cmd: list[str], per_rank: list[dict], cwd: list[Path], logs: Path,
                env: dict | None = None) -> list[subprocess.Popen]:
    """Start len(per_rank) processes of `cmd` as the ranks of one world (what a launcher exports, by hand), rank r
    in cwd[r] with per_rank[r] added to its environment; each one's output goes to logs/rank-R.log."""
    base = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in HAND_LAUNCH_VARS}
    base.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                WORLD_SIZE=str(len(per_rank)))
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(cmd, cwd=cwd[r], env={**base, **extra, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=open(logs / f"rank-{r}.log", "w"), stderr=subprocess.STDOUT)
            for r, extra in enumerate(per_rank)]


def wait_all(procs: list[subprocess.Popen], logs: Path, timeout: float) -> tuple[list[int], list[str]]:
    """The exit codes and logs of start_ranks' processes; kills them and fails with their logs after `timeout` s."""
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError("ranks still running after %.0f s:\n%s" % (
            timeout, "\n".join((logs / f"rank-{r}.log").read_text()[-2000:] for r in range(len(procs)))))
    return codes, [(logs / f"rank-{r}.log").read_text() for r in range(len(procs))]


def rank_process(launcher_pid: int, local_rank: int):
    """The training process of `local_rank` under a launcher (deepspeed or torchrun: both export LOCAL_RANK), or None
    while it has not started."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "jobs/pretrain.py" in " ".join(child.cmdline()) and child.environ().get("LOCAL_RANK") == str(local_rank):
                return child
        except psutil.Error:  # exited between the listing and the look
            continue
    return None


@pytest.fixture(scope="module")
def in_process_dist():
    """A process group of one in the test process (jobs.launch.init_distributed), for in-process engines; the
    variables it sets in os.environ are put back afterwards, so later launches do not inherit a port in use."""
    import torch

    from jobs.launch import init_distributed

    saved = dict(os.environ)
    dist = init_distributed()  # gloo on CPU, nccl on CUDA
    yield dist
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def trainer(s3_server, shards_url) -> Trainer:
    return Trainer(s3_server.env, shards_url)
