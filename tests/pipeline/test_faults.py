"""Faults the stream must survive and count: corrupt samples, a missing shard, an S3 endpoint that drops connections."""

from __future__ import annotations

import io
import itertools
import pickle

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.counters import Counters
from pipeline.loader import build_loader
from pipeline.sampler import BatchStream, _Buffered
from pipeline.shards import build_plan
from pipeline.stream import Sample
from pipeline.validate import decodes_fully
from PIL import Image

from tests.pipeline.proxy import FlakyProxy


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
    assert c["skipped_no_image"] == 1 and c["skipped_bad_image"] + c["skipped_decode_error"] == 3
    assert c["samples"] == len(keys) - 4 and c["shards_failed"] == 0


def test_dali_failure_costs_only_the_bad_sample(s3_bucket, shard_writer):
    """With reader validation off, a truncated JPEG reaches DALI and fails its batch: the batch is re-run without it.
    In training with batches of one, the bad sample's batch has nothing left: it is dropped (DALI, which takes no empty
    batch, is fed a stand-in in its place) and training goes on with the next."""
    good = _sample_jpeg()
    keys = shard_writer(s3_bucket + "/d", 1, 12, corrupt={"s0_004": good[: len(good) // 2]})
    got, c = _eval_keys(_cfg(s3_bucket + "/d", validate="none", workers=1))
    assert sorted(got) == sorted(k for k in keys if k != "s0_004")
    assert c["skipped_decode_error"] == 1 and c["samples"] == 11
    train = build_loader(_cfg(s3_bucket + "/d", validate="none", workers=1, mode="train", batch_size=1,
                              shuffle_buffer=0), 0, 1, torch.device("cpu"))
    got = [b["keys"] for b in itertools.islice(train, 13)]
    c = train.counters()
    train.close()
    good_keys = [[k] for k in keys if k != "s0_004"]
    assert got == good_keys + good_keys[:2] and c["skipped_decode_error"] >= 1


def test_a_training_batch_dali_fails_is_dropped_whole_never_delivered_short(s3_bucket, shard_writer, monkeypatch):
    """Every rank's contrastive all-gather needs the same batch size: a training batch that DALI fails goes whole
    (the culprit counted as decode_error, the rest as bad_batch), and the other batch of its DALI iteration goes on.
    When Pillow decodes every image (as when the GPU decoder refuses what Pillow takes: faked here by a Pillow check
    that passes everything) nothing tells which batch failed, and the whole iteration goes."""
    good = _sample_jpeg()
    keys = shard_writer(s3_bucket + "/w", 1, 12, corrupt={"s0_005": good[: len(good) // 2]})
    cfg = _cfg(s3_bucket + "/w", validate="none", workers=1, mode="train", batch_size=4, shuffle_buffer=0)
    # The stream's batches: [0:4], [4:8] (holds s0_005), [8:12], then the next shard-epoch (the same shard, in order).
    first, bad, last = keys[0:4], keys[4:8], keys[8:12]
    for per_iteration in (1, 2):
        for pillow_decodes_it in (False, True):
            monkeypatch.setattr("pipeline.loader.decodes_fully", (lambda data: True) if pillow_decodes_it else
                                decodes_fully)
            train = build_loader(cfg.with_(batches_per_iteration=per_iteration), 0, 1, torch.device("cpu"))
            got = [b["keys"] for b in itertools.islice(train, 4)]
            c = train.counters()
            train.close()
            assert bad not in got
            if per_iteration == 2 and pillow_decodes_it:  # iterations ([0:4], [4:8]) and ([4:8], [8:12]) go whole
                assert got == [last, first, last, first], got
                assert c["skipped_bad_batch"] >= 8 and c["skipped_decode_error"] == 0, c
            else:
                assert got == [first, last, first, last], (per_iteration, pillow_decodes_it, got)
                if pillow_decodes_it:
                    assert c["skipped_bad_batch"] >= 4 and c["skipped_decode_error"] == 0, c
                else:
                    assert c["skipped_decode_error"] >= 1 and c["skipped_bad_batch"] >= 3, c


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


def test_flaky_endpoint_is_retried_and_counted(s3_server, s3_bucket, shard_writer):
    keys = shard_writer(s3_bucket + "/f", 3, 12)
    # 4 ranged reads in flight share the cut connections: 38 of them outlast s3fs's 5 retries of some request.
    proxy = FlakyProxy(s3_server.endpoint_url, last_bad=40)
    # botocore's own retries off; s3fs still retries 5 times inside, then the loader's retries take over.
    opts = {"client_kwargs": {"endpoint_url": proxy.url}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    try:
        got, c = _eval_keys(_cfg(s3_bucket + "/f/shard-{000000..000002}.tar", storage_options=opts,
                                 read_block_bytes=16 << 10, read_retries=8))
    finally:
        proxy.close()
    assert proxy.cut > 0
    assert sorted(got) == sorted(keys) and c["read_retries"] > 0 and c["shards_failed"] == 0


def test_every_format_dali_decodes_streams_and_truncated_ones_are_caught(s3_bucket):
    """Shards as img2dataset writes them with --encode_format png or webp (and TIFF, JPEG 2000, BMP): each format
    streams and is counted, and a truncated upload of each is caught by the reader's cheap structure check
    (skipped_bad_image), not by DALI failing a batch."""
    from pipeline.ingest.writer import write_shard

    rng = np.random.default_rng(1)
    formats = {"jpg": ("JPEG", {}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 90}), "tiff": ("TIFF", {}),
               "jp2": ("JPEG2000", {}), "bmp": ("BMP", {})}
    samples, good = [], []
    for i in range(18):
        ext = list(formats)[i % len(formats)]
        fmt, kw = formats[ext]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, format=fmt, **kw)
        data = buf.getvalue()
        truncated = i >= 12 and ext != "tiff"  # TIFF's IFD offsets allow no cheap end check
        samples.append((f"k{i:03d}", {ext: data[: len(data) // 2] if truncated else data, "json": b"{}"}))
        if not truncated:
            good.append(f"k{i:03d}")
    write_shard(f"{s3_bucket}/formats/shard-000000.tar", samples)
    got, c = _eval_keys(_cfg(f"{s3_bucket}/formats/shard-000000.tar", workers=1))
    assert sorted(got) == good
    assert c["skipped_bad_image"] == 5 and c["skipped_decode_error"] == 0  # no DALI failure, no culprit hunt
    assert {f: c.get(f"format_{f}", 0) for f in ("jpeg", "png", "webp", "tiff", "jpeg2000", "bmp")} == \
        {"jpeg": 2, "png": 2, "webp": 2, "tiff": 3, "jpeg2000": 2, "bmp": 2}


def test_train_resume_is_exact_after_a_shard_cut_short_by_a_fault(s3_server, dataset):
    """The third shard of the one reader's epoch is refused past 16 KB (see FlakyProxy), so it ends at its sample 2
    in the run that saves at batch 4. The resumed run, the fault gone, replays its shuffle buffer from before that
    cut: it stops the shard at the same sample and gives exactly the uninterrupted faulty run's batches, instead of
    reading more of the shard and refusing to resume ("the shards changed"); saved again one batch later, it keeps
    the cut for the next resume, which replays it too. In the next shard-epoch it reads the shard whole (the cut was
    not made permanent): from there on its batches differ from the faulty run's."""
    prefix, _ = dataset
    base = DataConfig(shards=prefix, batch_size=8, img_size=32, patch_size=8, shuffle_buffer=16, workers=1,
                      device="cpu", seed=0, read_block_bytes=8 << 10)
    plan, _ = build_plan(base.sources, 1, base.seed, base.storage_options)
    damaged = plan.train_shards(0, 0)[2].split("://", 1)[1]
    proxy = FlakyProxy(s3_server.endpoint_url, first_bad=0, last_bad=-1, fail_path=damaged, fail_from=16 << 10)
    faulty = base.with_(storage_options={"client_kwargs": {"endpoint_url": proxy.url}})
    try:
        ref = build_loader(faulty, 0, 1, torch.device("cpu"))
        uninterrupted = [b["keys"] for b in itertools.islice(ref, 6)]
        ref.close()
        first = build_loader(faulty, 0, 1, torch.device("cpu"))
        head = [b["keys"] for b in itertools.islice(first, 4)]
        state = pickle.loads(pickle.dumps(first.state_dict()))
        first.close()
    finally:
        proxy.close()
    (stream,) = state["stream"]["workers"].values()
    assert proxy.failed > 0 and stream["cuts"] == {0: [(0, 2, 2)]}  # the cut, in the window the resume re-reads
    resumed = build_loader(base, 0, 1, torch.device("cpu"))  # straight to the server: the fault has gone
    resumed.load_state_dict(state)
    middle = [b["keys"] for b in itertools.islice(resumed, 1)]
    state = pickle.loads(pickle.dumps(resumed.state_dict()))
    resumed.close()
    (stream,) = state["stream"]["workers"].values()
    assert stream["cuts"] == {0: [(0, 2, 2)]}  # still in the window: the next resume replays it again
    resumed = build_loader(base, 0, 1, torch.device("cpu"))
    resumed.load_state_dict(state)
    tail = [b["keys"] for b in itertools.islice(resumed, 4)]
    resumed.close()
    # 6 batches = 48 samples pulled up to the damaged shard's turn in shard-epoch 1 (41 samples an epoch with the cut)
    assert head + middle + tail[:1] == uninterrupted
    shard = int(damaged.rsplit("-", 1)[1].split(".")[0])
    past_the_cut = {f"s{shard}_{i:03d}" for i in range(2, 12)} & {k for b in tail[1:] for k in b}
    assert len(past_the_cut) >= 5, past_the_cut  # (the others are still in the shuffle buffer)


def test_the_state_keeps_exactly_the_cuts_a_replay_rereads():
    """A replay restarts each reader where the oldest buffered sample was pulled: that shard's cut (the sample may
    lie inside the cut shard) and later ones are kept, earlier ones dropped (the state stays small)."""
    stream = BatchStream(None, True, [0], None, Counters(), 1, 4, 0, 0)
    stream.cuts[0] = {(0, 1): 5, (0, 2): 3, (1, 0): 7}
    stream.buffer = [_Buffered(10, Sample("k", b"", "jpeg", -1), ({0: (0, 2, 1)}, [0], 0))]
    assert stream.state()["cuts"] == {0: [(0, 2, 3), (1, 0, 7)]}
    stream.buffer = []  # nothing buffered: no replay, no cut needed
    assert stream.state()["cuts"] == {0: []}
