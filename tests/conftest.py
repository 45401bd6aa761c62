"""Shared fixtures: a real S3 endpoint on loopback, and GPU skips that say why."""

from __future__ import annotations

import itertools

import pytest
import torch

from tools import local_s3

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port, exported through the standard AWS environment variables."""
    with local_s3.serve() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket for one test: returns 's3://NAME'."""
    return s3_server.make_bucket(f"test-{next(_bucket_ids)}")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")
