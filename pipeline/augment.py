"""DALI pipeline definitions: encoded JPEG bytes in, normalised NCHW views and per-patch mask keys out.

One definition serves both devices: device_id=None builds a CPU-only pipeline (tests, CPU hosts), an int builds the GPU
one (decode device="mixed": nvJPEG, using the A100/H100 hardware JPEG decoder where present; augmentation on the GPU).

Train, per view and independently (CAN_SPEC.md step 1; every number from AugmentConfig):
  random resized crop -> flip p -> colour jitter with p (brightness, contrast, saturation, hue) -> grayscale p
  -> Gaussian blur p, sigma ~ U(blur_sigma) -> normalise (mean/std) -> CHW float32
  mask keys: U[0, 1) of shape [L] per sample; the model argsorts them into an exact-count mask (CAN_SPEC.md step 2).
Eval: resize the shorter side to img_size / eval_resize_ratio, centre crop img_size, normalise. No masking.

"Apply with probability p" is written as arithmetic on per-sample random arguments rather than DALI conditionals:
a stage that is off for a sample gets its identity parameters (factor 1, hue 0, saturation 0 for grayscale), so the
graph is static and GPU batches are never split.
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from pipeline.config import AugmentConfig

JPEG_INPUT = "jpegs"  # name of the external source the loader feeds with pipe.feed_input
# A blur "off" sample still goes through the blur operator; a sigma this small gives the 3-tap kernel [0, 1, 0]
# (exp(-1 / (2 * 0.01^2)) underflows to 0), i.e. the exact identity, and costs a 3x3 pass.
_NO_BLUR_SIGMA = 0.01


def _decode(device_id: int | None):
    jpegs = fn.external_source(name=JPEG_INPUT, dtype=types.UINT8, ndim=1)
    # hw_decoder_load: share of images sent to the hardware decoder on A100/H100; the rest go to CUDA nvJPEG.
    if device_id is None:
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=0.65)


def _uniform_around_one(on, strength: float):
    """Factor 1 + on * U(max(0, 1 - s) - 1, s): torchvision's [max(0, 1 - s), 1 + s] when on, 1 when off."""
    return 1.0 + on * fn.random.uniform(range=[max(0.0, 1.0 - strength) - 1.0, strength])


def _view(img, size: int, aug: AugmentConfig):
    """One augmented view: img HWC uint8 -> CHW float32 normalised, [3, size, size]."""
    x = fn.random_resized_crop(img, size=[size, size], random_area=list(aug.crop_scale),
                               random_aspect_ratio=list(aug.crop_ratio))
    if aug.jitter_p > 0 or aug.grayscale_p > 0:
        on = fn.random.coin_flip(probability=aug.jitter_p)
        keep_colour = 1 - fn.random.coin_flip(probability=aug.grayscale_p)
        # Grayscale as saturation 0 after the jitter: one fused colour-twist kernel does both.
        x = fn.color_twist(x, brightness=_uniform_around_one(on, aug.brightness),
                           contrast=_uniform_around_one(on, aug.contrast),
                           saturation=_uniform_around_one(on, aug.saturation) * keep_colour,
                           hue=on * fn.random.uniform(range=[-aug.hue * 360.0, aug.hue * 360.0]))
    if aug.blur_p > 0:
        blur = fn.random.coin_flip(probability=aug.blur_p)
        sigma = blur * fn.random.uniform(range=list(aug.blur_sigma)) + (1 - blur) * _NO_BLUR_SIGMA
        x = fn.gaussian_blur(x, sigma=sigma)
    mirror = fn.random.coin_flip(probability=aug.flip_p) if aug.flip_p > 0 else 0
    return fn.crop_mirror_normalize(x, mirror=mirror, mean=list(aug.mean), std=list(aug.std), dtype=types.FLOAT,
                                    output_layout="CHW")


def train_pipeline(batch_size: int, img_size: int, num_patches: int, num_views: int, aug: AugmentConfig,
                   device_id: int | None, num_threads: int, prefetch: int, seed: int) -> Pipeline:
    """Outputs, in order: per view (view [B,3,S,S] float32, mask_keys [B,L] float32 in [0, 1))."""
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=prefetch, exec_async=False, exec_pipelined=False)
    with pipe:
        img = _decode(device_id)
        outputs = []
        for _ in range(num_views):
            outputs.append(_view(img, img_size, aug))
            outputs.append(fn.random.uniform(range=[0.0, 1.0], shape=[num_patches], dtype=types.FLOAT))
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


def eval_pipeline(batch_size: int, img_size: int, aug: AugmentConfig, device_id: int | None, num_threads: int,
                  prefetch: int, seed: int) -> Pipeline:
    """One output: view [B,3,S,S] float32, the centre crop of the shorter-side-resized image."""
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=prefetch, exec_async=False, exec_pipelined=False)
    with pipe:
        img = _decode(device_id)
        img = fn.resize(img, resize_shorter=round(img_size / aug.eval_resize_ratio))
        pipe.set_outputs(fn.crop_mirror_normalize(img, crop=[img_size, img_size], mean=list(aug.mean),
                                                  std=list(aug.std), dtype=types.FLOAT, output_layout="CHW"))
    pipe.build()
    return pipe
