"""Normalization artifact: statistics, round trips, masks, JSON save/load, caching and mismatch errors."""

import json
import os

import numpy as np
import pytest

from vlax.data import normalization
from vlax.data.normalization import NormalizationArtifact, NormalizationMismatchError


def _artifact(kind="bounds", seed=0, dataset_hash="abc"):
    rng = np.random.default_rng(seed)
    actions = [rng.normal(2.0, 3.0, (50, 4)), rng.normal(2.0, 3.0, (30, 4))]
    states = [rng.uniform(-5, 5, (50, 3)), rng.uniform(-5, 5, (30, 3))]
    stats = normalization.compute_statistics({"action": actions, "state": states})
    masks = normalization.default_masks(stats, ("action", "state"), gripper_last=True)
    artifact = NormalizationArtifact(kind, ("action", "state"), masks, {"action": 7, "state": 8}, stats, dataset_hash)
    return artifact, np.concatenate(actions), np.concatenate(states)


def test_statistics_match_numpy():
    artifact, actions, _ = _artifact()
    stats = artifact.stats["action"]
    np.testing.assert_allclose(stats["mean"], actions.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], actions.std(0), rtol=1e-12)
    np.testing.assert_allclose(stats["q01"], np.quantile(actions, 0.01, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-12)
    assert stats["count"] == 80 and stats["num_trajectories"] == 2
    assert artifact.masks["action"] == (True, True, True, False)  # gripper left unnormalized
    assert artifact.masks["state"] == (True, True, True)


@pytest.mark.parametrize("kind", ["normal", "bounds", "none"])
def test_round_trip_is_identity_and_masked_dims_untouched(kind):
    artifact, actions, states = _artifact(kind)
    normed = artifact.normalize("action", actions)
    np.testing.assert_array_equal(normed[:, 3], actions[:, 3].astype(np.float32))  # masked gripper dim
    np.testing.assert_allclose(artifact.unnormalize("action", normed), actions, rtol=1e-5, atol=1e-5)
    padded = np.concatenate([normed, np.zeros((len(normed), 3), np.float32)], axis=-1)  # padded_dims = 7
    np.testing.assert_allclose(artifact.unnormalize("action", padded), actions, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(artifact.unnormalize("state", artifact.normalize("state", states)), states, atol=1e-5)
    if kind == "normal":
        np.testing.assert_allclose(normed[:, :3].mean(0), 0, atol=1e-6)
        np.testing.assert_allclose(normed[:, :3].std(0), 1, atol=1e-6)
    if kind == "bounds":
        q = artifact.stats["action"]
        ends = artifact.normalize("action", np.array([q["q01"], q["q99"]]))
        np.testing.assert_allclose(ends[:, :3], [[-1] * 3, [1] * 3], atol=1e-6)
    tf_normed = artifact.tf_normalize("action", actions).numpy()
    np.testing.assert_allclose(tf_normed, normed, rtol=1e-6, atol=1e-6)


def test_save_load_and_mismatch_errors_name_the_field(tmp_path):
    artifact, _, _ = _artifact()
    path = str(tmp_path / "norm.json")
    artifact.save(path)
    loaded = NormalizationArtifact.load(path, expected=artifact)
    assert loaded == artifact and loaded.artifact_hash == artifact.artifact_hash
    saved = json.loads(open(path).read())
    assert saved["keys"] == ["action", "state"] and saved["padded_dims"] == {"action": 7, "state": 8}

    with pytest.raises(NormalizationMismatchError, match="'type' differs: recorded 'bounds', offered 'normal'"):
        NormalizationArtifact.load(path, expected=_artifact("normal")[0])
    with pytest.raises(NormalizationMismatchError, match="'dataset_hash' differs"):
        NormalizationArtifact.load(path, expected=_artifact(dataset_hash="other")[0])
    with pytest.raises(NormalizationMismatchError, match="'stats.action.mean' differs"):
        NormalizationArtifact.load(path, expected=_artifact(seed=1)[0])
    other_masks = NormalizationArtifact(
        artifact.type, artifact.keys, {**artifact.masks, "action": (True,) * 4}, artifact.padded_dims,
        artifact.stats, artifact.dataset_hash,
    )
    with pytest.raises(NormalizationMismatchError, match="'masks' differs"):
        normalization.check_compatible(artifact, other_masks)
    other_dims = NormalizationArtifact(
        artifact.type, artifact.keys, artifact.masks, {"action": 8, "state": 8}, artifact.stats, artifact.dataset_hash
    )
    with pytest.raises(NormalizationMismatchError, match="'padded_dims' differs"):
        normalization.check_compatible(artifact, other_dims)

    saved["stats"]["action"]["mean"][0] += 1.0  # edited by hand: the stored hash no longer matches
    (tmp_path / "edited.json").write_text(json.dumps(saved))
    with pytest.raises(NormalizationMismatchError, match="artifact_hash"):
        NormalizationArtifact.load(str(tmp_path / "edited.json"))


def test_bad_inputs():
    artifact, _, _ = _artifact()
    with pytest.raises(ValueError, match="Unknown normalization type 'zscore'"):
        NormalizationArtifact("zscore", artifact.keys, artifact.masks, artifact.padded_dims, artifact.stats, "h")
    with pytest.raises(ValueError, match="action has last dimension 5, but the normalization statistics have 4"):
        artifact.normalize("action", np.zeros((2, 5)))


def test_stats_are_cached_by_dataset_hash_and_keys(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return normalization.compute_statistics({"action": [np.arange(6.0).reshape(3, 2)]})

    a = normalization.load_or_compute_stats(str(tmp_path), "hash1", ("action",), compute)
    b = normalization.load_or_compute_stats(str(tmp_path), "hash1", ("action",), compute)
    assert a == b and len(calls) == 1
    normalization.load_or_compute_stats(str(tmp_path), "hash2", ("action",), compute)
    normalization.load_or_compute_stats(str(tmp_path), "hash1", ("action", "state"), lambda: {**a, "state": a["action"]})
    assert len(calls) == 2


def test_artifact_hash_is_mandatory_and_errors_name_the_source(tmp_path):
    artifact, _, _ = _artifact()
    data = artifact.to_dict()
    assert NormalizationArtifact.from_dict(json.loads(json.dumps(data))) == artifact  # what checkpoints store
    where = "checkpoint step 500, normalization item under runs/x/checkpoints/500"
    incomplete = {k: v for k, v in data.items() if k != "artifact_hash"}
    with pytest.raises(normalization.IncompleteArtifactError,
                       match=rf"artifact \({where}\) is incomplete: it has no \['artifact_hash'\].*start a new "
                             r"workdir"):
        NormalizationArtifact.from_dict(incomplete, source=where)
    with pytest.raises(NormalizationMismatchError, match=r"is incomplete: it has no \['stats', 'artifact_hash'\]"):
        NormalizationArtifact.from_dict({k: v for k, v in incomplete.items() if k != "stats"})
    with pytest.raises(NormalizationMismatchError, match=rf"artifact \({where}\) is corrupted"):
        NormalizationArtifact.from_dict({**data, "dataset_name": "renamed"}, source=where)

    other = _artifact(dataset_hash="other")[0]
    with pytest.raises(NormalizationMismatchError,
                       match=rf"'dataset_hash' differs: recorded 'abc', offered 'other' \(recorded artifact: "
                             rf"{where}\)\. Use the normalization artifact recorded with the checkpoint"):
        normalization.check_compatible(artifact, other, source=where)
    with pytest.raises(NormalizationMismatchError, match=r"'stats.action.mean' differs.*recorded artifact: file .*"
                                                         r"norm.json\)\..*fine-tuning"):
        artifact.save(str(tmp_path / "norm.json"))
        NormalizationArtifact.load(str(tmp_path / "norm.json"), expected=_artifact(seed=1)[0])


def test_default_cache_dir_honours_vlax_cache_dir(monkeypatch, tmp_path):
    # conftest points VLAX_CACHE_DIR at a temporary directory, so no test writes under ~/.cache.
    assert not os.environ["VLAX_CACHE_DIR"].startswith(os.path.expanduser("~/.cache"))
    monkeypatch.setenv("VLAX_CACHE_DIR", str(tmp_path))
    assert normalization.cache_root() == str(tmp_path)
    assert normalization.default_cache_dir() == str(tmp_path / "stats")
    from vlax.data.file_digest import file_digest

    (tmp_path / "data.bin").write_bytes(b"abc")
    file_digest(str(tmp_path / "data.bin"))
    assert len(os.listdir(tmp_path / "file_digests")) == 1  # the digest memo lives there too
    monkeypatch.delenv("VLAX_CACHE_DIR")
    assert normalization.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "vlax", "stats")
