"""Data sources from config: one entry per dataset of a run's mixture.

    data.sources = [
        {"kind": "lerobot", "path": "/data/my_arm", "weight": 1.0,
         "cameras": {"observation.images.top": "top", "observation.images.wrist": "wrist"},
         "state_keys": ["observation.state"], "action_keys": ["action"], "gripper_dims": [6],
         "normalization": "bounds"},
        {"kind": "rlds", "path": "/data/bridge/1.0.0", "weight": 0.5, ...},
    ]

``kind`` is ``rlds``, ``lerobot``, ``metaworld`` (the scripted-expert generator: generated on first use) or
``auto`` (detected from the files at ``path``). ``cameras`` maps the dataset's image keys to the policy's camera
names (empty: every image key under its short name), as a mapping or as ``(dataset key, camera)`` pairs: LeRobot
keys have dots, which a ConfigDict field name cannot, so a config (and the command line) spells them as pairs,
``--config.data.sources[0].cameras="(('observation.images.top', 'top'),)"``; ``state_keys`` / ``action_keys`` are concatenated in the
order given (empty: the format's default); ``gripper_dims`` are action dims left unnormalized; ``normalization``
overrides the run's type for this source; ``ignore_errors`` skips unreadable records of corrupted RLDS files.
Every problem is reported before any data is read.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Mapping

SOURCE_FIELDS = {
    "kind": "auto", "path": "", "name": "", "weight": 1.0, "cameras": {}, "state_keys": (), "action_keys": (),
    "language_key": "", "gripper_dims": None, "normalization": "", "ignore_errors": False,
    # metaworld only: what to generate
    "tasks": "mt10", "episodes_per_task": 50, "image_size": 128, "num_workers": 2,
    "hand_start_noise": 0.0,
}

# kind -> "module:function" taking (entry dict) and returning a source; registered by name so that the data layer
# does not import any simulator.
SOURCE_KINDS = {
    "rlds": "vlax.data.source_config:open_rlds",
    "lerobot": "vlax.data.source_config:open_lerobot",
    "metaworld": "vlax.envs.metaworld.dataset:open_source",
}


class DataSourceError(ValueError):
    """A data source entry that cannot be opened; the message names the value and the fix."""


def detect_kind(path: str) -> str:
    """``lerobot`` when ``path/meta/info.json`` exists, ``rlds`` when ``path`` (or one version directory below
    it) holds a tfds ``dataset_info.json``; otherwise an error naming what was looked for."""
    if os.path.isfile(os.path.join(path, "meta", "info.json")):
        return "lerobot"
    if rlds_version_dir(path) is not None:
        return "rlds"
    what = "exists" if os.path.isdir(path) else "does not exist"
    raise DataSourceError(
        f"data path {path!r} ({what}) is neither a LeRobot v3 dataset (looked for meta/info.json) nor an RLDS/tfds "
        "dataset (looked for dataset_info.json in it or in one version directory below it, e.g. 1.0.0/); pass "
        "the dataset's root directory")


def rlds_version_dir(path: str) -> str | None:
    """``path`` itself or its single (newest) version sub-directory holding ``dataset_info.json``."""
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    if not os.path.isdir(path):
        return None
    versions = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "dataset_info.json")))
    return os.path.join(path, versions[-1]) if versions else None


def source_entry(entry: Mapping[str, Any]) -> dict:
    """``entry`` with defaults filled in; unknown fields and kinds are errors."""
    entry = dict(entry)
    unknown = sorted(set(entry) - set(SOURCE_FIELDS))
    if unknown:
        raise DataSourceError(f"unknown data source field(s) {unknown}; known: {sorted(SOURCE_FIELDS)}")
    out = {**SOURCE_FIELDS, **entry}
    if out["kind"] not in (*SOURCE_KINDS, "auto"):
        raise DataSourceError(f"unknown data source kind {out['kind']!r}; known: {sorted(SOURCE_KINDS)} or 'auto'")
    if out["kind"] != "metaworld" and not out["path"]:
        raise DataSourceError(f"data source of kind {out['kind']!r} needs a path (--config.data.sources[i].path=...)")
    if float(out["weight"]) < 0:
        raise DataSourceError(f"data source weight {out['weight']} must be >= 0")
    out["cameras"] = camera_pairs(out["cameras"])
    out["state_keys"] = tuple(out["state_keys"] or ())
    out["action_keys"] = tuple(out["action_keys"] or ())
    return out


def camera_pairs(cameras: Any) -> dict[str, str]:
    """A camera map given as a mapping or as ``(dataset key, camera)`` pairs -> ``{dataset key: camera}``."""
    if not cameras:
        return {}
    if hasattr(cameras, "keys"):
        return {str(k): str(cameras[k]) for k in cameras.keys()}
    out = {}
    for pair in cameras:
        if isinstance(pair, str) or len(pair) != 2:
            raise DataSourceError(f"cameras entry {pair!r} is not a (dataset key, camera) pair; write e.g. "
                                  "cameras=(('observation.images.top', 'top'),)")
        if pair[0] in out:
            raise DataSourceError(f"cameras names dataset key {pair[0]!r} twice")
        out[str(pair[0])] = str(pair[1])
    return out


def check_sources(entries: Any) -> list[dict]:
    """Validate every entry (fields, kinds, paths) before anything is read or generated."""
    if not entries:
        raise DataSourceError("config.data.sources is empty; add at least one {'kind': ..., 'path': ...}")
    checked = [source_entry(e) for e in entries]
    for e in checked:
        if e["kind"] == "auto":
            e["kind"] = detect_kind(e["path"])
        elif e["kind"] == "rlds" and rlds_version_dir(e["path"]) is None:
            detect_kind(e["path"])  # raises, saying what was looked for
        elif e["kind"] == "lerobot" and not os.path.isfile(os.path.join(e["path"], "meta", "info.json")):
            detect_kind(e["path"])
    return checked


def open_source(entry: Mapping[str, Any]) -> Any:
    """The source an entry describes, with its per-source normalization settings attached."""
    entry = check_sources([entry])[0]
    module, function = SOURCE_KINDS[entry["kind"]].split(":")
    source = getattr(importlib.import_module(module), function)(entry)
    if entry["gripper_dims"] is not None:
        dims = [int(d) for d in entry["gripper_dims"]]
        bad = [d for d in dims if not -source.action_dim <= d < source.action_dim]
        if bad:
            raise DataSourceError(f"gripper_dims {bad} out of range for {source.name!r}'s {source.action_dim} "
                                  "action dims")
        source.gripper_dims = tuple(d % source.action_dim for d in dims)
    if entry["normalization"]:
        source.normalization = entry["normalization"]
    return source


def _camera_map(entry: Mapping[str, Any]) -> dict[str, str] | None:
    """Config maps dataset key -> policy camera; readers take policy camera -> dataset key."""
    cameras = entry["cameras"]
    if not cameras:
        return None
    inverse = {}
    for key, camera in cameras.items():
        if camera in inverse:
            raise DataSourceError(f"cameras maps both {inverse[camera]!r} and {key!r} to camera {camera!r}")
        inverse[camera] = key
    return inverse


def open_rlds(entry: Mapping[str, Any]) -> Any:
    from vlax.data.rlds_reader import RLDSSource

    kwargs = {}
    if entry["state_keys"]:
        kwargs["state_key"] = list(entry["state_keys"])
    if entry["action_keys"]:
        kwargs["action_key"] = list(entry["action_keys"])
    if entry["language_key"]:
        kwargs["language_key"] = entry["language_key"]
    return _with_camera_errors(lambda: RLDSSource(
        rlds_version_dir(entry["path"]), name=entry["name"] or None, image_keys=_camera_map(entry),
        ignore_errors=bool(entry["ignore_errors"]), gripper_last=entry["gripper_dims"] is None, **kwargs), entry,
        lambda: rlds_image_keys(rlds_version_dir(entry["path"])))


def open_lerobot(entry: Mapping[str, Any]) -> Any:
    from vlax.data.lerobot_v3 import LeRobotSource

    kwargs = {}
    if entry["state_keys"]:
        kwargs["state_key"] = list(entry["state_keys"])
    if entry["action_keys"]:
        kwargs["action_key"] = list(entry["action_keys"])
    return _with_camera_errors(lambda: LeRobotSource(
        entry["path"], name=entry["name"] or None, image_keys=_camera_map(entry), gripper_last=False, **kwargs),
        entry, lambda: lerobot_image_keys(entry["path"]))


def rlds_image_keys(data_dir: str) -> list[str]:
    """The observation keys of an RLDS dataset that hold images."""
    import tensorflow_datasets as tfds

    observation = tfds.builder_from_directory(data_dir).info.features["steps"]["observation"]
    return sorted(k for k in observation.keys() if isinstance(observation[k], tfds.features.Image))


def lerobot_image_keys(root: str) -> list[str]:
    """The video and image features of a LeRobot v3 dataset."""
    import json

    with open(os.path.join(root, "meta", "info.json")) as f:
        features = json.load(f).get("features", {})
    return sorted(k for k, v in features.items() if isinstance(v, Mapping) and v.get("dtype") in ("video", "image"))


def _with_camera_errors(make, entry: Mapping[str, Any], image_keys) -> Any:
    try:
        return make()
    except KeyError as e:
        missing = [k for k in entry["cameras"] if k not in image_keys()]
        if missing:
            raise DataSourceError(
                f"data source {entry['path']!r}: data.sources[i].cameras names {missing}, which the dataset lacks; "
                f"its image keys are {image_keys()}") from None
        raise DataSourceError(f"data source {entry['path']!r}: {e.args[0] if e.args else e}; fix "
                              "data.sources[i].cameras / state_keys / action_keys") from None
