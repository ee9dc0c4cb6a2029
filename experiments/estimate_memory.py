"""Per-device memory of a policy's training state on a mesh, from abstract shapes only (nothing is allocated).

    python -m experiments.estimate_memory --fsdp=8 --tensor=1
    python -m experiments.estimate_memory --backbone=llama2_7b --encoder=dinosiglip --head=binned_lm \\
        --data=2 --fsdp=16 --tensor=2 --ema --device_memory_gib=16

The default is OpenVLA's layout (Llama-2-7B on fused DINOv2 + SigLIP at 224 px, LM-decoded action bins). The
model is built with ``nnx.eval_shape`` and laid out by the same rules the trainer uses
(:func:`vlax.train.state.abstract_shardings`), so the numbers are the trainer's: parameters (float32), the
optimizer state (AdamW: two float32 moments per trainable parameter, counted from ``tx.init``'s abstract output),
the EMA copy when on, and one gradient-sized buffer live during the step. Activations are not counted (they depend
on batch size and remat; see the compiled step's memory analysis the trainer prints).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from vlax.backbones import Transformer, get_config
from vlax.build import build_policy
from vlax.policy import PolicySpec
from vlax.train.optimizer import OptimizerConfig, make_optimizer
from vlax.train.sharding import FSDP_MIN_BYTES, MESH_AXES
from vlax.train.state import abstract_shardings

# Published parameter counts, to check an abstract build against.
PUBLISHED_PARAMS = {"llama2_7b": 6_738_415_616}

GIB = 2 ** 30


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` (``ShapeDtypeStruct`` leaves) laid out by ``shardings`` (the largest
    shard over devices: shards are equal-sized, since FSDP and the rules only split axes that divide evenly)."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, NamedSharding))):
        shard = s.shard_shape(tuple(x.shape)) if isinstance(s, NamedSharding) else tuple(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def total_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def count(tree: Any) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))


def openvla_model(backbone: str = "llama2_7b", encoder: str = "dinosiglip", head: str = "binned_lm",
                  image_size: int = 224) -> tuple[dict, PolicySpec, int]:
    """``(model config, spec, text vocabulary)`` of an OpenVLA-style policy (7-dim actions, one camera, no state)."""
    model = {"encoder": encoder, "encoder_kwargs": {}, "backbone": backbone, "backbone_overrides": {"remat": "dots"},
             "head": head, "head_kwargs": {}, "head_defaults": {}, "state_input": "none", "dtype": "bfloat16"}
    spec = PolicySpec(cameras=("primary",), image_size=image_size, state_dim=0, action_dim=7, horizon=1,
                      max_text_len=32, state_input="none")
    vocab = get_config(backbone).vocab_size
    if head == "binned_lm":  # OpenVLA overwrites the last 256 ids with action bins: the vocabulary keeps its size
        vocab -= 256
    return model, spec, vocab


def estimate(model: dict, spec: PolicySpec, text_vocab_size: int, *, data: int = 1, fsdp: int = 1, tensor: int = 1,
             use_ema: bool = False, fsdp_min_bytes: int = FSDP_MIN_BYTES, freeze: str | None = None) -> dict:
    """Parameter counts and per-device bytes of the training state on a ``data x fsdp x tensor`` mesh."""
    mesh = AbstractMesh((data, fsdp, tensor), MESH_AXES)
    abstract = nnx.eval_shape(lambda: build_policy(model, spec, text_vocab_size, nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    rest = nnx.state(abstract, nnx.Not(nnx.Param))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=1, freeze=freeze), params)
    opt_state = jax.eval_shape(tx.init, params)
    shard = lambda tree: abstract_shardings(tree, mesh, fsdp_min_bytes=fsdp_min_bytes)  # noqa: E731
    param_sh, opt_sh, rest_sh = shard(params), shard(opt_state), shard(rest)
    components = {name: count(nnx.state(getattr(abstract, name), nnx.Param))
                  for name in ("encoder", "backbone", "head") if hasattr(abstract, name)}
    per_device = {"params": per_device_bytes(params, param_sh), "optimizer": per_device_bytes(opt_state, opt_sh),
                  "ema": per_device_bytes(params, param_sh) if use_ema else 0,
                  "gradients": per_device_bytes(params, param_sh), "other": per_device_bytes(rest, rest_sh)}
    return {"mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "num_params": count(params),
            "components": components, "total_bytes": {"params": total_bytes(params),
                                                     "optimizer": total_bytes(opt_state)},
            "per_device_bytes": per_device, "per_device_total_bytes": sum(per_device.values())}


def backbone_params(name: str) -> int:
    """Parameters of a named backbone alone, built abstractly."""
    abstract = nnx.eval_shape(lambda: Transformer(get_config(name), rngs=nnx.Rngs(0)))
    return count(nnx.state(abstract, nnx.Param))


def report(result: dict, device_memory_gib: float | None = None) -> str:
    m, d = result["mesh"], result["per_device_bytes"]
    lines = [f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} "
             f"({m['data'] * m['fsdp'] * m['tensor']} devices)",
             f"parameters: {result['num_params']:,} (" + ", ".join(f"{k} {v:,}" for k, v in
                                                             result["components"].items()) + ")",
             "per device:"]
    for key in ("params", "optimizer", "ema", "gradients", "other"):
        if d[key]:
            lines.append(f"  {key:<10} {d[key] / GIB:8.2f} GiB")
    total = result["per_device_total_bytes"] / GIB
    lines.append(f"  {'total':<10} {total:8.2f} GiB (+ activations)")
    if device_memory_gib:
        verdict = "fits" if total < device_memory_gib else "does NOT fit"
        lines.append(f"  {verdict} in {device_memory_gib:g} GiB per device before activations")
    return "\n".join(lines)


_BACKBONE = flags.DEFINE_string("backbone", "llama2_7b", "named backbone config (vlax.backbones.get_config)")
_ENCODER = flags.DEFINE_string("encoder", "dinosiglip", "named encoder (vlax.encoders.ENCODERS)")
_HEAD = flags.DEFINE_string("head", "binned_lm", "action head (vlax.heads.HEADS)")
_IMAGE = flags.DEFINE_integer("image_size", 224, "input image size")
_DATA = flags.DEFINE_integer("data", 1, "data-parallel mesh axis")
_FSDP = flags.DEFINE_integer("fsdp", 8, "FSDP mesh axis")
_TENSOR = flags.DEFINE_integer("tensor", 1, "tensor-parallel mesh axis")
_EMA = flags.DEFINE_bool("ema", False, "count an EMA copy of the parameters")
_FREEZE = flags.DEFINE_string("freeze", None, "regex of frozen parameter paths (no optimizer state)")
_FSDP_MIN = flags.DEFINE_integer("fsdp_min_bytes", FSDP_MIN_BYTES, "arrays at least this large are FSDP-sharded")
_DEVICE_GIB = flags.DEFINE_float("device_memory_gib", None, "say whether the state fits in this much per device")
_JSON = flags.DEFINE_bool("json", False, "print the result as JSON")


def main(argv) -> None:
    del argv
    model, spec, vocab = openvla_model(_BACKBONE.value, _ENCODER.value, _HEAD.value, _IMAGE.value)
    result = estimate(model, spec, vocab, data=_DATA.value, fsdp=_FSDP.value, tensor=_TENSOR.value,
                      use_ema=_EMA.value, fsdp_min_bytes=_FSDP_MIN.value, freeze=_FREEZE.value)
    published = PUBLISHED_PARAMS.get(_BACKBONE.value)
    if published is not None:
        own = backbone_params(_BACKBONE.value)
        result["backbone_alone"] = {"params": own, "published": published}
        if own != published:
            print(f"warning: {_BACKBONE.value} builds {own:,} parameters, published {published:,}", file=sys.stderr)
    print(json.dumps(result, indent=1) if _JSON.value else report(result, _DEVICE_GIB.value))
    if published is not None and not _JSON.value:
        print(f"{_BACKBONE.value} alone: {result['backbone_alone']['params']:,} parameters "
              f"(published {published:,})")


if __name__ == "__main__":
    app.run(main)
