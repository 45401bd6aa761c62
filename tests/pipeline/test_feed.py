"""augment.feed_array: DALI's backend call with the TensorList feed_input builds, without feed_input's Python checks.
It must feed what feed_input feeds, and refuse what the backend would accept and fail on later."""

import numpy as np
import pytest
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from pipeline.augment import feed_array


def _pipe(batch: int) -> Pipeline:
    pipe = Pipeline(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=2, exec_async=True,
                    exec_pipelined=True)
    with pipe:
        x = fn.external_source(name="x", dtype=types.FLOAT, ndim=1)
        n = fn.external_source(name="n", dtype=types.INT32, ndim=1)
        pipe.set_outputs(fn.slice(x, shape=n, axes=[0]) * 2)
    pipe.build()
    return pipe


def _run(feed, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[list[np.ndarray]]:
    pipe, out = _pipe(4), []
    for x, n in batches[:2]:
        feed(pipe, "x", x), feed(pipe, "n", n)
    pipe.schedule_run()
    for i in range(len(batches)):
        (tl,) = pipe.share_outputs()
        out.append([np.array(t) for t in tl])
        pipe.release_outputs()
        if i + 2 < len(batches):
            feed(pipe, "x", batches[i + 2][0]), feed(pipe, "n", batches[i + 2][1])
            pipe.schedule_run()
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
