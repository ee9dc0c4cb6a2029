"""Import RoboFlamingo's trained weights (converted to safetensors) into a
:class:`vlax.presets.roboflamingo.RoboFlamingo`.

RoboFlamingo releases ``.pth`` pickles; convert one first (the only place vlax reads a torch file)::

    python -m experiments.convert_torch_checkpoint --input checkpoint_..._mpt_dolly_3b_4.pth --output rf.safetensors

A RoboFlamingo checkpoint holds only what it trained (``model_state_dict``, names with DDP's ``module.``
prefix): the perceiver resampler, the gated cross-attention blocks, the LM's input embeddings and the policy head.
The frozen parts come from their own checkpoints: CLIP ViT-L/14 with :func:`vlax.weights.clip.load_clip`, the
LM's decoder layers with :mod:`vlax.weights.llama` (RoboFlamingo's ``llama_9b``). So the order is: build the
policy, load CLIP and the LM, then this file::

    policy.vision = load_clip("/ckpt/clip-vit-large-patch14")
    load_roboflamingo(policy, "rf.safetensors")

Names read (after ``module.``):

* ``perceiver.latents`` -> ``resampler.latents``; ``perceiver.layers.{i}.0.{norm_media, norm_latents, to_q,
  to_kv, to_out}`` -> ``resampler.layers`` (``to_kv`` split into k, v); ``perceiver.layers.{i}.1.{0, 1, 3}``
  (LayerNorm, Dense, Dense) -> ``resampler.layers.{ff_norm, ff.fc1, ff.fc2}``; ``perceiver.norm``;
* ``lang_encoder.gated_cross_attn_layers.{i}.{attn.{norm, to_q, to_kv, to_out}, attn_gate, ff.{0, 1, 3},
  ff_gate}`` -> ``lm.gated_cross_attn_layers`` (stacked, block ``i // n``);
* ``lang_encoder.transformer.wte`` (MPT) / ``lang_encoder.model.embed_tokens`` (LLaMA) -> ``lm.lm.embed_tokens``;
* ``lm_head.rnn.{weight, bias}_{ih, hh}_l{k}`` -> ``head.rnn.{k}.{input, hidden}_proj``;
  ``lm_head.{actions, gripper}.mlp.{0, 2, 4, 6}`` -> ``head.{actions, gripper}.{layers.*, out}``.

Cross-attention blocks sit at decoder layers ``i`` with ``(i + 1) % n == 0``; the second names OpenFlamingo gives
them (``lang_encoder.{transformer.blocks,model.layers}.{i}.gated_cross_attn_layer.*``) must equal the first and are
dropped. Decoder layers (``old_decoder_blocks``, ``*.decoder_layer.*``), the LM's final norm and output layer,
a CLIP copy (``vision_encoder.*``) and RoboFlamingo's action ``normalizer`` are skipped: they are loaded from their
own checkpoints (or unused). Any other name is an error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from vlax.weights.common import (
    CheckpointError,
    assign_params,
    linear_kernel,
    linear_rules,
    norm_rules,
    param_shapes,
    read_safetensors,
    rename_tensors,
    safetensors_files,
    stack_numbered,
)

SKIPPED = re.compile(r"lang_encoder\.old_decoder_blocks\..*|lang_encoder\.(transformer\.blocks|model\.layers)\.\d+"
                     r"\.decoder_layer\..*|lang_encoder\.(transformer\.norm_f|model\.norm|lm_head)\..*"
                     r"|vision_encoder\..*|normalizer\..*")
ALIAS = re.compile(r"lang_encoder\.(?:transformer\.blocks|model\.layers)\.(\d+)\.gated_cross_attn_layer\.(.+)")
BLOCK = re.compile(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)")

_P = r"perceiver\.layers\.\*\."
_X = r"xattn\.\*\."
_XT = "lm.gated_cross_attn_layers"
RULES = [
    (r"perceiver\.latents", "resampler.latents", None),
    *norm_rules(_P + r"0\.(norm_media|norm_latents)", r"resampler.layers.\1"),
    (_P + r"0\.to_q\.weight", "resampler.layers.attn.q_proj.kernel", linear_kernel),
    (_P + r"0\.to_k\.weight", "resampler.layers.attn.k_proj.kernel", linear_kernel),
    (_P + r"0\.to_v\.weight", "resampler.layers.attn.v_proj.kernel", linear_kernel),
    (_P + r"0\.to_out\.weight", "resampler.layers.attn.o_proj.kernel", linear_kernel),
    *norm_rules(_P + r"1\.0", "resampler.layers.ff_norm"),
    (_P + r"1\.1\.weight", "resampler.layers.ff.fc1.kernel", linear_kernel),
    (_P + r"1\.3\.weight", "resampler.layers.ff.fc2.kernel", linear_kernel),
    *norm_rules(r"perceiver\.norm", "resampler.norm"),
    *norm_rules(_X + r"attn\.norm", f"{_XT}.norm"),
    (_X + r"attn\.to_q\.weight", f"{_XT}.attn.q_proj.kernel", linear_kernel),
    (_X + r"attn\.to_k\.weight", f"{_XT}.attn.k_proj.kernel", linear_kernel),
    (_X + r"attn\.to_v\.weight", f"{_XT}.attn.v_proj.kernel", linear_kernel),
    (_X + r"attn\.to_out\.weight", f"{_XT}.attn.o_proj.kernel", linear_kernel),
    (_X + r"(attn_gate|ff_gate)", rf"{_XT}.\1", None),
    *norm_rules(_X + r"ff\.0", f"{_XT}.ff_norm"),
    (_X + r"ff\.1\.weight", f"{_XT}.ff.fc1.kernel", linear_kernel),
    (_X + r"ff\.3\.weight", f"{_XT}.ff.fc2.kernel", linear_kernel),
    (r"lang_encoder\.(?:transformer\.wte|model\.embed_tokens)\.weight", "lm.lm.embed_tokens.embedding", None),
    (r"lm_head\.rnn\.weight_ih_l(\d+)", r"head.rnn.\1.input_proj.kernel", linear_kernel),
    (r"lm_head\.rnn\.weight_hh_l(\d+)", r"head.rnn.\1.hidden_proj.kernel", linear_kernel),
    (r"lm_head\.rnn\.bias_ih_l(\d+)", r"head.rnn.\1.input_proj.bias", None),
    (r"lm_head\.rnn\.bias_hh_l(\d+)", r"head.rnn.\1.hidden_proj.bias", None),
]


def _tower_rules(num_hidden: int) -> list:
    """``lm_head.{actions,gripper}.mlp.{0,2,..}``: Linear layers between ReLUs, the last one the output layer."""
    rules = []
    for j in range(num_hidden):
        rules += linear_rules(rf"lm_head\.(actions|gripper)\.mlp\.{2 * j}", rf"head.\1.layers.{j}")
    return rules + linear_rules(rf"lm_head\.(actions|gripper)\.mlp\.{2 * num_hidden}", r"head.\1.out")


def _split_kv(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``to_kv.weight [2 * inner, D]`` (keys first, as torch's ``chunk(2)`` splits it) -> ``to_k`` / ``to_v``."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(".to_kv.weight"):
            if value.shape[0] % 2:
                raise CheckpointError(f"{name} has shape {value.shape}: its first axis is not 2 * inner")
            out[name.replace("to_kv", "to_k")], out[name.replace("to_kv", "to_v")] = np.split(np.asarray(value), 2)
        else:
            out[name] = value
    return out


def convert_roboflamingo_tensors(tensors: dict[str, np.ndarray], *, cross_attn_every: int, depth: int,
                                 tower_layers: int = 3) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Checkpoint tensors (any ``module.`` prefix) -> ``(flat vlax params, sources)``; see the module docstring.
    ``depth``: the LM's decoder layers; ``tower_layers``: hidden layers of the head's output towers."""
    tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
    kept, aliases = {}, {}
    for name, value in tensors.items():
        alias = ALIAS.fullmatch(name)
        if alias:
            aliases[f"lang_encoder.gated_cross_attn_layers.{alias.group(1)}.{alias.group(2)}"] = (name, value)
        elif not SKIPPED.fullmatch(name):
            kept[name] = value
    for canonical, (name, value) in aliases.items():
        if canonical not in kept:
            kept[canonical] = value
        elif not np.array_equal(np.asarray(kept[canonical]), np.asarray(value)):
            raise CheckpointError(f"{name} differs from {canonical}: the two names of one cross-attention block "
                                  "must hold the same tensor")
    n = int(cross_attn_every)
    blocks = {}
    for name, value in kept.items():
        m = BLOCK.fullmatch(name)
        if not m:
            blocks[name] = value
            continue
        layer = int(m.group(1))
        if (layer + 1) % n or layer >= depth:
            raise CheckpointError(f"{name}: a cross-attention block at decoder layer {layer}, but the model has one "
                                  f"before layers i with (i + 1) % {n} == 0 of {depth} (set cross_attn_every to the "
                                  "checkpoint's: 1 for mpt_3b / mpt_dolly_3b, 2 for mpt_4b, 4 for the 9B models)")
        blocks[f"xattn.{layer // n}.{m.group(2)}"] = value
    tensors = _split_kv(blocks)
    tensors = stack_numbered(tensors, "perceiver.layers.")
    tensors = stack_numbered(tensors, "xattn.", num_layers=depth // n)
    return rename_tensors(tensors, RULES + _tower_rules(tower_layers))


def load_roboflamingo(policy: Any, path: str | Path, *, strict: bool = True) -> Any:
    """Write the RoboFlamingo weights of ``path`` (a ``.safetensors`` file or directory) into ``policy`` in place
    and return it. Only the parts RoboFlamingo trains are written; with ``strict`` each of them must be in the file
    (a checkpoint without a policy head needs ``strict=False``). Shapes and dtypes are checked; names the file has
    and the policy does not are an error, naming both."""
    tensors = read_safetensors(safetensors_files(path))
    head = policy.head
    tower = len(head.actions.layers) if getattr(head, "actions", None) is not None else 3
    flat, sources = convert_roboflamingo_tensors(tensors, cross_attn_every=policy.lm.cross_attn_every,
                                                 depth=policy.lm.config.depth, tower_layers=tower)
    shapes = param_shapes(policy)
    unexpected = sorted(k for k in flat if k not in shapes)
    if unexpected:
        raise CheckpointError(f"{path}: tensors the policy has no parameter for: "
                              f"{[f'{k} (checkpoint {sources.get(k, k)!r})' for k in unexpected]}")
    trained = ("resampler.", "lm.gated_cross_attn_layers.", "lm.lm.embed_tokens.", "head.")
    missing = sorted(k for k in shapes if k.startswith(trained) and k not in flat)
    if missing and strict:
        raise CheckpointError(f"{path} lacks trained RoboFlamingo parameters: {missing[:12]}"
                              f"{' ...' if len(missing) > 12 else ''} (strict=False keeps their current values)")
    return assign_params(policy, flat, strict=False, sources=sources)


__all__ = ["convert_roboflamingo_tensors", "load_roboflamingo"]
