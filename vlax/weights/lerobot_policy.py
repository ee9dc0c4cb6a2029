"""LeRobot policy directories (``save_pretrained`` output) read into vlax terms.

A LeRobot policy directory holds ``config.json`` (with the policy ``type``), ``model.safetensors`` (the torch
state dict) and the processor pipelines ``policy_preprocessor.json`` / ``policy_postprocessor.json``, whose
normalizer steps point at safetensors files of per-feature statistics (``observation.state.mean``, ...).
:func:`read_policy_dir` returns all of it as a :class:`LeRobotPolicy`:

* ``normalization``: a :class:`vlax.data.normalization.NormalizationArtifact` for ``state`` and ``action``
  (LeRobot's MEAN_STD -> ``normal``, MIN_MAX -> ``min_max``, QUANTILES -> ``bounds``, IDENTITY -> ``none``);
* ``pixel_stats``: per image feature, the VISUAL MEAN_STD statistics LeRobot applies to [0, 1] pixels, or none;
* ``tensors``: the state dict, read lazily-safe from safetensors (never a pickle).

Family importers (``vlax.weights.lerobot_<family>``) map ``tensors`` onto their preset.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from vlax.data.normalization import STAT_NAMES, NormalizationArtifact
from vlax.weights.common import CheckpointError, _read_json_object, read_config, read_safetensors

PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
# LeRobot normalization mode -> vlax normalization type, and the statistics each one reads
NORM_MODES = {"MEAN_STD": ("normal", ("mean", "std")), "MIN_MAX": ("min_max", ("min", "max")),
              "QUANTILES": ("bounds", ("q01", "q99")), "IDENTITY": ("none", ())}
# vlax key -> LeRobot feature
FEATURES = {"state": "observation.state", "action": "action"}
IMAGE_PREFIX = "observation.images."


@dataclasses.dataclass(frozen=True)
class LeRobotPolicy:
    """What a LeRobot policy directory holds, read into vlax terms (see the module docstring)."""

    path: Path
    type: str
    config: dict
    tensors: dict[str, np.ndarray]
    normalization: NormalizationArtifact
    pixel_stats: dict[str, tuple[np.ndarray, np.ndarray] | None]  # image feature -> (mean [3], std [3]) or None
    preprocessor: dict
    postprocessor: dict

    @property
    def image_features(self) -> list[str]:
        """Image feature names in ``config.json`` order (``observation.images.top``, ...)."""
        return image_features(self.config)

    def camera_names(self) -> list[str]:
        """The image features without LeRobot's ``observation.images.`` prefix: vlax's camera names."""
        return [camera_name(f) for f in self.image_features]


def camera_name(feature: str) -> str:
    return feature[len(IMAGE_PREFIX):] if feature.startswith(IMAGE_PREFIX) else feature


def image_features(config: Mapping[str, Any]) -> list[str]:
    return [k for k, v in config.get("input_features", {}).items() if v.get("type") == "VISUAL"]


def feature_dim(config: Mapping[str, Any], feature: str) -> int:
    spec = {**config.get("input_features", {}), **config.get("output_features", {})}.get(feature)
    if spec is None:
        raise CheckpointError(f"the policy config has no feature {feature!r}; it has "
                              f"{sorted({**config.get('input_features', {}), **config.get('output_features', {})})}")
    return int(np.prod(spec["shape"]))


def check_policy_type(config: Mapping[str, Any], supported: Iterable[str], path: Path | str = "") -> str:
    """The config's policy ``type``; anything else than ``supported`` is an error listing them."""
    supported = sorted(supported)
    kind = config.get("type")
    if kind not in supported:
        where = f" at {path}" if path else ""
        raise CheckpointError(f"the LeRobot policy{where} has type {kind!r}; vlax imports LeRobot policies of type "
                              f"{supported}")
    return kind


def _normalizer_step(pipeline: Mapping[str, Any], registry_name: str, file: Path) -> dict:
    for step in pipeline.get("steps", []):
        if step.get("registry_name") == registry_name:
            return step
    names = [s.get("registry_name") for s in pipeline.get("steps", [])]
    raise CheckpointError(f"{file} has no {registry_name!r} step (its steps: {names}); the processor files do not "
                          "belong to a LeRobot policy that normalizes its inputs")


def _read_pipeline(path: Path, name: str) -> dict:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a LeRobot policy directory needs {PREPROCESSOR} and "
                              f"{POSTPROCESSOR} with their normalizer files (save the policy's processors with "
                              "make_pre_post_processors(...) and save_pretrained, or copy them from the hub repo)")
    return _read_json_object(file, "LeRobot processor pipeline")


def _read_stats(path: Path, step: Mapping[str, Any], pipeline_file: Path) -> dict[str, np.ndarray]:
    state_file = step.get("state_file")
    if not state_file or not (path / state_file).is_file():
        raise CheckpointError(f"{pipeline_file} names the statistics file {state_file!r}, which is not in {path}; "
                              "copy it from the checkpoint's repository")
    return read_safetensors(path / state_file)


def _feature_stats(stats: Mapping[str, np.ndarray], feature: str, needed: Iterable[str], file: Path) -> dict:
    out = {}
    for name in STAT_NAMES:
        value = stats.get(f"{feature}.{name}")
        if value is None:
            if name in needed:
                raise CheckpointError(f"{file} has no {feature}.{name}, which its normalization needs; it has "
                                      f"{sorted(k for k in stats if k.startswith(feature + '.'))}")
            continue
        out[name] = np.asarray(value, np.float64).reshape(-1).tolist()
    dim = len(out[next(iter(needed))]) if needed else len(out.get("mean", []))
    for name in STAT_NAMES:  # statistics the mode does not read, kept shape-consistent for the artifact
        out.setdefault(name, [0.0] * dim)
    count = stats.get(f"{feature}.count")
    out["count"] = int(np.asarray(count).reshape(-1)[0]) if count is not None else 0
    return out


def read_normalization(path: str | Path, padded_dims: Mapping[str, int] | None = None,
                       masks: Mapping[str, Iterable[bool]] | None = None) -> tuple[NormalizationArtifact, dict]:
    """``(artifact for state + action, pixel_stats)`` from a policy directory's processor files.

    ``padded_dims`` (default: the real dims) is what the model sees; ``masks`` default to all dims normalized,
    as LeRobot does. The artifact's ``dataset_hash`` is a digest of the statistics file, so two checkpoints with
    the same statistics share it.
    """
    path = Path(path)
    pre_file = path / PREPROCESSOR
    pre = _read_pipeline(path, PREPROCESSOR)
    _read_pipeline(path, POSTPROCESSOR)
    step = _normalizer_step(pre, "normalizer_processor", pre_file)
    norm_map = step.get("config", {}).get("norm_map", {})
    stats = _read_stats(path, step, pre_file)
    modes = {key: norm_map.get("STATE" if key == "state" else "ACTION", "IDENTITY") for key in FEATURES}
    for key, mode in modes.items():
        if mode not in NORM_MODES:
            raise CheckpointError(f"{pre_file}: normalization mode {mode!r} of {key} is not one vlax applies; "
                                  f"known: {sorted(NORM_MODES)}")
    kinds = {NORM_MODES[m][0] for m in modes.values()}
    if len(kinds) > 1:
        raise CheckpointError(f"{pre_file} normalizes state as {modes['state']} and actions as {modes['action']}; "
                              "vlax applies one normalization type to both")
    kind = kinds.pop()
    feature_stats = {key: _feature_stats(stats, feature, NORM_MODES[modes[key]][1], pre_file)
                     for key, feature in FEATURES.items()}
    dims = {key: len(s["mean"]) for key, s in feature_stats.items()}
    digest = hashlib.sha256((path / step["state_file"]).read_bytes()).hexdigest()[:16]
    artifact = NormalizationArtifact(
        type=kind, keys=tuple(FEATURES),
        masks={k: tuple(bool(b) for b in (masks or {}).get(k, [True] * dims[k])) for k in FEATURES},
        padded_dims={k: int((padded_dims or {}).get(k, dims[k])) for k in FEATURES},
        stats=feature_stats, dataset_hash=f"lerobot-stats-{digest}", dataset_name=str(path.name))
    pixel_stats = {}
    visual = norm_map.get("VISUAL", "IDENTITY")
    features = step.get("config", {}).get("features", {})
    for feature, spec in features.items():
        if spec.get("type") != "VISUAL":
            continue
        if visual == "IDENTITY":
            pixel_stats[feature] = None
        elif visual == "MEAN_STD":
            mean, std = stats.get(f"{feature}.mean"), stats.get(f"{feature}.std")
            if mean is None or std is None:
                raise CheckpointError(f"{pre_file}: no {feature}.mean / .std for its MEAN_STD image normalization")
            pixel_stats[feature] = (np.asarray(mean, np.float32).reshape(-1), np.asarray(std, np.float32).reshape(-1))
        else:
            raise CheckpointError(f"{pre_file}: image normalization {visual!r} is not supported; vlax applies "
                                  "IDENTITY or MEAN_STD to images")
    return artifact, pixel_stats


def read_policy_dir(path: str | Path, supported: Iterable[str] | None = None,
                    padded_dims: Mapping[str, int] | None = None) -> LeRobotPolicy:
    """Everything in a LeRobot policy directory (see the module docstring); ``supported`` restricts the policy
    types accepted (an error lists them)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; a LeRobot policy is a directory written by "
                              "save_pretrained (config.json, model.safetensors, policy_*processor*.json)")
    config = read_config(path)
    if "type" not in config:
        raise CheckpointError(f"{path / 'config.json'} has no policy 'type': it is not a LeRobot policy config")
    kind = check_policy_type(config, supported, path) if supported is not None else config["type"]
    artifact, pixel_stats = read_normalization(path, padded_dims)
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path / 'model.safetensors'} not found; LeRobot saves its weights there (a "
                              "pickle-only download cannot be read: re-save with save_pretrained)")
    tensors = read_safetensors(path / "model.safetensors")
    return LeRobotPolicy(path=path, type=kind, config=config, tensors=tensors, normalization=artifact,
                         pixel_stats=pixel_stats, preprocessor=_read_pipeline(path, PREPROCESSOR),
                         postprocessor=_read_pipeline(path, POSTPROCESSOR))


def normalize_pixels(images: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """LeRobot's image path: uint8 ``[..., h, w, 3]`` -> [0, 1] float32 (float input is taken as already in
    [0, 1], as LeRobot's decoders return it), then ``(x - mean) / (std + 1e-8)`` per channel when the policy
    normalizes images (``stats``), as its normalizer does."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if stats is None:
        return x
    mean, std = stats
    return (x - mean) / (std + 1e-8)


__all__ = ["LeRobotPolicy", "read_policy_dir", "read_normalization", "check_policy_type", "camera_name",
           "image_features", "feature_dim", "normalize_pixels", "NORM_MODES"]
