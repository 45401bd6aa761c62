"""DALI's calls the loader's thread makes every iteration, as the backend calls the public ones end in, without their
per-call Python: feed_input's scan of the operators and probes of the array, a class defined per scheduled call. On
this VM each public call costs the training process's thread tens of microseconds more (tests/pipeline/test_feed.py
holds each to what the public call does). A DALI without these internals gets the public calls."""

from __future__ import annotations

import numpy as np
from nvidia.dali import types
from nvidia.dali.backend import TensorListCPU
from nvidia.dali.pipeline import Pipeline


def feed_array(pipe: Pipeline, name: str, array: np.ndarray, layout: str = "") -> None:
    """Pipeline.feed_input(name, array) for one host array whose rows are the batch's samples (made dense), through
    the backend call feed_input ends in, with the TensorList feed_input would build. The public call first scans the
    pipeline's operators for `name` and probes the array for torch, CuPy, MXNet and DLPack: ~70 us of the calling
    thread's CPU per call on this VM, three calls per iteration, on the training process's thread (bench/input_path.py).
    A DALI without that backend call gets the public one."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)  # DALI takes dense rows only (feed_input refuses strides too)
    backend = getattr(pipe, "_pipe", None)
    if backend is None or not hasattr(backend, "SetExternalTLInput"):
        pipe.feed_input(name, array, layout=layout or None)
        return
    if len(array) > pipe.max_batch_size:  # the backend would take it and fail the next run obscurely
        raise ValueError(f"feeding {len(array)} samples to '{name}' of a pipeline of batch size {pipe.max_batch_size}")
    backend.SetExternalTLInput(name, TensorListCPU(array, layout), None, False)


_RUN_STATE = ("_pipe", "_built", "_first_iter", "_last_iter", "_input_callbacks", "_exec_async", "_exec_dynamic",
              "_batches_to_consume", "_consumer_iter")


def _direct(pipe: Pipeline) -> bool:
    """Whether schedule_run and share_outputs below may make their backend calls directly: a DALI whose pipeline has
    the state they keep (2.4's), a built pipeline past its first schedule_run (which prefetches), with no input
    callbacks and no iter_setup to run, on the asynchronous executor. Else the public calls. What cannot change once
    the pipeline is built is looked at once per pipeline (these calls run every iteration)."""
    fits = pipe.__dict__.get("_direct_calls_fit")
    if fits is None:
        fits = (all(hasattr(pipe, a) for a in _RUN_STATE) and hasattr(types, "_raw_cuda_stream_ptr")
                and not pipe._input_callbacks and pipe._exec_async and type(pipe).iter_setup is Pipeline.iter_setup)
        if not fits or pipe._built:  # (an unbuilt pipeline's callbacks are not known yet: asked again)
            pipe.__dict__["_direct_calls_fit"] = fits
    return fits and pipe._built and pipe._pipe is not None and not pipe._first_iter and not pipe._last_iter


def schedule_run(pipe: Pipeline) -> None:
    """Pipeline.schedule_run for a started pipeline whose inputs are fed: what it does for such a pipeline (count one
    more iteration to consume, run the backend) without its Python around that, which defines a class per call
    (_check_api_type_scope) and walks the input callbacks: ~0.1 ms of the loader thread's CPU per call on this VM."""
    if not _direct(pipe):
        pipe.schedule_run()
        return
    pipe._batches_to_consume += 1
    pipe._pipe.Run()


def share_outputs(pipe: Pipeline, cuda_stream=None):
    """Pipeline.share_outputs(cuda_stream) without its per-call class definition (see schedule_run): the same
    bookkeeping and the same backend call."""
    if not _direct(pipe) or (cuda_stream is not None and not pipe._exec_dynamic):
        return pipe.share_outputs(cuda_stream)  # (the public call says why a stream needs the dynamic executor)
    pipe._consumer_iter += 1
    if pipe._batches_to_consume == 0:
        raise StopIteration
    pipe._batches_to_consume -= 1
    return pipe._pipe.ShareOutputs(types._raw_cuda_stream_ptr(cuda_stream))
