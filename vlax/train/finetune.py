"""Start a run from another run's parameters when the model differs (new head, other action dimension).

Parameters whose path matches the ``reinit`` regex keep their fresh initialisation and are listed (so do LoRA
adapters the checkpoint lacks; a LoRA-wrapped layer's ``base/`` weights come from the checkpoint's plain layer);
every other parameter must exist in the checkpoint with the same shape, or the transplant fails naming it (silent shape
mismatches broke fine-tuning in other VLA code bases).

:func:`transplant` works on host trees (small models). :func:`transplant_sharded` and :func:`place_on_shardings`
build each array directly on its sharding, one source array at a time, reading only the slices this process's
devices hold: a checkpoint or pretrained import never passes the whole tree through one host.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Sharding


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_source_leaf)[0]
    return {_name(path): v for path, v in leaves}


# A Dense wrapped by vlax.nn.apply_lora keeps its weights under `base/`; its adapters start fresh (lora_b = 0, so
# the wrapped layer computes exactly what the checkpoint's plain layer did).
_LORA_BASE = re.compile(r"^(.*)/base/(kernel|bias)$")
_LORA_ADAPTER = re.compile(r"/lora_[ab]$")


def _source_name(name: str, old: Mapping[str, Any]) -> str | None:
    """The checkpoint path holding the target ``name`` (a LoRA-wrapped layer reads its plain layer's), or None."""
    if name in old:
        return name
    m = _LORA_BASE.match(name)
    plain = f"{m.group(1)}/{m.group(2)}" if m else None
    return plain if plain in old else None


def _is_source_leaf(x: Any) -> bool:
    # loaders and lazily sliced arrays (np.memmap, safetensors slices) are leaves, not pytrees to descend into
    return callable(x) or (hasattr(x, "shape") and not isinstance(x, Mapping))


def transplant(new_params: Any, old_params: Any, reinit: str = "") -> tuple[Any, list[str], list[str]]:
    """``(params, reinitialised paths, unused checkpoint paths)``; ``new_params`` gives the structure."""
    pattern = re.compile(reinit) if reinit else None
    old = _flat(old_params)
    reinitialised, problems = [], []
    taken = set()

    def pick(path, new_value):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        source = _source_name(name, old)
        if (pattern is not None and pattern.search(name)) or (source is None and _LORA_ADAPTER.search(name)):
            reinitialised.append(name)
            return new_value
        if source is None:
            problems.append(f"{name} {tuple(np.shape(new_value))} is not in the checkpoint")
            return new_value
        if tuple(np.shape(old[source])) != tuple(np.shape(new_value)):
            problems.append(f"{name}: checkpoint {tuple(np.shape(old[source]))} vs model "
                            f"{tuple(np.shape(new_value))}")
            return new_value
        taken.add(source)
        value = old[source]
        return np.asarray(value).astype(np.asarray(new_value).dtype) if hasattr(new_value, "dtype") else value

    params = jax.tree_util.tree_map_with_path(pick, new_params)
    if problems:
        raise ValueError("cannot load the checkpoint into this model; re-initialise these with --config.finetune."
                         "reinit=<regex> or fix the config:\n  " + "\n  ".join(problems))
    unused = sorted(set(old) - taken)
    return params, sorted(reinitialised), unused


# ---- sharded placement ---------------------------------------------------------------------------------------------

ArraySource = Any  # an array (numpy / jax), something sliced lazily (``.shape`` + ``[index]``), or ``() -> array``


def _source_shape(source: ArraySource) -> tuple[int, ...] | None:
    shape = getattr(source, "shape", None)
    if shape is None and hasattr(source, "get_shape"):  # safetensors' lazy slices
        shape = source.get_shape()
    return None if shape is None else tuple(int(d) for d in shape)


def place_array(source: ArraySource, sharding: Sharding, dtype: Any = None, *, name: str = "array",
                shape: tuple[int, ...] | None = None) -> jax.Array:
    """One global array laid out by ``sharding``, built from the slices this process's devices hold.

    ``source``: a numpy or jax array, an object sliced lazily (``.shape`` and ``source[index]``: ``np.memmap``,
    a safetensors slice), or a zero-argument loader returning one. Only ``source[index]`` of each addressable
    shard is read (a jax array is first copied to the host once: at most this one array is there at a time);
    values are cast to ``dtype`` per shard. Works in every process of a multi-host run (each builds its shards).
    ``shape``: the expected global shape; a mismatch is an error naming ``name``.
    """
    if callable(source) and _source_shape(source) is None:
        source = source()
    if isinstance(source, jax.Array):
        source = np.asarray(source)  # one array through the host, not a device-to-device copy of the whole tree
    got = _source_shape(source)
    if got is None:
        source = np.asarray(source)
        got = source.shape
    if shape is not None and tuple(shape) != got:
        raise ValueError(f"{name}: source {got} vs target {tuple(shape)}")
    dtype = np.dtype(dtype) if dtype is not None else np.dtype(source.dtype)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(source[index]).astype(dtype, copy=False)

    return jax.make_array_from_callback(got, sharding, shard)


def place_on_shardings(sources: Any, shardings: Any, dtypes: Any = None) -> Any:
    """:func:`place_array` leaf by leaf: ``sources`` (leaves: arrays, lazy arrays or loaders) laid out by the
    ``shardings`` tree of the same structure; ``dtypes`` (same structure, optional) casts. Arrays are placed one
    after another, so the host holds at most one source array at a time (when the sources are loaders)."""
    flat_sources = _flat(sources)
    flat_shardings = _flat(shardings)
    if flat_sources.keys() != flat_shardings.keys():
        missing = sorted(set(flat_shardings) - set(flat_sources))
        extra = sorted(set(flat_sources) - set(flat_shardings))
        raise ValueError(f"sources and shardings differ: missing {missing[:8]}, extra {extra[:8]}")
    flat_dtypes = _flat(dtypes) if dtypes is not None else {}
    placed = {n: place_array(flat_sources[n], flat_shardings[n], flat_dtypes.get(n), name=n) for n in flat_shardings}
    return jax.tree_util.tree_map_with_path(lambda path, _: placed[_name(path)], shardings)


def _plan(new: dict[str, Any], old: dict[str, Any], reinit: str,
          layout: dict[str, Any] | None) -> tuple[list[str], dict[str, str]]:
    """``(re-initialised target paths, {target path: checkpoint path})``; every problem raised at once. With
    ``layout=None`` only names and shapes are checked (abstract targets, before any array exists)."""
    pattern = re.compile(reinit) if reinit else None
    reinitialised, problems, taken = [], [], {}
    for name, value in new.items():
        source = _source_name(name, old)
        if (pattern is not None and pattern.search(name)) or (source is None and _LORA_ADAPTER.search(name)):
            reinitialised.append(name)
            if layout is not None and not isinstance(value, jax.Array):
                problems.append(f"{name} matches reinit but the target has no initialised value (pass arrays)")
            continue
        if source is None:
            problems.append(f"{name} {tuple(np.shape(value))} is not in the checkpoint")
            continue
        shape = _source_shape(old[source])
        if shape is not None and shape != tuple(value.shape):
            problems.append(f"{name}: checkpoint {shape} vs model {tuple(value.shape)}")
            continue
        if layout is not None and layout.get(name) is None:
            problems.append(f"{name} has no sharding; pass shardings= or sharded target arrays")
        taken[name] = source
    if problems:
        raise ValueError("cannot load the checkpoint into this model; re-initialise these with --config.finetune."
                         "reinit=<regex> or fix the config:\n  " + "\n  ".join(problems))
    return reinitialised, taken


def check_transplant(target: Any, source: Mapping[str, Any], reinit: str = "") -> None:
    """The name and shape checks of :func:`transplant_sharded` alone, on leaves that only need ``.shape``
    (``jax.ShapeDtypeStruct``, a checkpoint's array metadata): run before the train state is built or compiled."""
    _plan(_flat(target), _flat(source), reinit, None)


def transplant_sharded(target: Any, source: Mapping[str, Any], reinit: str = "",
                       shardings: Any = None) -> tuple[Any, list[str], list[str]]:
    """:func:`transplant` that builds each array on its sharding: ``(params, reinitialised, unused)``.

    ``target``: the new model's parameters as a pure nested dict (``nnx.to_pure_dict(state.params)``) of sharded
    ``jax.Array`` (their ``.sharding`` is the layout; re-initialised paths keep these arrays, already in place) or
    of ``jax.ShapeDtypeStruct`` with shardings (then nothing may be re-initialised). ``source``: the checkpoint's
    parameters, nested or flat (``"backbone/embed/embedding"``), leaves as in :func:`place_array` (a loader is
    called only for the paths used). ``shardings`` overrides the targets' own. Every problem found without loading
    (missing paths, shapes known up front) is reported at once, naming the fix.
    """
    old = _flat(source)
    new = _flat(target)
    layout = _flat(shardings) if shardings is not None else {n: getattr(v, "sharding", None) for n, v in new.items()}
    reinitialised, taken = _plan(new, old, reinit, layout)
    placed = {}
    for name, value in new.items():
        if name in taken:  # one array at a time: loaded, cut into this process's shards, released
            placed[name] = place_array(old[taken[name]], layout[name], value.dtype, name=name,
                                       shape=tuple(value.shape))
        else:
            placed[name] = value
    params = jax.tree_util.tree_map_with_path(lambda path, _: placed[_name(path)], target)
    return params, sorted(reinitialised), sorted(set(old) - set(taken.values()))
