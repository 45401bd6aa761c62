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


# Test files that run on a pytest-xdist worker of their own beside the rest of `make test` (Makefile: -n 2). Only
# the learning proof: with the production-path runs after it there, two 2-rank DeepSpeed runs met on 2 cores and
# both sides slowed (22:02 against 20:44 for the suite, 2,093 against 1,802 CPU-s).
BESIDE = ("tests/eval/test_learning.py",)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: pytest without it (-p no:xdist) must still start
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers (-n 2, xdist's default --dist load): the files in BESIDE on one,
    every other test on the other, each side one test after another in file order as without xdist. The learning
    proof (minutes of one compute-bound process) overlaps with the rest, which leaves a core idle about a third of
    the time (waiting on launchers, servers and subprocesses): measured 125% CPU of 2 cores over the whole serial
    suite, 30:12 in a slow hour against 20:48 with the learning proof beside (144%). The rest stays serial: its
    timing-sensitive tests never meet each other. (xdist's own --dist loadgroup would need the
    groups in node ids, which xdist 3.8 cannot set under pytest 9: its groups are silently ignored there.)"""
    if config.getoption("dist") != "load" or config.getoption("numprocesses") != 2:
        return None  # not make test's -n 2: the user's own --dist / -n, as xdist does it
    from xdist.scheduler import LoadScopeScheduling

    class BesideTheRest(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "beside" if nodeid.split("::")[0] in BESIDE else "the rest"  # one scope each: one worker each

    return BesideTheRest(config, log)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")
