"""tools/shard.py on a two-node Ray cluster started on this machine, writing to the loopback S3 server.

The cluster is two `ray start --block` processes (a head and a worker node), each with its own temp dir and its own
loopback address (127.0.0.2, 127.0.0.3: Ray turns 127.0.0.1 into the host's network address, and this test must
stay on loopback), one CPU each, token authentication on. One CLI run checks at once: it completes, its tasks ran
on both nodes (report.json counts them), from the package the driver shipped, and its shards, manifest and rejects
equal a local-engine run's on the same S3 sources; and a local --output is refused, naming the reason. One cluster serves the whole session (starting one takes ~10 s).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

from pipeline.ingest.config import IngestConfig
from pipeline.ingest.engine import run_ingest
from tests.ingest.corpus import build_corpus
from tests.ingest.helpers import check_readable, verdicts

_REPO = Path(__file__).resolve().parents[2]
_RAY = str(Path(sys.executable).with_name("ray"))


@dataclass(frozen=True)
class Cluster:
    address: str
    env: dict[str, str]  # what a driver needs: the S3 endpoint and the cluster's auth token
    temp_dirs: tuple[Path, Path]  # head, worker


def _start_node(args: list[str], ip: str, temp_dir: Path, env: dict) -> tuple[subprocess.Popen, str]:
    log = temp_dir / "start.log"
    cmd = [_RAY, "start", "--block", f"--node-ip-address={ip}", "--num-cpus=1", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--object-store-memory=100000000", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text()
        if "Ray runtime started" in text:
            return proc, text
        assert proc.poll() is None, text
        time.sleep(0.25)
    proc.terminate()
    raise AssertionError(f"ray node did not start: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def two_node_cluster(s3_server):
    # Short paths: Ray's unix sockets live under the temp dir, and socket paths are limited to 107 bytes.
    dirs = (Path(tempfile.mkdtemp(prefix="rayh")), Path(tempfile.mkdtemp(prefix="rayw")))
    env = {**os.environ, **s3_server.env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    procs = []
    try:
        head, text = _start_node(["--head", "--port=0", "--include-dashboard=false"], "127.0.0.2", dirs[0], env)
        procs.append(head)
        address = re.search(r"--address='(127\.0\.0\.2:\d+)'", text).group(1)
        procs.append(_start_node([f"--address={address}"], "127.0.0.3", dirs[1], env)[0])
        yield Cluster(address, env, dirs)
    finally:
        for proc in reversed(procs):  # SIGTERM: `ray start --block` drains and stops its own node's processes
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _shard_cli(cluster: Cluster, sources: list[str], output: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/shard.py", *sources, "--output", output, "--engine", "ray", "--ray-address",
           cluster.address, "--samples-per-shard", "5", "--unit-size", "4", "--dedup", "near", "--quiet"]
    return subprocess.run(cmd, env=cluster.env, cwd=_REPO, capture_output=True, text=True, timeout=300)


def test_two_node_cluster_matches_local_engine_and_refuses_local_output(two_node_cluster, s3_bucket, tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    local_sources, _expected = build_corpus(root)
    fs = fsspec.filesystem("s3")
    sources = []
    for src in local_sources:
        fs.put(src, f"{s3_bucket}/raw/{Path(src).name}", recursive=True)
        sources.append(f"{s3_bucket}/raw/{Path(src).name}")

    proc = _shard_cli(two_node_cluster, sources, f"{s3_bucket}/ray")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_ingest(IngestConfig(sources=tuple(sources), output=f"{s3_bucket}/local", samples_per_shard=5, unit_size=4,
                            dedup="near", workers=1, quiet=True))
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    fs.get(f"{s3_bucket}/ray", str(ray_out), recursive=True)
    fs.get(f"{s3_bucket}/local", str(local_out), recursive=True)
    tars = sorted(p.name for p in ray_out.glob("shard-*.tar"))
    assert len(tars) > 1 and tars == sorted(p.name for p in local_out.glob("shard-*.tar"))
    assert all((ray_out / t).read_bytes() == (local_out / t).read_bytes() for t in tars)
    assert verdicts(ray_out) == verdicts(local_out)
    check_readable(ray_out)
    assert json.loads((ray_out / "report.json").read_text())["nodes"] == 2  # tasks ran on both nodes
    for node in two_node_cluster.temp_dirs:  # each node unpacked the package the driver shipped (py_modules)
        assert list(node.glob("session_*/runtime_resources/py_modules_files/*/pipeline/ingest/engine.py")), node

    refused = _shard_cli(two_node_cluster, sources, str(tmp_path / "local-output"))
    assert refused.returncode == 2
    assert "is a local path, but the Ray cluster has 2 nodes" in refused.stderr
    assert not (tmp_path / "local-output").exists()
