"""DALI pipeline definitions: encoded JPEG bytes and host-drawn parameters in, normalised NCHW views out.

One definition serves both devices: device_id=None builds a CPU-only pipeline (tests, CPU hosts), an int builds the GPU
one (decode device="mixed": nvJPEG, using the A100/H100 hardware JPEG decoder where present; augmentation on the GPU).
The parameter inputs are CPU external sources either way: DALI takes argument inputs from the CPU only.

Train, per view and independently (CAN_SPEC.md step 1; every number from AugmentConfig, drawn by view_params.py):
  random resized crop (host window -> fn.resize with a relative ROI) -> colour jitter with p -> grayscale p
  -> Gaussian blur p, sigma ~ U(blur_sigma) -> flip p -> normalise (mean/std) -> CHW float32.
  Flip is applied last (in crop_mirror_normalize): the colour ops are per pixel and the blur kernel is symmetric with
  symmetric borders, so the order does not change the result.
  Mask keys do not pass through DALI: the host draws them (U[0, 1), [B, L]) with the other parameters.
  MSCN (aug.mscn set, mscn_graph.py): the blurred view is high-passed (x - GaussianBlur(x, highpass_sigma)) and
  normalised with mean 0 (a high-pass is zero-mean already) and the ImageNet std; one keep mask per masked copy is
  built from host-drawn grids and focal boxes. The noise fill is done by the loader, on the device (mscn_fill.py).
Eval: resize the shorter side to img_size / eval_resize_ratio, centre crop img_size, normalise. No randomness. With
  MSCN's high-pass on, eval views are high-passed too (MSCN App. A.2: the probe sees what pretraining saw).

No DALI random operator is used: every random number is an argument input fed per batch (feed_params), so a batch's
augmentation is a pure function of (seed, rank, batch index) and a resumed run redraws exactly the same ones.
"Apply with probability p" is expressed by the host as identity parameters (factor 1, hue 0, NO_BLUR_SIGMA), so the
graph is static and GPU batches are never split.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from pipeline import mscn_graph
from pipeline.config import AugmentConfig
from pipeline.dali_calls import feed_array
from pipeline.view_params import param_columns

IMAGE_INPUT = "images"  # the external sources feed_images feeds: the encoded bytes, and their lengths
LENGTH_INPUT = "image_lengths"
PARAMS_INPUT = "view_params"  # every view's parameters, one row per sample (feed_params)


def feed_images(pipe: Pipeline, images: np.ndarray | list[np.ndarray], lengths: np.ndarray) -> None:
    """Feed one batch's encoded images: an [n, stride] uint8 array whose row i is image i followed by padding (one
    array: the cheap feed, shm_ring.py), or a list of n uint8 arrays; lengths: the n images' sizes in bytes."""
    if isinstance(images, list):
        pipe.feed_input(IMAGE_INPUT, images)
    else:
        feed_array(pipe, IMAGE_INPUT, images)
    feed_array(pipe, LENGTH_INPUT, np.asarray(lengths, np.int32).reshape(-1, 1))


def _decode(device_id: int | None):
    # no_copy: the loader feeds views of its shared-memory slots and keeps them unchanged until the batch's outputs
    # are out (loader.py), so DALI reads the bytes where the worker process wrote them. Each is cut to its length on
    # DALI's CPU threads (a copy of the encoded bytes, ~6 MB per batch of 64 at 100 KB: not the training thread's).
    padded = fn.external_source(name=IMAGE_INPUT, dtype=types.UINT8, ndim=1, no_copy=True)
    images = fn.slice(padded, shape=fn.external_source(name=LENGTH_INPUT, dtype=types.INT32, ndim=1), axes=[0])
    # Any format nvImageCodec reads (validate.FORMATS). hw_decoder_load: share of JPEGs sent to the hardware decoder
    # on A100/H100; the rest go to CUDA nvJPEG; formats without a GPU decoder are decoded on the CPU threads.
    if device_id is None:
        return fn.decoders.image(images, device="cpu", output_type=types.RGB)
    return fn.decoders.image(images, device="mixed", output_type=types.RGB, hw_decoder_load=0.65)


def _highpass_sigma(aug: AugmentConfig) -> float:
    return aug.mscn.highpass_sigma if aug.mscn is not None else 0.0


def _normalise(x, aug: AugmentConfig, **kw):
    """HWC -> CHW float32 (x - mean) / std; mean 0 after a high-pass, whose output is centred already."""
    mean = [0.0, 0.0, 0.0] if _highpass_sigma(aug) > 0 else list(aug.mean)
    return fn.crop_mirror_normalize(x, mean=mean, std=list(aug.std), dtype=types.FLOAT, output_layout="CHW", **kw)


def _view(img, params, size: int, aug: AugmentConfig, view: int):
    """One augmented view: img HWC uint8 -> CHW float32 normalised, [3, size, size]; params: the PARAMS_INPUT rows
    (view v's K columns at v x K, feed_params)."""
    columns = param_columns(aug)
    k = max(c.stop for c in columns.values())
    p = {f: params[view * k + c.start:view * k + c.stop] if c.stop - c.start > 1 else params[view * k + c.start]
         for f, c in columns.items()}
    # Linear interpolation with antialiasing, as fn.random_resized_crop and torchvision's bilinear + antialias.
    x = fn.resize(img, size=[size, size], roi_start=p["roi_start"], roi_end=p["roi_end"], roi_relative=True)
    if "hue" in p:
        # One fused colour-twist kernel applies brightness, contrast, saturation and hue in DALI's fixed order
        # (torchvision shuffles the four per sample; a fixed order is a documented, accepted difference). Grayscale is
        # saturation 0, folded into the same kernel by the host.
        x = fn.color_twist(x, brightness=p["brightness"], contrast=p["contrast"], saturation=p["saturation"],
                           hue=p["hue"])
    if "sigma" in p:
        x = fn.gaussian_blur(x, sigma=p["sigma"])
    if _highpass_sigma(aug) > 0:
        x = mscn_graph.highpass(x, _highpass_sigma(aug))
    return _normalise(x, aug, mirror=fn.cast(p["mirror"], dtype=types.INT32))


def feed_params(pipe: Pipeline, packed: np.ndarray) -> None:
    """Feed one batch's packed parameters ([V, n, K], pack_params) before the pipeline runs it: as one [n, V x K]
    array, one feed_input for every view (each call costs the training thread tens of microseconds)."""
    views, n, k = packed.shape
    feed_array(pipe, PARAMS_INPUT, packed.transpose(1, 0, 2).reshape(n, views * k))


def _pipeline(batch_size: int, device_id: int | None, num_threads: int, prefetch: int) -> Pipeline:
    """DALI's asynchronous pipelined executor (the default, dynamic one): `prefetch` iterations in flight, run by
    DALI's threads while the loader's thread feeds the next batch; outputs are allocated per iteration, so they can be
    handed to torch without a copy (loader._to_torch)."""
    return Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                    prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True)


def train_pipeline(batch_size: int, img_size: int, num_views: int, aug: AugmentConfig, device_id: int | None,
                   num_threads: int, prefetch: int) -> Pipeline:
    """Outputs, in order: one view [B,3,S,S] float32 per view; with aug.mscn, then one keep mask [B,3,S,S] uint8 per
    masked copy (mscn_graph.keep_masks' order). Inputs: IMAGE_INPUT, feed_params, and with aug.mscn feed_masks."""
    pipe = _pipeline(batch_size, device_id, num_threads, prefetch)
    with pipe:
        img = _decode(device_id)
        params = fn.external_source(name=PARAMS_INPUT, dtype=types.FLOAT, ndim=1)
        views = [_view(img, params, img_size, aug, v) for v in range(num_views)]
        masks = (mscn_graph.keep_masks(aug.mscn, num_views, img_size, device_id is not None)
                 if aug.mscn is not None else [])
        pipe.set_outputs(*views, *masks)
    pipe.build()
    return pipe


def eval_pipeline(batch_size: int, img_size: int, aug: AugmentConfig, device_id: int | None, num_threads: int,
                  prefetch: int) -> Pipeline:
    """One output: view [B,3,S,S] float32, the centre crop of the shorter-side-resized image."""
    pipe = _pipeline(batch_size, device_id, num_threads, prefetch)
    with pipe:
        img = _decode(device_id)
        img = fn.resize(img, resize_shorter=round(img_size / aug.eval_resize_ratio))
        if _highpass_sigma(aug) > 0:  # crop first: the filter sees the view's own borders, as in training
            img = mscn_graph.highpass(fn.crop(img, crop=[img_size, img_size]), _highpass_sigma(aug))
            pipe.set_outputs(_normalise(img, aug))
        else:
            pipe.set_outputs(_normalise(img, aug, crop=[img_size, img_size]))
    pipe.build()
    return pipe
