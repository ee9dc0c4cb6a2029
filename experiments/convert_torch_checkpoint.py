"""Convert a PyTorch checkpoint (``.pth`` / ``.pt``, e.g. RoboFlamingo's released files) to one ``.safetensors``.

    python -m experiments.convert_torch_checkpoint --input checkpoint_..._mpt_dolly_3b_4.pth \\
        --output roboflamingo_3b.safetensors

This is the one place in vlax that reads a torch file, and it reads it with PyTorch's restricted loader
(``torch.load(..., weights_only=True)``: tensors, containers and plain values only; a file that needs any other
object is refused instead of unpickled). The library itself reads only the ``.safetensors`` written here
(:mod:`vlax.weights.roboflamingo`).

The state dict is ``model_state_dict`` of a training checkpoint (RoboFlamingo saves ``{"epoch",
"model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict"}``), ``state_dict`` / ``model`` when present,
or the file itself when it maps names to tensors. Nested dicts are flattened with dots; tensors that share memory
(RoboFlamingo registers each cross-attention block under two names) are written as separate copies; names and
dtypes are kept (the ``module.`` prefix of DDP too; the importer strips it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from absl import app, flags

STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")


def state_dict_of(obj: Any) -> dict[str, Any]:
    """The name -> tensor mapping inside a loaded checkpoint object (see the module docstring)."""
    import torch

    if not isinstance(obj, Mapping):
        raise ValueError(f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", obj)
    if not out:
        raise ValueError(f"no tensors found in the checkpoint (top-level keys: {sorted(map(str, obj))[:10]})")
    return out


def convert(source: str | Path, target: str | Path) -> dict[str, tuple[int, ...]]:
    """Read ``source`` with ``torch.load(weights_only=True)`` and write its tensors to ``target`` (safetensors).
    Returns ``{name: shape}`` of what was written."""
    import torch
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"--input {source} does not exist")
    if target.suffix != ".safetensors":
        raise ValueError(f"--output {target} must end in .safetensors")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler names the object it refused
        raise ValueError(f"{source} cannot be read with torch.load(weights_only=True): {e}") from None
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict_of(obj).items()}  # no shared storage
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={"converted_from": source.name})
    return {k: tuple(v.shape) for k, v in tensors.items()}


_INPUT = flags.DEFINE_string("input", None, "the .pth / .pt checkpoint to read", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "the .safetensors file to write", required=True)


def main(argv: list[str]) -> None:
    del argv
    written = convert(_INPUT.value, _OUTPUT.value)
    print(f"wrote {len(written)} tensors to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
