"""A real S3 endpoint on loopback (moto's server), for the tests and `make demo`.

Everything that talks to S3 in this project goes through the standard AWS environment (AWS_ENDPOINT_URL, keys,
region), so pointing that environment at this server exercises the same code paths a cluster uses: s3fs/fsspec for
ingest and streaming, and DALI's own S3 client for its webdataset reader.

    python -m tools.local_s3 --port 9000     # serve until interrupted, printing the environment to export
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

# Dummy credentials: moto accepts anything, and setting them keeps boto3 from searching the host for real ones.
LOOPBACK_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LocalS3:
    endpoint_url: str

    @property
    def env(self) -> dict[str, str]:
        """The environment a child process needs to reach this endpoint."""
        return {**LOOPBACK_ENV, "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    def make_bucket(self, name: str) -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, **_boto_kwargs())
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


def _boto_kwargs() -> dict:
    return {
        "aws_access_key_id": LOOPBACK_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": LOOPBACK_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": LOOPBACK_ENV["AWS_DEFAULT_REGION"],
    }


def wait_until_up(host: str, port: int, timeout_s: float = 30.0) -> None:
    """Return once a server just started accepts connections on host:port (also used by the benches' HTTP servers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"loopback server on {host}:{port} did not start within {timeout_s:.0f} s")


@contextmanager
def serve(port: int | None = None, set_env: bool = True) -> Iterator[LocalS3]:
    """Run moto's S3 server in a thread of this process; optionally export its endpoint into os.environ."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO: thousands of lines that would bury the demo's and the tests' output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    host, port = "127.0.0.1", port or free_port()
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    wait_until_up(host, port)
    s3 = LocalS3(endpoint_url=f"http://{host}:{port}")
    saved = {k: os.environ.get(k) for k in s3.env}
    if set_env:
        os.environ.update(s3.env)
    try:
        yield s3
    finally:
        server.stop()
        if set_env:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create at start (repeatable)")
    args = parser.parse_args()
    with serve(args.port, set_env=False) as s3:
        for bucket in args.bucket:
            s3.make_bucket(bucket)
        for k, v in s3.env.items():
            print(f"export {k}={v}")
        print("# serving; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
