"""dali_calls.feed_array, schedule_run and share_outputs: DALI's backend calls without the public calls' per-call Python
(feed_input's checks, a class defined per scheduled call). They must do what the public calls do, and refuse what the
backend would accept and fail on later."""

import numpy as np
import pytest
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from pipeline import dali_calls
from pipeline.dali_calls import feed_array


def _pipe(batch: int) -> Pipeline:
    pipe = Pipeline(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=2, exec_async=True,
                    exec_pipelined=True)
    with pipe:
        x = fn.external_source(name="x", dtype=types.FLOAT, ndim=1)
        n = fn.external_source(name="n", dtype=types.INT32, ndim=1)
        pipe.set_outputs(fn.slice(x, shape=n, axes=[0]) * 2)
    pipe.build()
    return pipe


def _run(feed, batches: list[tuple[np.ndarray, np.ndarray]], schedule=Pipeline.schedule_run,
         share=Pipeline.share_outputs, pipe: Pipeline | None = None) -> list[list[np.ndarray]]:
    pipe, out = pipe or _pipe(4), []
    for x, n in batches[:2]:
        feed(pipe, "x", x), feed(pipe, "n", n)
    pipe.schedule_run()  # the first one prefetches: always the public call (dali_calls.schedule_run passes it on)
    for i in range(len(batches)):
        (tl,) = share(pipe)
        out.append([np.array(t) for t in tl])
        pipe.release_outputs()
        if i + 2 < len(batches):
            feed(pipe, "x", batches[i + 2][0]), feed(pipe, "n", batches[i + 2][1])
            schedule(pipe)
    return out


def test_feed_array_feeds_what_feed_input_feeds():
    rng = np.random.default_rng(0)
    batches = [(rng.random((4, 6), dtype=np.float32), rng.integers(1, 7, (4, 1)).astype(np.int32)) for _ in range(4)]
    fast = _run(feed_array, batches)
    public = _run(lambda pipe, name, a: pipe.feed_input(name, a), batches)
    assert len(fast) == 4
    for got, want, (x, n) in zip(fast, public, batches):
        for g, w, row, k in zip(got, want, x, n[:, 0]):
            np.testing.assert_array_equal(g, w)
            np.testing.assert_array_equal(g, row[:k] * 2)


def test_feed_array_refuses_a_batch_larger_than_the_pipeline_and_an_unknown_input():
    pipe = _pipe(4)
    with pytest.raises(ValueError, match="feeding 5 samples to 'x' of a pipeline of batch size 4"):
        feed_array(pipe, "x", np.zeros((5, 3), np.float32))
    with pytest.raises(KeyError, match="y"):
        feed_array(pipe, "y", np.zeros((4, 3), np.float32))


def test_a_strided_array_is_fed_as_its_values():
    pipe = _pipe(4)
    x = np.arange(32, dtype=np.float32).reshape(4, 8)[:, ::2]  # DALI takes dense rows only: feed_array makes them
    feed_array(pipe, "x", x), feed_array(pipe, "n", np.full((4, 1), 4, np.int32))
    feed_array(pipe, "x", x), feed_array(pipe, "n", np.full((4, 1), 4, np.int32))
    pipe.schedule_run()
    (tl,) = pipe.share_outputs()
    np.testing.assert_array_equal(np.stack([np.array(t) for t in tl]), x * 2)


def test_direct_schedule_run_and_share_outputs_do_what_the_public_calls_do():
    rng = np.random.default_rng(1)
    batches = [(rng.random((4, 6), dtype=np.float32), rng.integers(1, 7, (4, 1)).astype(np.int32)) for _ in range(5)]
    public = _run(feed_array, batches)
    pipe = _pipe(4)
    direct = _run(feed_array, batches, dali_calls.schedule_run, dali_calls.share_outputs, pipe)
    assert dali_calls._direct(pipe)  # the direct calls really ran
    for got, want in zip(direct, public, strict=True):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    # The bookkeeping is the public calls': every iteration consumed, and one more is refused as the public call does.
    assert pipe._batches_to_consume == 0
    with pytest.raises(StopIteration):
        dali_calls.share_outputs(pipe)
    with pytest.raises(StopIteration):
        pipe.share_outputs()
    # Mixed in either order, the two keep one count.
    mixed = _run(feed_array, batches, dali_calls.schedule_run, Pipeline.share_outputs)
    mixed2 = _run(feed_array, batches, Pipeline.schedule_run, dali_calls.share_outputs)
    for got in (mixed, mixed2):
        for g, w in zip(got, public, strict=True):
            np.testing.assert_array_equal(g[0], w[0])


def test_a_pipeline_not_yet_started_gets_the_public_calls():
    pipe = _pipe(4)
    assert not dali_calls._direct(pipe)  # before its first schedule_run, which prefetches
    for _ in range(2):
        feed_array(pipe, "x", np.ones((4, 3), np.float32)), feed_array(pipe, "n", np.full((4, 1), 2, np.int32))
    dali_calls.schedule_run(pipe)  # passed on to the public call: it runs both fed iterations
    assert pipe._batches_to_consume == 2 and dali_calls._direct(pipe)
