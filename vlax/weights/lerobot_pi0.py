"""Import a LeRobot PI0 / PI05 policy directory into :class:`vlax.presets.pi0.Pi0Policy`.

The directory is what ``PI0Policy.save_pretrained`` / ``PI05Policy.save_pretrained`` plus the processors write:
``config.json`` (type ``pi0`` / ``pi05``), ``model.safetensors`` (HF PaliGemma names under
``model.paligemma_with_expert.paligemma.``, the expert under ``model.paligemma_with_expert.gemma_expert.``, the
flow projections under ``model.``), and the pre/post-processor files (read by :mod:`vlax.weights.lerobot_policy`).

Details LeRobot fixes and this importer follows:

* the Gemma sizes come from ``paligemma_variant`` / ``action_expert_variant`` (``sizes=`` overrides them for
  checkpoints whose config names a variant other than its real sizes);
* the expert's RMSNorm is Gemma's ``1 + w`` (folded into the plain scale here), π0.5's adaptive norms keep their
  ``dense`` projection as the modulation;
* time features are computed in float64 on the host and the Euler time is accumulated (``t += dt``), as LeRobot
  does on CPU; the unused ``lm_head`` weights (PaliGemma's and the expert's) are not loaded.

Example::

    policy, pipeline = load_lerobot_pi0("/ckpt/pi05_libero")
    inputs = pipeline.model_inputs({"images": {"top": frames}, "state": state, "prompt": ["pick the cube"]})
    actions = pipeline.actions(policy.sample(inputs, rngs=jax.random.key(0)))   # [B, 50, A] robot units
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from vlax.observation import ObservationPipeline
from vlax.policy import PolicySpec
from vlax.presets.pi0 import Pi0Policy, sizes_from_model
from vlax.weights.common import CheckpointError, assign_params, linear_kernel, read_config, stack_numbered
from vlax.weights.lerobot_policy import camera_name, read_policy_dir
from vlax.weights.llama import convert_decoder_tensors
from vlax.weights.siglip import convert_siglip_tensors

TYPES = ("pi0", "pi05")
PALIGEMMA = "model.paligemma_with_expert.paligemma."
VISION = PALIGEMMA + "model.vision_tower.vision_model."
PROJECTOR = PALIGEMMA + "model.multi_modal_projector.linear."
LANGUAGE = PALIGEMMA + "model.language_model."
EXPERT = "model.paligemma_with_expert.gemma_expert.model."
UNUSED = (PALIGEMMA + "lm_head.weight", "model.paligemma_with_expert.gemma_expert.lm_head.weight")
PROJECTIONS = ("action_in_proj", "action_out_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out",
               "time_mlp_in", "time_mlp_out")


def model_config(config: Mapping[str, Any], sizes: Mapping[str, Any] | None = None) -> dict:
    """The ``model`` section of a vlax config (``preset='pi0'`` / ``'pi05'``) describing this checkpoint.

    ``sizes``: optional ``{"llm": {...}, "expert": {...}, "vision": {...}, "vocab_size": n}`` replacing what the
    variant names imply (Gemma fields: width, depth, mlp_dim, num_heads, num_kv_heads, head_dim; vision: width,
    depth, mlp_dim, num_heads, patch_size).
    """
    pi05 = config["type"] == "pi05"
    resolution = tuple(int(x) for x in config.get("image_resolution", (224, 224)))
    if resolution[0] != resolution[1]:
        raise CheckpointError(f"image_resolution={list(resolution)}: the pi0 preset reads square frames")
    pi0 = dict(paligemma_variant=config.get("paligemma_variant", "gemma_2b"),
               action_expert_variant=config.get("action_expert_variant", "gemma_300m"),
               vision=dict(variant="So400m/14", image_size=resolution[0]), pi05=pi05,
               num_steps=int(config.get("num_inference_steps", 10)))
    extra = dict(sizes or {})
    if extra:
        pi0.update({k: extra[k] for k in ("llm", "expert", "vocab_size") if k in extra})
        pi0["vision"] = {**pi0["vision"], **dict(extra.get("vision", {}))}
    dims = int(config["max_action_dim"])
    if int(config["max_state_dim"]) != dims:
        raise CheckpointError(f"max_state_dim={config['max_state_dim']} differs from max_action_dim={dims}; the pi0 "
                              "preset pads both to one size")
    return dict(preset=config["type"], head="flow_pi05" if pi05 else "flow", head_kwargs={}, state_dim=dims,
                action_dim=dims, max_text_len=int(config.get("tokenizer_max_length", 48)), pi0=pi0,
                state_input="none" if pi05 else "head")


def _expert(tensors: Mapping[str, np.ndarray], depth: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The expert's HF Gemma tensors -> ``head.expert.*`` (norm scales ``1 + w``; π0.5's ``dense`` modulation)."""
    flat, names = {}, {}
    stacked = stack_numbered(dict(tensors), "layers.", "layers.", num_layers=depth)
    for key, value in stacked.items():
        module, _, leaf = key.replace("layers.*.", "layers.").rpartition(".")
        if module.endswith(".dense"):  # adaRMS: Linear(cond -> 3 width)
            target = module[: -len(".dense")] + ".modulation." + ("kernel" if leaf == "weight" else "bias")
            value = linear_kernel(value) if leaf == "weight" else value
        elif module.endswith("layernorm") or module == "norm":
            target, value = module + ".scale", (value.astype(np.float32) + 1.0).astype(value.dtype)
        elif leaf == "weight":
            target, value = module + ".kernel", linear_kernel(value)
        else:
            raise CheckpointError(f"unexpected expert tensor {EXPERT}{key}")
        flat[f"head.expert.{target}"], names[f"head.expert.{target}"] = value, EXPERT + key
    return flat, names


def convert_state_dict(tensors: Mapping[str, np.ndarray], policy: Pi0Policy
                       ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """LeRobot PI0 / PI05 tensors -> ``(flat vlax params, sources, unexpected LeRobot names)``."""
    rest = {k: v for k, v in tensors.items() if k not in UNUSED}
    flat: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}

    def take(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: rest.pop(k) for k in sorted(rest) if k.startswith(prefix)}

    def put(target: str, converted: tuple[dict, dict], source_prefix: str) -> None:
        for k, value in converted[0].items():
            flat[f"{target}.{k}"] = value
            sources[f"{target}.{k}"] = source_prefix + converted[1].get(k, k)

    sizes = policy.sizes
    put("vision", convert_siglip_tensors(take(VISION), sizes.vision.depth), VISION)
    projector = take(PROJECTOR)
    for leaf, target, fn in (("weight", "kernel", linear_kernel), ("bias", "bias", None)):
        if leaf in projector:
            value = projector.pop(leaf)
            flat[f"img_proj.{target}"] = fn(value) if fn else value
            sources[f"img_proj.{target}"] = PROJECTOR + leaf
    put("backbone", convert_decoder_tensors(take(LANGUAGE), sizes.llm), LANGUAGE)
    expert, names = _expert(take(EXPERT), sizes.llm.depth)
    flat.update(expert)
    sources.update(names)
    for name in PROJECTIONS:
        for leaf, target, fn in (("weight", "kernel", linear_kernel), ("bias", "bias", None)):
            key = f"model.{name}.{leaf}"
            if key in rest:
                value = rest.pop(key)
                flat[f"head.{name}.{target}"] = fn(value) if fn else value
                sources[f"head.{name}.{target}"] = key
    return flat, sources, sorted(rest) + [PROJECTOR + k for k in projector]


def load_lerobot_pi0(path: str | Path, *, sizes: Mapping[str, Any] | None = None, tokenizer: Any = None
                     ) -> tuple[Pi0Policy, ObservationPipeline]:
    """``(policy, pipeline)`` of the LeRobot PI0 / PI05 policy directory ``path`` (see the module docstring).

    Every LeRobot tensor except the two unused LM heads must land on a parameter and every parameter must get one
    (both are named otherwise). The pipeline normalizes the state with the checkpoint's statistics, pads it and
    the actions to ``max_state_dim`` / ``max_action_dim`` and unnormalizes actions. ``tokenizer``: a
    :mod:`vlax.tokenizers` tokenizer or a directory with ``tokenizer.json`` (default: ``<path>/tokenizer``).
    """
    from vlax.tokenizers import load_tokenizer

    path = Path(path)
    config = read_config(path)
    if config.get("type") not in TYPES:
        raise CheckpointError(f"{path / 'config.json'} has policy type {config.get('type')!r}; load_lerobot_pi0 "
                              f"reads {list(TYPES)} (vlax.weights.lerobot_policy lists the others)")
    model = model_config(config, sizes)
    padded = {"state": model["state_dim"], "action": model["action_dim"]}
    lerobot = read_policy_dir(path, supported=TYPES, padded_dims=padded)
    cameras = tuple(camera_name(f) for f in lerobot.image_features)
    if not cameras:
        raise CheckpointError(f"{path / 'config.json'} lists no VISUAL input feature; π0 needs a camera")
    preset_sizes = sizes_from_model(model)
    spec = PolicySpec(cameras=cameras, image_size=preset_sizes.vision.image_size, state_dim=model["state_dim"],
                      action_dim=model["action_dim"], horizon=int(config["chunk_size"]),
                      max_text_len=model["max_text_len"], state_input=model["state_input"])
    policy = nnx.eval_shape(lambda: Pi0Policy(spec, preset_sizes, head_kwargs=dict(float64_time_features=True),
                                              rngs=nnx.Rngs(0)))
    flat, sources, unexpected = convert_state_dict(lerobot.tensors, policy)
    if unexpected:
        raise CheckpointError(f"{path / 'model.safetensors'}: tensors the pi0 preset has no place for: {unexpected}")
    assign_params(policy, flat, sources=sources)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(Path(tokenizer or path / "tokenizer"))
    pipeline = ObservationPipeline(spec, tokenizer, {path.name: lerobot.normalization},
                                   prompt="pi05" if config["type"] == "pi05" else "pi0", resize_backend="jax")
    return policy, pipeline


__all__ = ["load_lerobot_pi0", "model_config", "convert_state_dict"]
