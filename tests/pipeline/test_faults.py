"""Faults the stream must survive and count: corrupt samples, a missing shard, an S3 endpoint that drops connections."""

from __future__ import annotations

import io
import socket
import threading
from urllib.parse import urlparse

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.loader import build_loader
from PIL import Image


def _eval_keys(cfg: DataConfig) -> tuple[list[str], dict[str, float]]:
    loader = build_loader(cfg, 0, 1, torch.device("cpu"))
    keys = [k for b in loader for k in b["keys"]]
    counters = loader.counters()
    loader.close()
    return keys, counters


def _cfg(shards: str, **kw) -> DataConfig:
    base = dict(shards=shards, mode="eval", batch_size=8, img_size=32, patch_size=8, workers=2, device="cpu",
                retry_backoff_s=0.01)
    return DataConfig(**{**base, **kw})


def _sample_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((96, 80, 3)) * 255).astype("uint8")).save(buf, format="JPEG")
    return buf.getvalue()


def _corruptions(jpeg: bytes) -> dict[str, bytes | None]:
    sos = jpeg.find(b"\xff\xda")
    return {
        "s0_002": jpeg[: len(jpeg) // 2],  # truncated upload: no EOI
        "s0_005": b"\xff\xd8" + b"\x00" * 300 + b"\xff\xd9",  # markers right, nothing decodable between them
        "s1_003": None,  # a sample without an image
        "s1_007": jpeg[: sos + 4] + b"\xff\xff" * 40 + jpeg[sos + 84 :],  # broken scan header
    }


def test_corrupt_samples_are_skipped_and_counted(s3_bucket, shard_writer):
    good = _sample_jpeg()
    bad = _corruptions(good)
    keys = shard_writer(s3_bucket + "/c", 2, 10, corrupt=bad)
    got, c = _eval_keys(_cfg(s3_bucket + "/c"))
    assert sorted(got) == sorted(k for k in keys if k not in bad)
    assert c["skipped_no_image"] == 1 and c["skipped_bad_jpeg"] + c["skipped_decode_error"] == 3
    assert c["samples"] == len(keys) - 4 and c["shards_failed"] == 0


def test_dali_failure_costs_only_the_bad_sample(s3_bucket, shard_writer):
    """With reader validation off, a truncated JPEG reaches DALI and fails its batch: the batch is re-run without it."""
    good = _sample_jpeg()
    keys = shard_writer(s3_bucket + "/d", 1, 12, corrupt={"s0_004": good[: len(good) // 2]})
    got, c = _eval_keys(_cfg(s3_bucket + "/d", validate="none", workers=1))
    assert sorted(got) == sorted(k for k in keys if k != "s0_004")
    assert c["skipped_decode_error"] == 1 and c["samples"] == 11


def test_missing_shard_is_skipped_with_a_warning(dataset, caplog):
    prefix, keys = dataset
    # The pattern names 6 shards; 4 exist. Training must go on: in train mode too.
    got, c = _eval_keys(_cfg(prefix + "/shard-{000000..000005}.tar"))
    assert sorted(got) == sorted(keys) and c["shards_failed"] == 2
    assert any("shard-000005.tar" in r.getMessage() for r in caplog.records)
    train = build_loader(_cfg(prefix + "/shard-{000000..000005}.tar", mode="train", steps_per_epoch=8,
                              shuffle_buffer=8), 0, 1, torch.device("cpu"))
    assert [len(b["keys"]) for b in train] == [8] * 8 and train.counters()["shards_failed"] >= 1
    train.close()


class FlakyProxy:
    """Loopback TCP proxy to the S3 server that cuts connections number `first_bad` to `last_bad` after `cut_after`
    response bytes: the client sees a reset mid-body, as in a long read from a real object store during an outage.
    The outage outlasts s3fs's own 5 retries, so the loader's retry loop must take over."""

    def __init__(self, target: str, first_bad: int = 3, last_bad: int = 14, cut_after: int = 3000):
        u = urlparse(target)
        self.target, self.bad, self.cut_after = (u.hostname, u.port), range(first_bad, last_bad + 1), cut_after
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = self.cut = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut_after if self.connections in self.bad else None
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    self.cut += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_flaky_endpoint_is_retried_and_counted(s3_server, s3_bucket, shard_writer):
    keys = shard_writer(s3_bucket + "/f", 3, 12)
    proxy = FlakyProxy(s3_server.endpoint_url)
    # botocore's own retries off; s3fs still retries 5 times inside, then the loader's loop takes over.
    opts = {"client_kwargs": {"endpoint_url": proxy.url}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    try:
        got, c = _eval_keys(_cfg(s3_bucket + "/f/shard-{000000..000002}.tar", storage_options=opts,
                                 read_block_bytes=16 << 10))
    finally:
        proxy.close()
    assert proxy.cut > 0
    assert sorted(got) == sorted(keys) and c["read_retries"] > 0 and c["shards_failed"] == 0
