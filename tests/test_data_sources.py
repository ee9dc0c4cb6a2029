"""Data sources from config: a two-source mixture samples by its weights and normalizes each source by its own
artifact; the held-out split is deterministic and disjoint; bad input is one clear error before any training
starts (and before any dataset is generated or read)."""

import math
from pathlib import Path

import numpy as np
import pytest

from train_helpers import tiny_config
from vlax.data import DataConfig, build_pipeline
from vlax.data.pipeline import split_episodes
from vlax.data.source_config import DataSourceError, check_sources
from vlax.data.sources import InMemorySource


def _trajectories(rng, count, length, scale, shift, image=8):
    return [{"action": (shift + scale * rng.uniform(-1, 1, (length, 2))).astype(np.float32),
             "state": rng.normal(size=(length, 3)).astype(np.float32),
             "images": {"top": rng.integers(0, 256, (length, image, image, 3), np.uint8)},
             "language_instruction": f"task {i}"} for i in range(count)]


def test_mixture_frequencies_match_the_weights_and_each_source_has_its_own_normalization():
    rng = np.random.default_rng(0)
    small = InMemorySource("small", _trajectories(rng, 6, 20, scale=1.0, shift=0.0))
    large = InMemorySource("large", _trajectories(rng, 6, 20, scale=1000.0, shift=500.0))
    config = DataConfig(batch_size=64, image_size=8, normalization="bounds", augment=False, shuffle_buffer=64,
                        num_parallel_calls=2)
    weights, batches = (0.7, 0.3), 12
    data = build_pipeline([small, large], config, weights=weights, process_index=0, process_count=1)
    names, actions = [], {"small": [], "large": []}
    for _, batch in zip(range(batches), data):
        for name, action in zip(batch["dataset_name"], batch["action"][:, -1]):
            names.append(name.decode())
            actions[name.decode()].append(action)
    n = len(names)
    for name, p in zip(("small", "large"), weights):
        count = names.count(name)
        sigma = math.sqrt(n * p * (1 - p))  # binomial: each frame comes from source i with probability w_i
        assert abs(count - n * p) <= 4 * sigma, f"{name}: {count} of {n}, expected {n * p:.0f} +- {4 * sigma:.0f}"

    # Each source through its own [q01, q99] -> [-1, 1]: both bounded, though their raw scales differ 1000-fold.
    for name in ("small", "large"):
        normalized = np.stack(actions[name])
        assert np.abs(normalized).max() <= 1.05 and np.abs(normalized).max() > 0.8, name
    small_stats, large_stats = data.artifacts["small"].stats["action"], data.artifacts["large"].stats["action"]
    assert max(small_stats["q99"]) < 1.01 and min(large_stats["q99"]) > 900
    assert data.artifacts["small"].dataset_name == "small" and data.artifacts["large"].dataset_name == "large"


def _ids(ds):
    return {float(t["action"][0, 0]) for t in ds.as_numpy_iterator()}


def test_episode_split_is_deterministic_and_disjoint():
    source = InMemorySource("arm", _trajectories(np.random.default_rng(1), 40, 6, 1.0, 0.0))
    every = _ids(source.trajectories(0, 1, shuffle=False))
    train = _ids(split_episodes(source.trajectories(0, 1, shuffle=False), "train", 0.25))
    val = _ids(split_episodes(source.trajectories(0, 1, shuffle=False), "val", 0.25))
    assert len(every) == 40 and train | val == every and not train & val
    assert 3 <= len(val) <= 18  # about a quarter of 40
    # The same episodes whatever the reading order (chosen by content, not position).
    for seed in (3, 4):
        shuffled = source.trajectories(0, 1, seed=seed, shuffle=True)
        assert _ids(split_episodes(shuffled, "val", 0.25)) == val


def test_path_that_is_neither_rlds_nor_lerobot(tmp_path):
    (tmp_path / "episodes.hdf5").write_bytes(b"")
    with pytest.raises(DataSourceError, match=r"neither a LeRobot v3 dataset \(looked for meta/info.json\) nor an "
                                              r"RLDS/tfds dataset \(looked for dataset_info.json"):
        check_sources([{"kind": "auto", "path": str(tmp_path)}])
    with pytest.raises(DataSourceError, match="does not exist"):
        check_sources([{"kind": "rlds", "path": str(tmp_path / "missing")}])


def test_unknown_source_kind_lists_the_known_ones():
    with pytest.raises(DataSourceError, match=r"unknown data source kind 'hdf5'; known: \['lerobot', 'metaworld', "
                                              r"'rlds'\] or 'auto'"):
        check_sources([{"kind": "hdf5", "path": "/data/x"}])


@pytest.mark.parametrize("field,kind", [("head", "action head"), ("encoder", "encoder"), ("backbone", "backbone")])
def test_unknown_component_is_an_error_before_any_data_is_generated(tmp_path, field, kind):
    data_dir = tmp_path / "metaworld_not_generated"
    c = tiny_config(tmp_path / "run", data_dir, steps=1)
    c.model[field] = "no_such_thing"
    from experiments.train import train

    with pytest.raises(ValueError, match=rf"unknown {kind} 'no_such_thing' \(model\.{field}\); known: \["):
        train(c)
    assert not data_dir.exists()


def test_batch_that_does_not_split_over_the_devices_is_an_error_before_any_data_is_generated(tmp_path):
    import jax

    data_dir = tmp_path / "metaworld_not_generated"
    c = tiny_config(tmp_path / "run", data_dir, steps=1)
    shards = jax.device_count()
    c.data.batch_size = shards + 1 if shards > 1 else 1
    from experiments.train import train

    if shards == 1:
        pytest.skip("one device: every batch size splits")
    with pytest.raises(ValueError, match=rf"data.batch_size={shards + 1} does not split over the {shards} batch "
                                         rf"shards.*--config.data.batch_size={2 * shards}"):
        train(c)
    assert not data_dir.exists()
