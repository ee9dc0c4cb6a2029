"""LeRobot reference policies for parity tests: the numpy weight recipe and a loadable policy directory.

The fixtures under ``tests/fixtures/lerobot_refs/<policy>/`` hold LeRobot's config and processor files, the
state-dict listing (``params.txt``), the inputs and the outputs of the reference calls, but no weights: the
weights are regenerated here from the published recipe (seeded numpy draws in sorted key order), which is
bit-identical to the ``model.safetensors`` LeRobot wrote. :func:`policy_dir` writes that file next to copies of
the fixture files, giving the directory a user downloads.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot_refs"
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "bool")


def fixture(name: str) -> Path:
    """``tests/fixtures/lerobot_refs/<name>`` (act, diffusion, smolvla, pi0, pi05)."""
    path = FIXTURES / name
    if not path.is_dir():
        raise FileNotFoundError(f"no LeRobot reference fixture {name!r}; have {sorted(p.name for p in FIXTURES.iterdir())}")
    return path


def state_dict_entries(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """``[(key, shape, dtype)]`` of ``params.txt`` (comment lines start with ``#``)."""
    entries = []
    for line in (Path(path) / "params.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")[:3]
        entries.append((key, tuple(json.loads(shape)), dtype))
    return entries


def kept_buffers(path: Path) -> dict[str, np.ndarray]:
    file = Path(path) / "recipe_kept_buffers.npz"
    if not file.is_file():
        return {}
    with np.load(file) as data:
        return {k: data[k] for k in data.files}


def recipe_weights(path: Path, seed: int | None = None) -> dict[str, np.ndarray]:
    """Every state-dict entry of the reference policy at ``path``, drawn by the recipe (one generator, keys in
    Python ``sorted`` order, float64 arithmetic rounded once to float32)."""
    path = Path(path)
    if seed is None:
        seed = json.loads((path / "reference_meta.json").read_text())["weights"]["seed"]
    kept = kept_buffers(path)
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape, dtype in sorted(state_dict_entries(path)):
        last = key.rsplit(".", 1)[-1]
        if key in kept:
            value = np.asarray(kept[key])
        elif dtype in INT_DTYPES or last == "num_batches_tracked":
            value = np.zeros(shape, dtype)
        else:
            if last == "running_var":
                value = rng.uniform(0.5, 1.5, shape)
            elif last == "running_mean":
                value = 0.1 * rng.standard_normal(shape)
            elif len(shape) == 1 and last.endswith("weight"):
                value = 1 + 0.1 * rng.standard_normal(shape)
            elif len(shape) <= 1:
                value = 0.1 * rng.standard_normal(shape)
            else:
                value = rng.standard_normal(shape) / np.sqrt(float(math.prod(shape[1:])))
            value = value.astype(np.float32)
        out[key] = value
    return out


def recipe_digest(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 over key, dtype, shape and bytes of every entry in sorted order (the README's digest)."""
    h = hashlib.sha256()
    for key in sorted(weights):
        v = np.ascontiguousarray(weights[key])
        h.update(key.encode())
        h.update(str(v.dtype).encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.tobytes())
    return h.hexdigest()


def policy_dir(name: str, tmp_path: Path) -> Path:
    """A LeRobot policy directory as ``save_pretrained`` leaves it: the fixture's config and processor files plus
    ``model.safetensors`` written from the recipe. Returns the directory (``tmp_path / name``)."""
    from safetensors.numpy import save_file

    src = fixture(name)
    dst = Path(tmp_path) / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reference_*", "params.txt", "recipe_kept_buffers.npz"))
    save_file(recipe_weights(src), str(dst / "model.safetensors"))
    return dst


def reference(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """``(inputs, outputs, meta)`` of the reference calls: the two npz files as dicts and reference_meta.json."""
    src = fixture(name)
    with np.load(src / "reference_inputs.npz") as i, np.load(src / "reference_outputs.npz") as o:
        inputs, outputs = {k: i[k] for k in i.files}, {k: o[k] for k in o.files}
    return inputs, outputs, json.loads((src / "reference_meta.json").read_text())
