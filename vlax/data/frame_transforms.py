"""Frame-level transforms on tf.data: decode + resize images, and image augmentation.

A frame is one step of a chunked trajectory: images are ``[W]`` encoded strings (or ``[W, h, w, 3]`` uint8) and
become ``uint8 [W, H, W_img, 3]``. Goal images under ``task`` (from goal relabelling) are ``[]`` strings and become
``uint8 [H, W_img, 3]``. Augmentation draws one set of parameters per camera and frame, shared over the window, from
a stateless ``seed`` int64 [2].
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from vlax.data.resize import check_resize_mode, padded_extent


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Image augmentation (applied in this order). Defaults follow common VLA training recipes."""

    crop_scale: tuple[float, float] = (0.8, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # aspect ratio of the crop
    brightness: float = 0.2  # max additive delta
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.05  # max hue delta (fraction of the colour circle)


def _decode_one(encoded: tf.Tensor, size: tuple[int, int], mode: str) -> tf.Tensor:
    def decode():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return _resize(image, size, mode)

    return tf.cond(tf.strings.length(encoded) > 0, decode, lambda: tf.zeros([*size, 3], tf.uint8))


def _resize(image: tf.Tensor, size: tuple[int, int], mode: str = "stretch") -> tf.Tensor:
    if image.shape[-3:-1] == tuple(size):
        return tf.cast(image, tf.uint8)
    if mode == "pad":
        return _resize_with_pad(image, size)
    resized = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _resize_with_pad(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """``[..., h, w, 3]`` -> ``[..., H, W, 3]`` keeping the aspect ratio, zeros on the left and top."""
    if image.shape[-3] is not None and image.shape[-2] is not None:
        rh, rw = padded_extent(int(image.shape[-3]), int(image.shape[-2]), size)
    else:  # a decoded frame of unknown static shape: the same arithmetic on the dynamic one
        shape = tf.cast(tf.shape(image)[-3:-1], tf.float64)
        ratio = tf.maximum(shape[1] / size[1], shape[0] / size[0])
        rh, rw = tf.cast(shape[0] / ratio, tf.int32), tf.cast(shape[1] / ratio, tf.int32)
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([rh, rw]), method="bilinear", antialias=False)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    rank = len(image.shape)
    pads = [[0, 0]] * (rank - 3) + [[size[0] - rh, 0], [size[1] - rw, 0], [0, 0]]
    padded = tf.pad(resized, pads)
    return tf.ensure_shape(padded, [*image.shape[:-3], size[0], size[1], 3])


def decode_and_resize_image(image: tf.Tensor, size: tuple[int, int], mode: str = "stretch") -> tf.Tensor:
    """Encoded string [...] or uint8 [..., h, w, 3] -> uint8 [..., H, W, 3]; empty strings give zeros. ``mode``:
    one of :data:`vlax.data.resize.RESIZE_MODES`."""
    size = tuple(int(s) for s in size)
    check_resize_mode(mode)
    if image.dtype == tf.string:
        if image.shape.rank == 0:
            return _decode_one(image, size, mode)
        flat = tf.reshape(image, [-1])
        decoded = tf.map_fn(
            lambda e: _decode_one(e, size, mode), flat, fn_output_signature=tf.TensorSpec([*size, 3], tf.uint8)
        )
        return tf.reshape(decoded, tf.concat([tf.shape(image), [size[0], size[1], 3]], axis=0))
    return _resize(image, size, mode)


def decode_and_resize(frame: dict, image_sizes: dict[str, tuple[int, int]], mode: str = "stretch") -> dict:
    """Decodes and resizes every ``image_<camera>`` under ``observation`` and ``task`` (``mode``: see
    :data:`vlax.data.resize.RESIZE_MODES`).

    ``image_sizes`` maps the camera name (without ``image_``) to (H, W); a missing camera raises naming the known ones.
    """
    frame = dict(frame)
    for group in ("observation", "task"):
        if group not in frame:
            continue
        entries = dict(frame[group])
        for key in [k for k in entries if k.startswith("image_")]:
            camera = key[len("image_") :]
            if camera not in image_sizes:
                raise ValueError(f"No image size for camera {camera!r}; image_sizes has {sorted(image_sizes)}")
            entries[key] = decode_and_resize_image(entries[key], image_sizes[camera], mode)
        frame[group] = entries
    return frame


def augment_image(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Augments uint8 [..., H, W, 3] with one set of random parameters for all leading entries."""
    shape = tf.shape(image)
    height, width = image.shape[-3], image.shape[-2]
    flat = tf.reshape(tf.image.convert_image_dtype(image, tf.float32), [-1, height, width, 3])
    seeds = tf.random.experimental.stateless_split(seed, 6)
    # Random resized crop: sample area fraction and aspect ratio, then a position that keeps the box inside.
    scale = tf.random.stateless_uniform([], seeds[0], *config.crop_scale)
    log_ratio = tf.random.stateless_uniform(
        [], seeds[1], tf.math.log(config.crop_ratio[0]), tf.math.log(config.crop_ratio[1])
    )
    ratio = tf.exp(log_ratio)
    crop_h = tf.minimum(tf.sqrt(scale / ratio), 1.0)
    crop_w = tf.minimum(tf.sqrt(scale * ratio), 1.0)
    offset = tf.random.stateless_uniform([2], seeds[2]) * tf.stack([1.0 - crop_h, 1.0 - crop_w])
    box = tf.stack([offset[0], offset[1], offset[0] + crop_h, offset[1] + crop_w])
    count = tf.shape(flat)[0]
    flat = tf.image.crop_and_resize(flat, tf.tile(box[None], [count, 1]), tf.range(count), [height, width])
    # Parameters are drawn here (not with tf.image.stateless_random_*) so that degenerate ranges mean "off".
    brightness = tf.random.stateless_uniform([], seeds[3], -config.brightness, config.brightness)
    contrast = tf.random.stateless_uniform([], seeds[4], *config.contrast)
    saturation_seed, hue_seed = tf.unstack(tf.random.experimental.stateless_split(seeds[5], 2))
    saturation = tf.random.stateless_uniform([], saturation_seed, *config.saturation)
    hue = tf.random.stateless_uniform([], hue_seed, -config.hue, config.hue)
    flat = tf.image.adjust_brightness(flat, brightness)
    flat = tf.image.adjust_contrast(flat, contrast)
    flat = tf.image.adjust_saturation(flat, saturation)
    flat = tf.image.adjust_hue(flat, hue)
    flat = tf.clip_by_value(flat, 0.0, 1.0)
    out = tf.cast(tf.round(flat * 255.0), tf.uint8)
    return tf.reshape(out, shape)


def augment(frame: dict, seed: tf.Tensor, config: AugmentConfig) -> dict:
    """Augments every observation image (each camera with its own parameters; goal images are left as they are)."""
    observation = dict(frame["observation"])
    for i, key in enumerate(sorted(k for k in observation if k.startswith("image_"))):
        camera_seed = tf.random.experimental.stateless_fold_in(seed, i)
        observation[key] = augment_image(observation[key], camera_seed, config)
    return {**frame, "observation": observation}
