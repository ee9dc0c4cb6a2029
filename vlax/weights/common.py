"""Reading local Hugging Face checkpoint directories and assigning their tensors to NNX modules.

The pieces every converter (SigLIP, DINOv2, Llama, Gemma, ...) is built from::

    config, tensors = load_hf_dir(path)                      # config.json + *.safetensors (sharded index too)
    arch = check_architecture(config, SUPPORTED)             # clear error for anything else
    tensors, prefix = strip_prefix(tensors, ("vision_model.", ""))
    tensors = stack_numbered(tensors, "encoder.layers.")      # per-layer -> "encoder.layers.*.<rest>" [L, ...]
    flat, sources = rename_tensors(tensors, RULES, source_prefix=prefix)   # a table of renames (+ transposes)
    model = nnx.eval_shape(lambda: Model(...))               # abstract: nothing allocated yet
    assign_params(model, flat, sources=sources, dtype=jnp.bfloat16)   # validates every shape and dtype

Only safe formats are read: ``.safetensors`` files, never pickles. A directory holding only ``.bin`` / ``.pt`` /
``.pth`` / ``.ckpt`` weights is refused with a message saying how to convert it.

Flat parameter keys are dotted paths of the module's state (``"encoder.layers.mlp.fc1.kernel"``; list entries
appear as their index) or the same path as a tuple.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

CONFIG_NAME = "config.json"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

Key = str | tuple


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the offending file, key or value."""


_REFETCH = ("download it again from the original checkpoint (an interrupted download or copy leaves a truncated "
            "or partial file)")


def check_importer_kwargs(importer: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> None:
    """Refuses keyword arguments ``importer`` does not take, naming them and the ones it does (before any file is
    read); an importer taking ``**kwargs`` of its own (OpenVLA's LM overrides) accepts every name."""
    import inspect

    params = inspect.signature(importer).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                or (p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise CheckpointError(f"{what}'s importer {importer.__name__} takes no argument {unknown} (it takes "
                              f"{accepted or 'none'}); remove them from finetune.importer")


def _read_json_object(file: Path, what: str) -> dict:
    """A JSON object file; a syntax error or a non-object names the file instead of a bare JSON traceback."""
    try:
        with open(file) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}): the {what} is damaged; {_REFETCH}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(value).__name__}: the {what} is "
                              f"damaged; {_REFETCH}")
    return value


# --------------------------------------------------------------------------------------------- reading files


def read_config(path: str | Path) -> dict:
    """``config.json`` of a checkpoint directory as a dict."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a Hugging Face checkpoint directory needs a {CONFIG_NAME}")
    return _read_json_object(file, "model configuration")


def safetensors_files(path: str | Path) -> list[Path]:
    """The ``.safetensors`` files of a checkpoint (a directory, a sharded index, or one file).

    Pickle-based weight files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused: loading them would run
    arbitrary code. Convert such a checkpoint once with ``safetensors.torch.save_file`` (or
    ``model.save_pretrained(dir, safe_serialization=True)`` in transformers).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_message([path]))
        if path.name.endswith(".index.json"):
            return _files_from_index(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file")
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    index = path / SAFETENSORS_INDEX_NAME
    if index.is_file():
        return _files_from_index(index)
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(_pickle_message(pickles))
    raise CheckpointError(f"no .safetensors weights in {path} (found: {sorted(p.name for p in path.iterdir())})")


def _pickle_message(files: Sequence[Path]) -> str:
    names = ", ".join(str(f) for f in files)
    return (
        f"refusing to load pickle-based weights {names}: unpickling can run arbitrary code. "
        "Convert them to safetensors once, e.g. in transformers: "
        "`AutoModel.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)`, or "
        "`safetensors.torch.save_file(state_dict, 'model.safetensors')`."
    )


def _files_from_index(index: Path) -> list[Path]:
    weight_map = _read_json_object(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map'")
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"shards listed in {index} are missing: {missing}")
    bad = [str(f) for f in files if f.suffix != ".safetensors"]
    if bad:
        raise CheckpointError(_pickle_message([Path(b) for b in bad]))
    return files


# numpy has no bfloat16 / float8: safetensors.numpy cannot read those tensors, so they are read from the file's
# byte ranges directly (the header is JSON with dtype, shape and offsets) through ml_dtypes.
_EXTRA_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


def _header(file: Path) -> tuple[dict, int]:
    """``(tensor entries, data start)`` of a ``.safetensors`` file, checked against the file's size.

    A truncated file (the usual result of an interrupted download) is caught here from a ``stat`` and the header
    alone, before any tensor is read, so it never surfaces as a library error halfway through loading.
    """
    if not file.is_file():
        raise CheckpointError(f"weights file {file} does not exist")
    total = file.stat().st_size

    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{file} is not a complete .safetensors file: {why}; {_REFETCH}")

    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(f"it has {total} bytes, fewer than the 8-byte header length")
        (size,) = struct.unpack("<Q", head)
        if 8 + size > total:
            raise damaged(f"its header claims {size} bytes but the file has only {total}")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise damaged(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    header.pop("__metadata__", None)
    entries = list(header.values())
    if not all(isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= e.keys()
               and isinstance(e["data_offsets"], list) and len(e["data_offsets"]) == 2 for e in entries):
        raise damaged("a header entry lacks 'dtype', 'shape' or 'data_offsets [start, end]'")
    needed = 8 + size + max((int(e["data_offsets"][1]) for e in entries), default=0)
    if needed > total:
        raise damaged(f"it is truncated: its header describes {needed} bytes, the file has {total}")
    return header, 8 + size


def read_safetensors(
    files: str | Path | Sequence[str | Path], *, select: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """All tensors of one or more ``.safetensors`` files as numpy arrays (memory-mapped until used).

    ``select(name)`` keeps only some tensors (e.g. the vision tower of a 3B-parameter VLM). bfloat16 and float8
    tensors come back as ``ml_dtypes`` arrays.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    out: dict[str, np.ndarray] = {}
    for file in map(Path, files):
        if file.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_message([file]))
        header, data_start = _header(file)
        names = [n for n in header if select is None or select(n)]
        extra = {n for n in names if header[n]["dtype"] in _EXTRA_DTYPES}
        if len(extra) < len(names):
            try:
                with safe_open(str(file), framework="np") as handle:
                    for n in names:
                        if n not in extra:
                            out[n] = handle.get_tensor(n)
            except SafetensorError as e:  # damage the size check above cannot see (e.g. overlapping offsets)
                raise CheckpointError(f"{file} is not a readable .safetensors file ({e}); {_REFETCH}") from None
        if extra:
            raw = np.memmap(file, dtype=np.uint8, mode="r")
            for n in extra:
                info = header[n]
                start, end = info["data_offsets"]
                dtype = np.dtype(_EXTRA_DTYPES[info["dtype"]])
                count = int(np.prod(info["shape"], dtype=np.int64))
                if end - start != count * dtype.itemsize:
                    raise CheckpointError(f"{file}: tensor {n!r} has {end - start} bytes for shape {info['shape']}")
                out[n] = raw[data_start + start:data_start + end].view(dtype).reshape(info["shape"])
    return out


def tensor_names(path: str | Path) -> list[str]:
    """Names of all tensors of a checkpoint (read from the file headers only; no tensor data is read)."""
    return sorted(name for file in safetensors_files(path) for name in _header(file)[0])


def load_hf_dir(
    path: str | Path, *, select: Callable[[str], bool] | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a local Hugging Face checkpoint directory.

    Reads ``config.json`` and every ``*.safetensors`` file (or the shards named by
    ``model.safetensors.index.json``). ``select`` filters tensor names. Pickle weights are refused.
    """
    files = safetensors_files(path)  # first, so that pickle weights are refused before anything else
    path = Path(path)
    config = read_config(path if path.is_dir() else path.parent)
    return config, read_safetensors(files, select=select)


def check_architecture(config: Mapping, supported: Iterable[str]) -> str:
    """The first ``config["architectures"]`` entry (or ``model_type``) if supported, else a clear error."""
    supported = list(supported)
    names = list(config.get("architectures") or [])
    for name in names:
        if name in supported:
            return name
    if not names and config.get("model_type") in supported:
        return config["model_type"]
    found = names or config.get("model_type")
    raise CheckpointError(f"unsupported architecture {found!r} in config.json; supported: {supported}")


# ------------------------------------------------------------------------------------------ renaming tensors


def strip_prefix(tensors: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> tuple[dict[str, np.ndarray], str]:
    """Drop the first of ``prefixes`` that any key starts with (in order; ``""`` matches everything).

    Keys without that prefix are kept unchanged so that they are reported as unexpected later.
    Returns ``(tensors, prefix_found)``.
    """
    for prefix in prefixes:
        if prefix == "" or any(k.startswith(prefix) for k in tensors):
            n = len(prefix)
            return {(k[n:] if k.startswith(prefix) else k): v for k, v in tensors.items()}, prefix
    raise CheckpointError(f"no tensor name starts with any of {list(prefixes)}; first names: {sorted(tensors)[:8]}")


def stack_numbered(
    tensors: Mapping[str, np.ndarray], prefix: str, out_prefix: str | None = None, num_layers: int | None = None
) -> dict[str, np.ndarray]:
    """Stack per-layer tensors ``{prefix}{i}.{rest}`` into ``{out_prefix}{rest}`` of shape ``[L, ...]``.

    ``out_prefix`` defaults to ``{prefix}*.`` (``encoder.layers.*.mlp.fc1.weight``), which keeps error messages
    readable as checkpoint names. Every layer must have the same set of tensors; a layer lacking one
    (or a gap in the numbering) is an error that names the missing keys. Other keys pass through unchanged.
    """
    out_prefix = prefix + "*." if out_prefix is None else out_prefix
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    per_rest: dict[str, dict[int, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        m = pattern.fullmatch(key)
        if m:
            per_rest.setdefault(m.group(2), {})[int(m.group(1))] = value
        else:
            out[key] = value
    if not per_rest:
        if num_layers:
            raise CheckpointError(f"no per-layer tensors named {prefix}<i>.* in the checkpoint")
        return out
    found = max(max(layers) for layers in per_rest.values()) + 1
    num_layers = found if num_layers is None else num_layers
    missing = [f"{prefix}{i}.{rest}" for rest, layers in per_rest.items() for i in range(num_layers) if i not in layers]
    if missing:
        raise CheckpointError(f"missing per-layer tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    extra = sorted({f"{prefix}{i}.*" for layers in per_rest.values() for i in layers if i >= num_layers})
    if extra:
        raise CheckpointError(f"checkpoint has more layers than the model's {num_layers}: unexpected {extra}")
    for rest, layers in per_rest.items():
        by_shape: dict[tuple, list[int]] = {}
        for i in range(num_layers):
            by_shape.setdefault(tuple(np.shape(layers[i])), []).append(i)
        if len(by_shape) > 1:
            found = ", ".join(f"{shape} in layers {ids}" for shape, ids in by_shape.items())
            raise CheckpointError(f"{prefix}<i>.{rest} has different shapes across layers: {found}")
        out[out_prefix + rest] = np.stack([np.asarray(layers[i]) for i in range(num_layers)])
    return out


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch ``nn.Linear.weight [..., out, in]`` -> vlax ``Dense.kernel [..., in, out]`` (stacked layers too)."""
    return np.swapaxes(w, -1, -2)


Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray] | None]


def linear_rules(source: str, target: str) -> list[Rule]:
    """Rules for a torch ``nn.Linear`` at regex ``source`` -> vlax ``Dense`` at ``target`` (kernel transposed).

    Groups captured in ``source`` may be used in ``target`` (``\\1``).
    """
    return [(source + r"\.weight", target + ".kernel", linear_kernel), (source + r"\.bias", target + ".bias", None)]


def norm_rules(source: str, target: str) -> list[Rule]:
    """Rules for a torch ``LayerNorm`` / ``RMSNorm`` at regex ``source`` -> vlax norm at ``target``."""
    return [(source + r"\.weight", target + ".scale", None), (source + r"\.bias", target + ".bias", None)]


def rename_tensors(
    tensors: Mapping[str, np.ndarray], rules: Sequence[Rule], *, source_prefix: str = ""
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Rename checkpoint tensors by a table of ``(source_regex, target_template, transform)`` rules.

    The first rule whose regex matches a whole name wins; the target is ``re.Match.expand(target_template)``
    and ``transform`` (e.g. :func:`linear_kernel`) converts the array. Names no rule matches are kept as they
    are, so :func:`assign_params` reports them as unexpected. Returns ``(renamed, sources)``, ``sources``
    mapping each new name to its checkpoint name (for error messages), with ``source_prefix`` (the prefix
    :func:`strip_prefix` removed) put back. Stacked tensors are named ``<prefix>*.<rest>``.
    """
    compiled = [(re.compile(src), dst, fn) for src, dst, fn in rules]
    out: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for key, value in tensors.items():
        for regex, dst, fn in compiled:
            m = regex.fullmatch(key)
            if m:
                new_key = m.expand(dst)
                value = fn(value) if fn is not None else value
                break
        else:
            new_key = key
        if new_key in out:
            raise CheckpointError(f"checkpoint tensors {sources[new_key]!r} and {key!r} both map to {new_key!r}")
        out[new_key], sources[new_key] = value, source_prefix + key
    return out, sources


# ------------------------------------------------------------------------------------- assigning to a module


def _key_str(key: Key) -> str:
    return key if isinstance(key, str) else ".".join(str(k) for k in key)


def param_shapes(module: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """``{dotted path: ShapeDtypeStruct}`` of every ``nnx.Param`` of ``module`` (concrete or abstract)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = var.get_value()
        out[_key_str(path)] = jax.ShapeDtypeStruct(tuple(value.shape), value.dtype)
    return out


def _kind(dtype) -> str:
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    if dtype == np.bool_:
        return "bool"
    if jnp.issubdtype(dtype, jnp.integer):
        return "int"
    return str(dtype)


def assign_params(
    module: nnx.Module,
    flat: Mapping[Key, np.ndarray | jax.Array],
    *,
    strict: bool = True,
    dtype=None,
    sources: Mapping[str, str] | None = None,
) -> nnx.Module:
    """Write ``flat {path: array}`` into ``module``'s parameters in place and return ``module``.

    ``module`` may be abstract (built with ``nnx.eval_shape``), so a large model is never initialised only to
    be overwritten. Every array is checked against the parameter it replaces: same shape, same kind of dtype
    (float/int/bool). Floating arrays are cast to ``dtype`` if given (e.g. ``jnp.bfloat16``), else to the
    parameter's own dtype. With ``strict`` (default) missing and unexpected keys are errors; otherwise missing
    parameters keep their values (the module must then be concrete) and unexpected keys are ignored. All
    problems are reported together in one :class:`CheckpointError`; ``sources`` (from :func:`rename_tensors`)
    adds the checkpoint name of each key to the message.
    """
    sources = sources or {}
    given = {_key_str(k): v for k, v in flat.items()}
    variables = {_key_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}

    def name(key: str) -> str:
        src = sources.get(key)
        return f"{key} (checkpoint {src!r})" if src and src != key else key

    problems: list[str] = []
    missing = sorted(k for k in variables if k not in given)
    unexpected = sorted(k for k in given if k not in variables)
    if missing and (strict or any(isinstance(variables[k].get_value(), jax.ShapeDtypeStruct) for k in missing)):
        why = "" if strict else " (the module is abstract, so every parameter needs a value)"
        problems.append(f"missing keys{why}: {missing}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {[name(k) for k in unexpected]}")
    for key in sorted(k for k in given if k in variables):
        have, want = given[key], variables[key].get_value()
        if tuple(np.shape(have)) != tuple(want.shape):
            problems.append(f"{name(key)}: checkpoint shape {tuple(np.shape(have))} != model shape {tuple(want.shape)}")
        elif _kind(have.dtype) != _kind(want.dtype):
            problems.append(f"{name(key)}: checkpoint dtype {np.dtype(have.dtype)} cannot be loaded into a "
                            f"{np.dtype(want.dtype)} parameter")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match {type(module).__name__}:\n  " + "\n  ".join(problems)
        )
    for key, var in variables.items():
        if key not in given:
            continue
        want = var.get_value()
        target = dtype if dtype is not None and _kind(want.dtype) == "float" else want.dtype
        var.set_value(jnp.asarray(given[key], dtype=target))
    return module


def to_numpy_flat(module: nnx.Module) -> dict[str, np.ndarray]:
    """``{dotted path: numpy array}`` of every parameter of a concrete module (the inverse of assignment)."""
    return {_key_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def find_prefix(names: Sequence[str], prefixes: Sequence[str], marker: str, what: str) -> str:
    """The first of ``prefixes`` under which ``marker`` (a tensor every such model has) is among ``names``."""
    for prefix in prefixes:
        if prefix + marker in names:
            return prefix
    raise CheckpointError(f"no {what} found: expected a tensor named '<prefix>{marker}' with <prefix> one of "
                          f"{list(prefixes)}; first tensor names: {list(names)[:8]}")


def load_prefixed(path: str | Path, prefix: str, skip: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """The tensors under ``prefix`` in the checkpoint directory ``path`` (minus ``skip``), prefix removed."""
    _, tensors = load_hf_dir(path, select=lambda n: n.startswith(prefix) and not (skip and skip(n)))
    return strip_prefix(tensors, (prefix,))[0]
