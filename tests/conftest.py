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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """`make test` runs two pytest-xdist workers with --dist loadgroup: a test marked `beside` on one, every other
    test on the other, one after another in file order as without xdist. The learning proof (minutes of one
    compute-bound process) overlaps with the rest, which leaves a core idle about a third of the time (waiting on
    launchers, servers and subprocesses): measured 125% CPU of 2 cores over the whole serial suite. The rest stays
    serial: its timing-sensitive and port-taking tests never meet each other."""
    for item in items:
        if item.get_closest_marker("beside") is None:
            item.add_marker(pytest.mark.xdist_group("serial"))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")
