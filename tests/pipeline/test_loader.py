"""The real entry point, build_loader, on CPU DALI with shards on the loopback S3 server."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch

from pipeline.config import AugmentConfig, DataConfig
from pipeline.loader import build_loader

B, IMG, PATCH = 8, 32, 8
L = (IMG // PATCH) ** 2


def _cfg(shards: str, **kw) -> DataConfig:
    base = dict(shards=shards, batch_size=B, img_size=IMG, patch_size=PATCH, shuffle_buffer=16, workers=2,
                device="cpu", seed=0)
    return DataConfig(**{**base, **kw})


def _take(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


def _eval_keys(cfg: DataConfig, world: int) -> list[list[str]]:
    keys = []
    for rank in range(world):
        loader = build_loader(cfg, rank, world, torch.device("cpu"))
        keys.append([k for b in loader for k in b["keys"]])
        loader.close()
    return keys


def test_train_batch_layout_and_values(dataset):
    prefix, keys = dataset
    loader = build_loader(_cfg(prefix), 0, 1, torch.device("cpu"))
    batches = _take(loader, 3)
    loader.close()
    for b in batches:
        assert set(b) == {"view1", "view2", "mask_keys1", "mask_keys2", "keys", "labels"}
        for v in ("view1", "view2"):
            assert b[v].shape == (B, 3, IMG, IMG) and b[v].dtype == torch.float32
            # ImageNet-normalised pixels of 0..255 images lie in [-2.12, 2.64]
            assert b[v].min() >= -2.2 and b[v].max() <= 2.7 and b[v].abs().mean() > 0.1
        for m in ("mask_keys1", "mask_keys2"):
            assert b[m].shape == (B, L) and b[m].dtype == torch.float32
            assert 0 <= b[m].min() and b[m].max() < 1
        assert not torch.equal(b["mask_keys1"], b["mask_keys2"])
        # Two independent augmentations of the same image differ, sample by sample.
        assert ((b["view1"] - b["view2"]).flatten(1).abs().amax(1) > 0.1).all()
        assert b["labels"].dtype == torch.long and b["labels"].shape == (B,)
        assert len(b["keys"]) == B and set(b["keys"]) <= set(keys)
        expected = [(int(k[1]) * 12 + int(k.split("_")[1])) % 10 for k in b["keys"]]
        assert b["labels"].tolist() == expected
    c = loader.counters()
    assert c["samples"] == 3 * B and c["decoded"] >= 3 * B and c["skipped"] == 0


def test_mae_preset_gives_one_view_and_unlabelled_is_minus_one(s3_bucket, shard_writer):
    shard_writer(s3_bucket + "/u", 1, 10, labelled=False)
    cfg = _cfg(s3_bucket + "/u", num_views=1, augment=AugmentConfig.preset("mae"), workers=1, shuffle_buffer=0)
    loader = build_loader(cfg, 0, 1, torch.device("cpu"))
    (b,) = _take(loader, 1)
    loader.close()
    assert set(b) == {"view1", "mask_keys1", "keys", "labels"} and b["view1"].shape == (B, 3, IMG, IMG)
    assert (b["labels"] == -1).all()


def test_eval_is_deterministic_and_unmasked(dataset):
    prefix, keys = dataset
    cfg = _cfg(prefix, mode="eval")
    runs = []
    for _ in range(2):
        loader = build_loader(cfg, 0, 1, torch.device("cpu"))
        runs.append(list(loader))
        loader.close()
    assert [b["keys"] for b in runs[0]] == [b["keys"] for b in runs[1]]
    assert all(torch.equal(a["view1"], b["view1"]) for a, b in zip(*runs))
    assert set(runs[0][0]) == {"view1", "keys", "labels"}
    assert sorted(k for b in runs[0] for k in b["keys"]) == sorted(keys)


def test_two_ranks_two_workers_read_disjoint_shards(dataset):
    """4 shards, 2 ranks x 2 worker processes: in train mode's first shard-epoch each worker owns one whole shard and
    makes whole batches from it, the rank taking its workers' batches in turn (one batch a turn here: with two a
    turn, as batches_per_iteration's default, both of a rank's first two batches are worker 0's)."""
    prefix, keys = dataset
    cfg = _cfg(prefix, shuffle_buffer=0, batches_per_iteration=1)
    shard_of_batch = []
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, torch.device("cpu"))
        for b in _take(loader, 2):  # one batch from each worker
            shards = {k.split("_")[0] for k in b["keys"]}
            assert len(shards) == 1 and len(b["keys"]) == B
            shard_of_batch.append(shards.pop())
        loader.close()
    assert sorted(shard_of_batch) == ["s0", "s1", "s2", "s3"]
    # The same layout in eval mode: every sample once across ranks.
    ev = _eval_keys(_cfg(prefix, mode="eval"), 2)
    assert not set(ev[0]) & set(ev[1]) and sorted(ev[0] + ev[1]) == sorted(keys)


def test_equal_steps_per_rank_with_fewer_shards_than_readers(s3_bucket, shard_writer):
    """3 shards x 12 samples for 4 readers: train mode resamples, so both ranks give the same full steps."""
    keys = shard_writer(s3_bucket + "/three", 3, 12)
    cfg = _cfg(s3_bucket + "/three", steps_per_epoch=7)
    counts = []
    for rank in range(2):
        loader = build_loader(cfg, rank, 2, torch.device("cpu"))
        batches = list(loader)  # 7 x 8 = 56 samples per rank: more than one pass over the shards
        loader.close()
        counts.append([len(b["keys"]) for b in batches])
        assert set(k for b in batches for k in b["keys"]) <= set(keys)
    assert counts == [[B] * 7, [B] * 7]
    # Eval on the same shards: 3 shards over 4 readers, uneven per rank, every sample once, last batch partial.
    ev = _eval_keys(_cfg(s3_bucket + "/three", mode="eval"), 2)
    assert sorted(ev[0] + ev[1]) == sorted(keys) and len(ev[0]) != len(ev[1])


def test_eval_resume_yields_exactly_the_rest(dataset):
    prefix, keys = dataset
    cfg = _cfg(prefix, mode="eval", batch_size=5)
    full = build_loader(cfg, 0, 1, torch.device("cpu"))
    uninterrupted = [k for b in full for k in b["keys"]]
    full.close()
    first = build_loader(cfg, 0, 1, torch.device("cpu"))
    head = [k for b in _take(first, 3) for k in b["keys"]]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # goes into a checkpoint
    first.close()
    resumed = build_loader(cfg, 0, 1, torch.device("cpu"))
    resumed.load_state_dict(state)
    tail = [k for b in resumed for k in b["keys"]]
    resumed.close()
    assert head + tail == uninterrupted and sorted(uninterrupted) == sorted(keys)


def _assert_identical(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) and x["keys"] == y["keys"]
        for k in x:
            if k != "keys":
                assert torch.equal(x[k], y[k]), k


def _resumed(cfg: DataConfig, state: dict, n: int) -> tuple[list[dict], dict]:
    loader = build_loader(cfg, 0, 1, torch.device("cpu"))
    loader.load_state_dict(pickle.loads(pickle.dumps(state)))  # goes through a checkpoint
    batches = _take(loader, n)
    state = loader.state_dict()
    loader.close()
    return batches, state


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_train_resume_is_exact(dataset, shuffle_buffer):
    """Kill and restart at batch 4, then again at batch 7: the batches (keys, labels, both views, both mask keys) are
    identical to an uninterrupted run's, across a shard-epoch boundary (48 samples = 6 batches), with 2 readers."""
    prefix, _ = dataset
    cfg = _cfg(prefix, shuffle_buffer=shuffle_buffer, workers=2)
    ref = build_loader(cfg, 0, 1, torch.device("cpu"))
    uninterrupted = _take(ref, 10)
    ref.close()
    first = build_loader(cfg, 0, 1, torch.device("cpu"))
    head = _take(first, 4)
    state = first.state_dict()
    first.close()
    middle, state = _resumed(cfg, state, 3)
    tail, _ = _resumed(cfg, state, 3)
    _assert_identical(head + middle + tail, uninterrupted)
    if shuffle_buffer:  # the buffer really shuffles: the order is not the plain round-robin order
        plain = build_loader(cfg.with_(shuffle_buffer=0), 0, 1, torch.device("cpu"))
        assert [b["keys"] for b in _take(plain, 3)] != [b["keys"] for b in uninterrupted[:3]]
        plain.close()


def test_batches_per_iteration_changes_which_batch_comes_when_never_a_batch(dataset):
    """DALI makes batches_per_iteration batches of one worker per iteration. Each batch is the same whatever that
    number (its draws are seeded by its own number): with one worker the runs are identical, with two they hold the
    same batches in another order. A state saved in the middle of an iteration resumes exactly, under the same or
    another number: the worker starts again from before the iteration and the batches already taken are dropped."""
    prefix, _ = dataset
    one = _cfg(prefix, workers=1, batches_per_iteration=1)
    ref = build_loader(one, 0, 1, torch.device("cpu"))
    uninterrupted = _take(ref, 8)
    ref.close()
    two = one.with_(batches_per_iteration=2)
    first = build_loader(two, 0, 1, torch.device("cpu"))
    head = _take(first, 3)
    state = first.state_dict()
    first.close()
    _assert_identical(head, uninterrupted[:3])
    assert state["stream"]["skip"] == {0: 1}  # batch 2 of 0..3 taken: its iteration's first batch is made again
    for resumed_as in (two, one, one.with_(batches_per_iteration=3)):
        tail, _ = _resumed(resumed_as, state, 5)
        _assert_identical(head + tail, uninterrupted)
    # Two workers: worker w's k-th batch is the same batch; one per turn, or two per turn.
    taken, by_worker = {}, {}
    for per_iteration in (1, 2):
        loader = build_loader(one.with_(workers=2, batches_per_iteration=per_iteration), 0, 1, torch.device("cpu"))
        taken[per_iteration] = _take(loader, 8)
        loader.close()
        # (worker, its batch number) of the rank's i-th batch
        made = [(i % 2, i // 2) if per_iteration == 1 else (i // 2 % 2, i // 4 * 2 + i % 2) for i in range(8)]
        by_worker[per_iteration] = [b for _, b in sorted(zip(made, taken[per_iteration]), key=lambda t: t[0])]
    assert taken[2][1]["keys"] != taken[1][1]["keys"]  # worker 0's second batch, not worker 1's first
    _assert_identical(by_worker[2], by_worker[1])


def test_one_slow_shard_holds_up_only_an_ordered_loader(s3_server, dataset):
    """Reads of the shard worker 0 reads first are held up (a throttled object). An ordered loader still gives
    exactly the batches of an unhindered run: the order is the workers' turns, not their timing. An unordered one,
    with that shard's reads held 10 s each, gives the other workers' batches in the meantime: one slow worker's stall
    is not the rank's."""
    from tests.pipeline.proxy import FlakyProxy

    prefix, _ = dataset
    # No shuffle buffer: each worker's first batch holds only its first shard (12 samples), so the fast workers' first
    # batches do not depend on the slow shard (which may come next in their own shard sequence).
    base = _cfg(prefix, shuffle_buffer=0, workers=3)
    ref = build_loader(base, 0, 1, torch.device("cpu"))
    expected = _take(ref, 5)
    ref.close()
    first_shard = int(expected[0]["keys"][0].split("_")[0][1:])  # keys are s{shard}_{i}; worker 0 made batch 0
    slow = prefix.split("://", 1)[1] + f"/shard-{first_shard:06d}.tar"
    batches = {}
    for ordered, delay in ((True, 0.3), (False, 10.0)):
        proxy = FlakyProxy(s3_server.endpoint_url, first_bad=0, last_bad=-1, slow_path=slow, slow_s=delay)
        cfg = base.with_(storage_options={"client_kwargs": {"endpoint_url": proxy.url}}, ordered=ordered)
        loader = build_loader(cfg, 0, 1, torch.device("cpu"))
        batches[ordered] = _take(loader, 5 if ordered else 2)
        loader.close()
        proxy.close()
        assert any(slow.encode() in line for _, line in proxy.requests)  # the fault was on the path
    _assert_identical(batches[True], expected)
    # Any batch with a sample of the slow shard waits 10 s for it; the fast workers' batches come first.
    assert not any(k.startswith(f"s{first_shard}_") for b in batches[False] for k in b["keys"])


def test_state_from_another_layout_is_refused(dataset):
    prefix, _ = dataset
    loader = build_loader(_cfg(prefix, mode="eval"), 0, 1, torch.device("cpu"))
    state = loader.state_dict()
    other = build_loader(_cfg(prefix, mode="eval"), 0, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(state)


def test_worker_processes_end_when_the_training_process_is_killed(dataset, tmp_path):
    """A rank killed with SIGKILL (a node failure, the OOM killer) runs no cleanup: its loader's worker processes and
    their forkserver must still go, not wait on their shared-memory slots for ever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    prefix, _ = dataset
    script = tmp_path / "rank.py"
    script.write_text(f"""
import itertools, sys, time, torch
from pipeline.config import DataConfig
from pipeline.loader import build_loader
if __name__ == "__main__":
    cfg = DataConfig(shards={prefix!r}, batch_size=8, img_size=32, patch_size=8, workers=2, device="cpu")
    loader = build_loader(cfg, 0, 1, torch.device("cpu"))
    list(itertools.islice(loader, 2))
    print("streaming", flush=True)
    time.sleep(600)
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout.readline().strip() == "streaming"
    helpers = psutil.Process(proc.pid).children(recursive=True)  # the forkserver and the two workers
    assert len(helpers) >= 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in helpers):
        assert time.monotonic() < deadline, [p.cmdline()[:3] for p in helpers if p.is_running()]
        time.sleep(0.2)


def test_a_worker_killed_mid_message_is_named_not_waited_for(dataset):
    """The OOM killer takes a loader worker while it is writing a message (a batch's mask keys alone, [2, 16, 1024]
    float32, are twice a pipe's 64 KB, so a worker ahead of its loader is blocked mid-message): the rank fails at once,
    naming the worker and its exit code, instead of waiting for the rest of that message or its batches for ever."""
    import os
    import signal
    import time

    prefix, _ = dataset
    loader = build_loader(_cfg(prefix, workers=2, batch_size=16, img_size=128, patch_size=4), 0, 1,
                          torch.device("cpu"))
    it = iter(loader)
    next(it)
    time.sleep(1.0)  # the workers write ahead until their credits run out: worker 1 stops inside a message
    os.kill(loader._active.pool.procs[1].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="data pipeline failed") as failure:
        for _ in range(50):
            next(it)
    assert "loader worker 1" in str(failure.value.__cause__) and "exit code -9" in str(failure.value.__cause__)
    loader.close()


def test_batches_larger_than_their_slots_go_inline_and_stay_bounded(dataset):
    """Slots of 3,000 bytes a sample (the images are 1.3-3.8 KB): batches whose longest image x 8 does not fit go
    back to back in the slot (a list feed) and give the same values as at a uniform stride. slot_bytes_per_sample=1:
    every batch travels inline through the pipe, with the same values, and holds one of its worker's credits until
    the loader is done with it, so a worker whose batches do not fit its slots still runs at most worker_prefetch
    batches ahead (it ran ahead without bound, growing its memory)."""
    import time

    from pipeline.worker_pool import PoolClosed

    prefix, _ = dataset
    cfg = _cfg(prefix, workers=2, worker_prefetch=3)
    ref = build_loader(cfg, 0, 1, torch.device("cpu"))
    expected = _take(ref, 4)
    assert ref.counters()["batches_packed"] == 0
    ref.close()
    packed = build_loader(cfg.with_(slot_bytes_per_sample=3000), 0, 1, torch.device("cpu"))
    _assert_identical(_take(packed, 4), expected)
    assert packed.counters()["batches_packed"] >= 1 and packed.counters()["batches_over_slot"] == 0
    packed.close()
    loader = build_loader(cfg.with_(slot_bytes_per_sample=1), 0, 1, torch.device("cpu"))
    try:
        got = _take(loader, 4)
        _assert_identical(got, expected)
        time.sleep(1.0)  # the loader's thread has filled DALI and waits for the trainer; the workers use their credits
        pool, extra = loader._active.pool, 0
        deadline = time.monotonic() + 1.5
        try:
            while time.monotonic() < deadline:  # read whatever the workers still send, without giving credits back
                pool._receive(deadline)
                extra += 1
        except (RuntimeError, PoolClosed):  # the deadline: nothing more came
            pass
        assert loader.counters()["batches_over_slot"] >= 4  # the inline path really ran
        assert extra <= 2 * cfg.worker_prefetch, extra
    finally:
        loader.close()


def test_unordered_eval_resumes_after_a_worker_has_ended(s3_bucket, shard_writer):
    """Eval, unordered, 2 workers over 3 shards (one worker has half the other's): saved after one worker's end, the
    resumed pass yields exactly the rest (the ended worker, restarted, only repeats its end)."""
    prefix = s3_bucket + "/three"
    keys = shard_writer(prefix, 3, 12)
    cfg = _cfg(prefix, mode="eval", batch_size=5, ordered=False)
    for _ in range(3):  # arrival order decides when the first End is taken: rarely after the last batch (try again)
        first = build_loader(cfg, 0, 1, torch.device("cpu"))
        head = []
        for batch in first:
            head += batch["keys"]
            if len(first.state_dict()["stream"]["position"]["active"]) == 1:
                break
        state = pickle.loads(pickle.dumps(first.state_dict()))
        first.close()
        if len(head) < len(keys):
            break
    assert len(head) < len(keys) and len(state["stream"]["position"]["active"]) == 1
    resumed = build_loader(cfg, 0, 1, torch.device("cpu"))
    resumed.load_state_dict(state)
    tail = [k for b in resumed for k in b["keys"]]
    resumed.close()
    assert sorted(head + tail) == sorted(keys) and len(head + tail) == len(keys)


def test_the_signals_slurm_sends_a_whole_job_step_leave_the_loader_running(dataset):
    """SLURM's --signal=USR1, scancel and preemption signal every process of the step, not only the ranks: the
    loader's workers, their forkserver and multiprocessing's resource tracker must outlive SIGUSR1, SIGUSR2, SIGTERM
    and SIGINT, so the rank can take the batches of the steps until its checkpoint (they died of SIGUSR1 before)."""
    import os
    import signal
    import time
    from multiprocessing import resource_tracker

    import psutil

    prefix, _ = dataset
    loader = build_loader(_cfg(prefix, workers=2), 0, 1, torch.device("cpu"))
    try:
        it = iter(loader)
        next(it)
        workers = [p.pid for p in loader._active.pool.procs]
        processes = {*workers, psutil.Process(workers[0]).ppid(), resource_tracker._resource_tracker._pid}
        assert os.getpid() not in processes and None not in processes
        for pid in processes:
            for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
                os.kill(pid, sig)
        time.sleep(0.5)
        assert all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in processes)
        assert len(_take(loader, 20)) == 20
    finally:
        loader.close()


def test_iterations_of_two_batches_take_the_shared_memory_of_one_batch_slots():
    """A worker's slots hold one DALI iteration each: production's 4 workers with worker_prefetch 4 get 2 slots of 2
    batches, the same reserved /dev/shm as 4 slots of 1. One worker gets one slot more than DALI can hold of its
    iterations (prefetch 2), so it always has one to fill."""
    from pipeline.loader import slot_bytes, worker_slots

    cfg = DataConfig(shards="s3://b/p", workers=4, worker_prefetch=4)
    one = cfg.with_(batches_per_iteration=1)
    assert (worker_slots(cfg), worker_slots(one)) == (2, 4)
    assert worker_slots(cfg) * slot_bytes(cfg, True) == worker_slots(one) * slot_bytes(one, True)
    assert worker_slots(cfg.with_(workers=1)) == 3
    assert worker_slots(cfg.with_(mode="eval")) == 4 and slot_bytes(cfg.with_(mode="eval"), False) == \
        slot_bytes(one, False)


def test_one_worker_with_one_batch_ahead_starts(dataset):
    """workers 1, worker_prefetch 1, prefetch 2: DALI's first run needs two of the worker's iterations before any slot
    comes back. With worker_prefetch slots (1) the loader waited for the second, the worker for a free slot: no batch,
    for ever. worker_slots gives it one slot more than DALI holds."""
    import threading

    prefix, _ = dataset
    loader = build_loader(_cfg(prefix, workers=1, worker_prefetch=1, prefetch=2), 0, 1, torch.device("cpu"))
    got: list = []
    taker = threading.Thread(target=lambda: got.extend(_take(loader, 5)), daemon=True)
    taker.start()
    taker.join(60)
    try:
        assert len(got) == 5, f"{len(got)} batches in 60 s"
    finally:
        loader.close()
