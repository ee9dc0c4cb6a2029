"""Normalization as an artifact: statistics + how they are applied, saved as JSON and checked when loaded.

An artifact records the normalization ``type`` (``normal``: z-score, ``bounds``: [q01, q99] -> [-1, 1], ``min_max``: [min, max] -> [-1, 1] as
Diffusion Policy uses, ``none``),
the ``keys`` in order (``action``, ``state``), a per-dimension ``masks`` (True = normalized; grippers usually
False), the ``padded_dims`` the model sees, the ``stats`` (mean, std, min, max, q01, q99, count per dimension) and the
``dataset_hash`` of the data they came from. ``artifact_hash`` covers all of it and must be present when an
artifact is read back (:meth:`NormalizationArtifact.from_dict`), so a truncated or hand-built dict is refused. A
checkpoint saves its artifact; loading data whose artifact differs is an error that names the field and, given
``source=`` (e.g. ``"checkpoint step 500, normalization item under runs/x/checkpoints/500"``), where the recorded
artifact came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable

import numpy as np

NORMALIZATION_TYPES = ("normal", "bounds", "min_max", "none")
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")
# Keeps constant dimensions finite; small enough that normalize -> unnormalize stays exact to fp32 precision.
EPSILON = 1e-8


class NormalizationMismatchError(ValueError):
    """The normalization a model was trained with differs from the one offered now."""


class IncompleteArtifactError(NormalizationMismatchError):
    """An artifact dict lacks fields (``artifact_hash`` included) that :meth:`NormalizationArtifact.to_dict`
    writes; a subclass of :class:`NormalizationMismatchError` so that one ``except`` catches both."""


REQUIRED_FIELDS = ("type", "keys", "masks", "padded_dims", "stats", "dataset_hash", "artifact_hash")
_WHAT_TO_DO = ("Use the normalization artifact recorded with the checkpoint (its 'normalization' item), or, to "
               "train with the new normalization, start a new workdir (fine-tuning from the checkpoint's weights "
               "if wanted) so that a fresh artifact is computed and recorded.")


def _from(source: str | None) -> str:
    return f" ({source})" if source else ""


def compute_statistics(arrays: dict[str, Iterable[np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Per-dimension statistics of each key over all steps.

    Args:
      arrays: key -> iterable of [T_i, D] arrays (one per trajectory).

    Returns:
      key -> {mean, std, min, max, q01, q99: list of D floats; count: number of steps; num_trajectories}.
    """
    stats = {}
    for key, chunks in arrays.items():
        chunks = list(chunks)
        if not chunks:
            raise ValueError(f"No data to compute statistics of {key!r}")
        values = np.concatenate([np.asarray(c, np.float64).reshape(len(c), -1) for c in chunks], axis=0)
        stats[key] = {
            "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(),
            "min": values.min(0).tolist(),
            "max": values.max(0).tolist(),
            "q01": np.quantile(values, 0.01, axis=0).tolist(),
            "q99": np.quantile(values, 0.99, axis=0).tolist(),
            "count": int(values.shape[0]),
            "num_trajectories": len(chunks),
        }
    return stats


@dataclasses.dataclass(frozen=True)
class NormalizationArtifact:
    """How ``action`` / ``state`` are normalized for one dataset (see the module docstring)."""

    type: str
    keys: tuple[str, ...]
    masks: dict[str, tuple[bool, ...]]
    padded_dims: dict[str, int]
    stats: dict[str, dict[str, Any]]
    dataset_hash: str
    dataset_name: str = ""

    def __post_init__(self):
        if self.type not in NORMALIZATION_TYPES:
            raise ValueError(f"Unknown normalization type {self.type!r}; use one of {NORMALIZATION_TYPES}")
        for key in self.keys:
            if key not in self.stats:
                raise ValueError(f"No statistics for key {key!r}; statistics exist for {sorted(self.stats)}")
            dim = len(self.stats[key]["mean"])
            if len(self.masks[key]) != dim:
                raise ValueError(f"Mask of {key!r} has {len(self.masks[key])} entries but the data has {dim} dims")
            if self.padded_dims[key] < dim:
                raise ValueError(f"padded_dims[{key!r}]={self.padded_dims[key]} is below the data's {dim} dims")

    def dim(self, key: str) -> int:
        """Real (unpadded) dimension of ``key``."""
        return len(self.stats[key]["mean"])

    def to_dict(self) -> dict[str, Any]:
        body = {
            "type": self.type,
            "keys": list(self.keys),
            "masks": {k: list(v) for k, v in self.masks.items()},
            "padded_dims": dict(self.padded_dims),
            "stats": self.stats,
            "dataset_hash": self.dataset_hash,
            "dataset_name": self.dataset_name,
        }
        return {**body, "artifact_hash": _hash(body)}

    @property
    def artifact_hash(self) -> str:
        return self.to_dict()["artifact_hash"]

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "NormalizationArtifact":
        """The artifact of a :meth:`to_dict` dict (e.g. a checkpoint's ``normalization`` item).

        Every field :meth:`to_dict` writes is required, ``artifact_hash`` included, and the hash must match the
        contents. ``source`` says where ``data`` came from; errors name it.

        Raises:
          IncompleteArtifactError: a field is missing.
          NormalizationMismatchError: the stored ``artifact_hash`` does not match the contents.
        """
        if not isinstance(data, dict):
            raise IncompleteArtifactError(f"Normalization artifact{_from(source)} must be a dict written by "
                                          f"NormalizationArtifact.to_dict(), got {type(data).__name__}")
        missing = [f for f in REQUIRED_FIELDS if f not in data]
        if missing:
            raise IncompleteArtifactError(
                f"Normalization artifact{_from(source)} is incomplete: it has no {missing} (it has "
                f"{sorted(data)}); an artifact is written whole by NormalizationArtifact.to_dict(), with "
                f"artifact_hash last. {_WHAT_TO_DO}"
            )
        artifact = cls(
            type=data["type"],
            keys=tuple(data["keys"]),
            masks={k: tuple(bool(b) for b in v) for k, v in data["masks"].items()},
            padded_dims={k: int(v) for k, v in data["padded_dims"].items()},
            stats=data["stats"],
            dataset_hash=data["dataset_hash"],
            dataset_name=data.get("dataset_name", ""),
        )
        if data["artifact_hash"] != artifact.artifact_hash:
            raise NormalizationMismatchError(
                f"Normalization artifact{_from(source)} is corrupted: stored artifact_hash {data['artifact_hash']} "
                f"does not match its contents ({artifact.artifact_hash}); it was edited or damaged after it was "
                f"written. {_WHAT_TO_DO}"
            )
        return artifact

    @classmethod
    def load(cls, path: str, expected: "NormalizationArtifact | None" = None,
             source: str | None = None) -> "NormalizationArtifact":
        """Loads an artifact; with ``expected``, raises :class:`NormalizationMismatchError` if they differ.
        ``source`` (default: the file) is named in errors."""
        source = source or f"file {path}"
        with open(path) as f:
            artifact = cls.from_dict(json.load(f), source=source)
        if expected is not None:
            check_compatible(artifact, expected, source=source)
        return artifact

    def _scale_shift(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns (scale, shift) with normalized = (x - shift) / scale on masked dims (scale 1, shift 0 elsewhere)."""
        s = {k: np.asarray(self.stats[key][k], np.float64) for k in STAT_NAMES}
        if self.type == "normal":
            shift, scale = s["mean"], s["std"] + EPSILON
        elif self.type == "bounds":
            shift, scale = (s["q99"] + s["q01"]) / 2, (s["q99"] - s["q01"]) / 2 + EPSILON
        elif self.type == "min_max":
            shift, scale = (s["max"] + s["min"]) / 2, (s["max"] - s["min"]) / 2 + EPSILON
        else:
            shift, scale = np.zeros_like(s["mean"]), np.ones_like(s["mean"])
        mask = np.asarray(self.masks[key], bool)
        return np.where(mask, scale, 1.0), np.where(mask, shift, 0.0)

    def normalize(self, key: str, x: np.ndarray) -> np.ndarray:
        """x [..., D] (D = real dim) -> normalized [..., D] float32."""
        scale, shift = self._scale_shift(key)
        _check_dim(key, x, len(scale))
        return ((np.asarray(x, np.float64) - shift) / scale).astype(np.float32)

    def unnormalize(self, key: str, x: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`normalize`. Accepts [..., D] or padded [..., padded_dim]; returns [..., D] float32."""
        scale, shift = self._scale_shift(key)
        x = np.asarray(x)
        if x.shape[-1] == self.padded_dims[key]:
            x = x[..., : len(scale)]
        _check_dim(key, x, len(scale))
        return (x.astype(np.float64) * scale + shift).astype(np.float32)

    def tf_normalize(self, key: str, x):
        """TensorFlow version of :meth:`normalize` for use inside tf.data pipelines."""
        import tensorflow as tf

        scale, shift = self._scale_shift(key)
        return tf.cast((tf.cast(x, tf.float64) - shift) / scale, tf.float32)


def _check_dim(key: str, x: np.ndarray, dim: int) -> None:
    if x.shape[-1] != dim:
        raise ValueError(f"{key} has last dimension {x.shape[-1]}, but the normalization statistics have {dim}")


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_compatible(saved: NormalizationArtifact, current: NormalizationArtifact,
                     source: str | None = None) -> None:
    """Raises :class:`NormalizationMismatchError` naming the first differing field (type, keys, masks, padded
    dims, dataset hash, statistics) and, if given, the ``source`` of the recorded artifact ``saved``."""
    recorded = f" (recorded artifact: {source})" if source else ""
    for field in ("type", "keys", "masks", "padded_dims", "dataset_hash"):
        a, b = getattr(saved, field), getattr(current, field)
        if a != b:
            raise NormalizationMismatchError(
                f"Normalization field {field!r} differs: recorded {a!r}, offered {b!r}{recorded}. {_WHAT_TO_DO}"
            )
    for key in saved.keys:
        for stat in STAT_NAMES:
            a = np.asarray(saved.stats[key][stat])
            b = np.asarray(current.stats[key][stat])
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-7):
                raise NormalizationMismatchError(
                    f"Normalization field 'stats.{key}.{stat}' differs: recorded {a.tolist()}, offered "
                    f"{b.tolist()}{recorded}. {_WHAT_TO_DO}"
                )


def default_masks(stats: dict[str, dict[str, Any]], keys: tuple[str, ...], gripper_last: bool) -> dict:
    """Normalize every dimension, except the last action dimension (the gripper) when ``gripper_last``."""
    masks = {}
    for key in keys:
        dim = len(stats[key]["mean"])
        mask = [True] * dim
        if key == "action" and gripper_last and dim > 0:
            mask[-1] = False
        masks[key] = tuple(mask)
    return masks


def stats_cache_path(cache_dir: str, dataset_hash: str, keys: tuple[str, ...]) -> str:
    """Where the statistics of a dataset (by hash) and key list are cached."""
    return os.path.join(cache_dir, f"stats_{_hash([dataset_hash, list(keys)])}.json")


def load_or_compute_stats(
    cache_dir: str, dataset_hash: str, keys: tuple[str, ...], compute: "callable"
) -> dict[str, dict[str, Any]]:
    """Returns cached statistics for (dataset_hash, keys) or computes them once with ``compute()`` and caches."""
    path = stats_cache_path(cache_dir, dataset_hash, keys)
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("dataset_hash") == dataset_hash and tuple(cached.get("keys", ())) == tuple(keys):
            return cached["stats"]
    stats = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"dataset_hash": dataset_hash, "keys": list(keys), "stats": stats}, f)
    os.replace(tmp, path)
    return stats


def cache_root() -> str:
    """``$VLAX_CACHE_DIR`` or ``~/.cache/vlax``: where vlax caches derived data (statistics, file digests)."""
    return os.environ.get("VLAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vlax")


def default_cache_dir() -> str:
    """``$VLAX_CACHE_DIR`` or ``~/.cache/vlax``, plus ``/stats``."""
    return os.path.join(cache_root(), "stats")
