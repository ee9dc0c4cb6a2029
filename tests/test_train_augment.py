"""The on-device random shift of the train step (vlax.train.augment) and its wiring through data.random_shift."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest

from experiments.train import make_loss_fn
from vlax.train.augment import random_shift, shift_cameras


def _offset_of(out: np.ndarray, image: np.ndarray, pad: int) -> tuple[int, int]:
    """The (dy, dx) in [0, 2 pad] for which ``out`` is the edge-padded ``image`` cropped there (asserts one)."""
    h, w = image.shape[-3:-1]
    padded = np.pad(image, [(0, 0)] * (image.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)], mode="edge")
    found = [(dy, dx) for dy, dx in itertools.product(range(2 * pad + 1), repeat=2)
             if np.array_equal(padded[..., dy:dy + h, dx:dx + w, :], out)]
    assert found, "output is not a translate of the input"
    return found[0]


def test_each_example_is_an_edge_padded_translate_shared_over_its_window():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 3, 10, 12, 3), dtype=np.uint8)  # [B, T, h, w, 3], distinct pixels
    out = np.asarray(random_shift(images, jax.random.key(1), 2))
    assert out.shape == images.shape and out.dtype == np.uint8
    offsets = [_offset_of(out[b], images[b], 2) for b in range(16)]  # one offset for all T of an example
    assert len(set(offsets)) > 4  # examples draw their own offsets
    assert {dy for dy, _ in offsets} | {dx for _, dx in offsets} <= set(range(5))


def test_zero_pad_is_the_identity_and_a_negative_pad_is_refused():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert np.array_equal(np.asarray(random_shift(images, jax.random.key(0), 0)), images)
    with pytest.raises(ValueError, match="pad=-1"):
        random_shift(images, jax.random.key(0), -1)


def test_cameras_get_their_own_offsets():
    image = np.random.default_rng(1).integers(0, 256, (8, 9, 9, 3), dtype=np.uint8)
    out = shift_cameras({"a": image, "b": image}, jax.random.key(3), 3)
    assert [_offset_of(np.asarray(out["a"])[i], image[i], 3) for i in range(8)] != \
        [_offset_of(np.asarray(out["b"])[i], image[i], 3) for i in range(8)]


class _RecordingModel:
    def loss(self, obs, actions, *, action_mask, rngs, train):
        self.images = obs["images"]
        return 0.0, {}


def test_the_train_loss_sees_shifted_images_only_when_asked():
    image = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    batch = {"obs": {"images": {"top": image}}, "actions": np.zeros((4, 2, 1)), "action_mask": None}
    for shift in (0, 2):
        cfg = ml_collections.ConfigDict({"data": {"random_shift": shift}})
        model = _RecordingModel()
        make_loss_fn(cfg)(model, batch, jax.random.key(0))
        seen = np.asarray(model.images["top"])
        assert np.array_equal(seen, image) == (shift == 0)
        for i in range(4):
            _offset_of(seen[i], image[i], max(shift, 0))
    with pytest.raises(ValueError, match="data.random_shift=-3"):
        make_loss_fn(ml_collections.ConfigDict({"data": {"random_shift": -3}}))
