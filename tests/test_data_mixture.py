"""Mixtures: realized sampling weights, size balancing, padding of differing action/state dims, thread sharing."""

import numpy as np
import pytest

from vlax.data import mixture
from vlax.data.pipeline import DataConfig, build_pipeline
from vlax.data.sources import InMemorySource


def _source(name, count, length, action_dim, state_dim):
    trajs = []
    for i in range(count):
        traj = {"action": np.full((length, action_dim), 1.0 + i, np.float32), "language_instruction": name}
        if state_dim:
            traj["state"] = np.full((length, state_dim), 2.0 + i, np.float32)
        trajs.append(traj)
    return InMemorySource(name, trajs)


def _fractions(pipeline, batches):
    names = []
    it = iter(pipeline)
    for _ in range(batches):
        names.extend(next(it)["dataset_name"].tolist())
    names = np.array(names)
    return {n: float(np.mean(names == n.encode())) for n in (b"a".decode(), "b", "c")}, len(names)


def test_mixture_weights_and_threads():
    np.testing.assert_allclose(mixture.mixture_weights([2, 1, 1], [10, 10, 10]), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(mixture.mixture_weights(None, [10, 30], balance_by_size=True), [0.25, 0.75])
    np.testing.assert_allclose(mixture.mixture_weights([1, 3], [30, 10], balance_by_size=True), [0.5, 0.5])
    with pytest.raises(ValueError, match="Got 2 mixture weights for 3 datasets"):
        mixture.mixture_weights([1, 2], [1, 2, 3])
    assert mixture.allocate_threads(16, [0.5, 0.3, 0.2]) == [8, 5, 3]
    assert mixture.allocate_threads(4, [0.9, 0.05, 0.05]) == [2, 1, 1]


def test_weights_realized_and_dims_padded(tmp_path):
    sources = [_source("a", 3, 8, 2, 3), _source("b", 2, 5, 3, 0), _source("c", 4, 6, 5, 1)]
    config = DataConfig(batch_size=100, window=1, action_horizon=2, shuffle_buffer=200, normalization="none",
                        stats_cache_dir=str(tmp_path), seed=1)
    pipeline = build_pipeline(sources, config, weights=[0.5, 0.3, 0.2], process_index=0, process_count=1)
    fractions, n = _fractions(pipeline, 40)
    # 4000 draws: binomial standard error <= 0.008; allow 4 of them.
    for name, expected in zip("abc", [0.5, 0.3, 0.2]):
        assert abs(fractions[name] - expected) < 0.032, (name, fractions, n)

    batch = next(iter(pipeline))
    assert batch["action"].shape == (100, 1, 2, 5) and batch["observation"]["state"].shape == (100, 1, 3)
    names = batch["dataset_name"]
    dims = {b"a": 2, b"b": 3, b"c": 5}
    state_dims = {b"a": 3, b"b": 0, b"c": 1}
    for i, name in enumerate(names):
        dim, sdim = dims[name], state_dims[name]
        assert batch["action_mask"][i, 0, 0, :dim].all() and not batch["action_mask"][i, ..., dim:].any()
        assert not batch["action"][i, ..., dim:].any()
        assert batch["observation"]["state_mask"][i, 0, :sdim].all()
        assert not batch["observation"]["state_mask"][i, 0, sdim:].any()
        assert batch["observation"]["pad_mask_dict"]["state"][i, 0] == (sdim > 0)

    balanced = DataConfig(**{**config.__dict__, "balance_by_size": True})
    pipeline = build_pipeline(sources, balanced, process_index=0, process_count=1)
    sizes = np.array([24, 10, 24])
    np.testing.assert_allclose(pipeline.probabilities, sizes / sizes.sum())
    fractions, _ = _fractions(pipeline, 40)
    for name, expected in zip("abc", sizes / sizes.sum()):
        assert abs(fractions[name] - expected) < 0.032, (name, fractions)


def test_mixture_with_different_cameras_is_an_error(tmp_path):
    with_image = InMemorySource("img", [{"action": np.zeros((4, 2), np.float32),
                                         "images": {"primary": np.zeros((4, 8, 8, 3), np.uint8)}}])
    without = InMemorySource("noimg", [{"action": np.zeros((4, 2), np.float32)}])
    config = DataConfig(batch_size=2, image_size=8, normalization="none", stats_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="different elements at .*image_primary"):
        build_pipeline([with_image, without], config, process_index=0, process_count=1)


def test_mixture_of_encoded_and_decoded_images(tmp_path):
    """RLDS sources carry encoded frames, video sources decoded ones; a mixture decodes the encoded ones first."""
    import io

    from PIL import Image

    def png(value):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    encoded = InMemorySource("enc", [{"action": np.zeros((4, 2), np.float32), "images": {"primary": [png(40)] * 4}}])
    decoded = InMemorySource("dec", [{"action": np.ones((4, 2), np.float32),
                                      "images": {"primary": np.full((4, 16, 16, 3), 200, np.uint8)}}])
    config = DataConfig(batch_size=32, image_size=8, normalization="none", augment=False, shuffle_buffer=8,
                        stats_cache_dir=str(tmp_path))
    batch = next(iter(build_pipeline([encoded, decoded], config, process_index=0, process_count=1)))
    images = batch["observation"]["image_primary"]
    assert images.shape == (32, 1, 8, 8, 3)
    for name, image in zip(batch["dataset_name"], images):
        assert (image == (40 if name == b"enc" else 200)).all()
    assert set(batch["dataset_name"]) == {b"enc", b"dec"}
