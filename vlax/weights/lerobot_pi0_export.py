"""Write a :class:`vlax.presets.pi0.Pi0Policy` as a LeRobot PI0 / PI05 policy directory.

The directory is what LeRobot's ``save_pretrained`` plus its processors write and what
:func:`vlax.weights.lerobot_pi0.load_lerobot_pi0` reads: ``config.json``, ``model.safetensors`` (HF PaliGemma and
Gemma-expert names, per-layer tensors, torch ``Linear`` layouts ``[out, in]``, the expert's RMSNorm weights as
Gemma's ``w`` of ``1 + w``), ``policy_preprocessor.json`` / ``policy_postprocessor.json`` with their normalizer
statistics files, and ``tokenizer/`` when a tokenizer directory is given.

LeRobot's state dict also holds two LM heads π0 never calls: PaliGemma's (tied to the token embeddings, written as
their copy) and the expert's (written as zeros), so LeRobot's strict loading finds every key.

Example::

    export_lerobot_pi0(policy, "out/pi0_lerobot", normalization=artifact, state_dim=7, action_dim=7,
                       tokenizer="paligemma_tokenizer/")
    policy2, pipeline = load_lerobot_pi0("out/pi0_lerobot")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vlax.data.normalization import STAT_NAMES, NormalizationArtifact
from vlax.presets.pi0 import GEMMA_VARIANTS, Pi0Policy
from vlax.weights.common import CheckpointError, param_shapes, to_numpy_flat
from vlax.weights.lerobot_pi0 import EXPERT, LANGUAGE, PALIGEMMA, PROJECTIONS, PROJECTOR, VISION

# vlax normalization type -> LeRobot's mode
MODES = {"normal": "MEAN_STD", "bounds": "QUANTILES", "min_max": "MIN_MAX", "none": "IDENTITY"}
LEROBOT_STATS = STAT_NAMES + ("q10", "q50", "q90")
VISION_NAMES = {"o_proj": "out_proj"}


def _linear(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(value, -1, -2))


def _torch_name(path: str) -> str:
    """The last two parts of a vlax path in torch terms: ``kernel`` / ``scale`` -> ``weight``."""
    module, _, leaf = path.rpartition(".")
    return f"{module}.{'weight' if leaf in ('kernel', 'scale') else leaf}"


def lerobot_tensors(policy: Pi0Policy) -> dict[str, np.ndarray]:
    """``{LeRobot state-dict name: array}`` of the policy (per-layer tensors unstacked)."""
    adapters = [k for k in param_shapes(policy) if ".lora_" in k]
    if adapters:
        raise CheckpointError(f"the policy carries LoRA adapters ({adapters[0]}, ...); LeRobot's layout has none: "
                              "fold them into the base weights first with vlax.nn.merge_lora(policy)")
    flat = to_numpy_flat(policy)
    out: dict[str, np.ndarray] = {}

    def per_layer(name: str, value: np.ndarray) -> None:  # "...layers.*.x" -> one tensor per layer
        for i, layer in enumerate(value):
            out[name.replace("*", str(i))] = np.ascontiguousarray(layer)

    for path, value in flat.items():
        if path.startswith("vision."):
            rest = path[len("vision."):]
            if rest == "embeddings.patch_embedding.kernel":  # [p, p, C, D] -> Conv2d [D, C, p, p]
                out[VISION + "embeddings.patch_embedding.weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
            elif rest == "embeddings.position_embedding":
                out[VISION + "embeddings.position_embedding.weight"] = value
            elif rest.startswith("encoder.layers."):
                module = rest[len("encoder.layers."):]
                for ours, theirs in VISION_NAMES.items():
                    module = module.replace(f".{ours}.", f".{theirs}.")
                per_layer(VISION + "encoder.layers.*." + _torch_name(module),
                          _linear(value) if path.endswith(".kernel") else value)
            else:
                out[VISION + _torch_name(rest)] = value
        elif path.startswith("img_proj."):
            out[PROJECTOR + _torch_name(path)[len("img_proj."):]] = _linear(value) if path.endswith("kernel") else value
        elif path == "backbone.embed_tokens.embedding":
            out[LANGUAGE + "embed_tokens.weight"] = value
            out[PALIGEMMA + "lm_head.weight"] = value  # tied
        elif path.startswith("backbone.layers."):
            per_layer(LANGUAGE + "layers.*." + _torch_name(path[len("backbone.layers."):]),
                      _linear(value) if path.endswith(".kernel") else value)
        elif path.startswith("backbone."):
            out[LANGUAGE + _torch_name(path[len("backbone."):])] = value
        elif path.startswith("head.expert."):
            rest = path[len("head.expert."):]
            if ".modulation." in rest:  # adaRMS: LeRobot's `dense` Linear
                rest = rest.replace(".modulation.", ".dense.")
                value = _linear(value) if rest.endswith(".kernel") else value
                rest = rest.replace(".kernel", ".weight")
            elif rest.endswith(".scale"):  # Gemma's RMSNorm multiplies by 1 + w
                rest, value = rest[: -len(".scale")] + ".weight", (value.astype(np.float32) - 1.0).astype(value.dtype)
            elif rest.endswith(".kernel"):
                rest, value = rest[: -len(".kernel")] + ".weight", _linear(value)
            if rest.startswith("layers."):
                per_layer(EXPERT + "layers.*." + rest[len("layers."):], value)
            else:
                out[EXPERT + rest] = value
        elif path.startswith("head.") and path.split(".")[1] in PROJECTIONS:
            name = _torch_name(path[len("head."):])
            out["model." + name] = _linear(value) if path.endswith(".kernel") else value
        else:
            raise CheckpointError(f"{path}: no place in LeRobot's PI0 layout (a head other than flow / flow_pi05, "
                                  "or LoRA adapters: merge them first with vlax.nn.merge_lora)")
    vocab, expert_width = flat["backbone.embed_tokens.embedding"].shape[0], policy.sizes.expert_width
    out["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = np.zeros((vocab, expert_width), np.float32)
    return out


def _variant(sizes: tuple[int, ...], default: str) -> str:
    return next((name for name, known in GEMMA_VARIANTS.items() if known == sizes and name.startswith("gemma")),
                default)


def _llm_sizes(policy: Pi0Policy) -> tuple[tuple[int, ...], tuple[int, ...]]:
    llm, s = policy.sizes.llm, policy.sizes
    lm = (llm.width, llm.depth, llm.mlp_dim, llm.num_heads, llm.num_kv_heads, llm.head_dim)
    expert = (s.expert_width, llm.depth, s.expert_mlp_dim, s.expert_heads, llm.num_kv_heads, llm.head_dim)
    return lm, expert


def lerobot_sizes(policy: Pi0Policy) -> dict[str, Any] | None:
    """The ``sizes=`` :func:`~vlax.weights.lerobot_pi0.load_lerobot_pi0` needs to read the export back, or None
    when LeRobot's variant names describe the model (Gemma-2B + Gemma-300M, SigLIP So400m/14)."""
    lm, expert = _llm_sizes(policy)
    v = policy.sizes.vision
    published = (v.width, v.depth, v.mlp_dim, v.num_heads, v.patch_size) == (1152, 27, 4304, 16, 14)
    if _variant(lm, "") == "gemma_2b" and _variant(expert, "") == "gemma_300m" and published \
            and policy.sizes.llm.vocab_size == 257_152:
        return None
    fields = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
    return dict(llm=dict(zip(fields, lm)), expert=dict(zip(fields, expert)), vocab_size=policy.sizes.llm.vocab_size,
                vision=dict(width=v.width, depth=v.depth, mlp_dim=v.mlp_dim, num_heads=v.num_heads,
                            patch_size=v.patch_size))


def _stats_file(normalization: NormalizationArtifact, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    out = {}
    for key, feature in (("state", "observation.state"), ("action", "action")):
        stats = normalization.stats[key]
        for name in LEROBOT_STATS:
            if name in stats:
                out[f"{feature}.{name}"] = np.asarray(stats[name], np.float32)[: dims[key]]
        out[f"{feature}.count"] = np.asarray([stats.get("count", 0)], np.float32)
    return out


def _features(cameras: tuple[str, ...], size: int, state_dim: int, action_dim: int) -> tuple[dict, dict]:
    inputs = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, size, size]} for c in cameras}
    inputs["observation.state"] = {"type": "STATE", "shape": [state_dim]}
    return inputs, {"action": {"type": "ACTION", "shape": [action_dim]}}


def _processors(kind: str, features: dict, norm_map: dict, max_length: int) -> tuple[dict, dict]:
    normalizer = {"registry_name": "normalizer_processor",
                  "config": {"eps": 1e-08, "features": features, "norm_map": norm_map}}
    tokenizer = {"registry_name": "tokenizer_processor",
                 "config": {"max_length": max_length, "task_key": "task", "padding_side": "right",
                            "padding": "max_length", "truncation": True,
                            "tokenizer_name": "google/paligemma-3b-pt-224"}}
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    head = [{"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
            {"registry_name": "to_batch_processor", "config": {}}]
    relative = {"registry_name": "relative_actions_processor",
                "config": {"enabled": False, "exclude_joints": ["gripper"], "action_names": None}}
    # LeRobot 0.6.1's step order (the statistics file is named by the normalizer's index)
    if kind == "pi05":  # the state is normalized first, then discretized into the prompt
        steps = head + [relative, normalizer,
                        {"registry_name": "pi05_prepare_state_tokenizer_processor_step", "config": {}}, tokenizer,
                        device]
    else:
        steps = head + [{"registry_name": "pi0_new_line_processor", "config": {}}, tokenizer, device, relative,
                        normalizer]
    index = steps.index(normalizer)
    normalizer["state_file"] = f"policy_preprocessor_step_{index}_normalizer_processor.safetensors"
    unnormalizer = {"registry_name": "unnormalizer_processor",
                    "config": {"eps": 1e-08, "features": {"action": features["action"]}, "norm_map": norm_map},
                    "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors"}
    absolute = {"registry_name": "absolute_actions_processor", "config": {"enabled": False}}
    return ({"name": "policy_preprocessor", "steps": steps},
            {"name": "policy_postprocessor", "steps": [unnormalizer, absolute, device]})


def export_lerobot_pi0(policy: Pi0Policy, path: str | Path, *, normalization: NormalizationArtifact,
                       state_dim: int | None = None, action_dim: int | None = None,
                       tokenizer: str | Path | None = None) -> Path:
    """Write ``policy`` (flow / flow_pi05 head, LoRA merged) as a LeRobot PI0 / PI05 directory at ``path``.

    ``normalization``: the artifact of the policy's dataset (``normal`` -> MEAN_STD, ``bounds`` -> QUANTILES);
    ``state_dim`` / ``action_dim``: the robot's real dims (default: the artifact's), zero-padded by LeRobot to the
    policy's ``max_state_dim`` / ``max_action_dim``; ``tokenizer``: a directory holding ``tokenizer.json``,
    copied to ``tokenizer/``. Models of other sizes than LeRobot's variants are read back with
    ``sizes=lerobot_sizes(policy)``. Returns ``path``.
    """
    from safetensors.numpy import save_file

    spec, kind = policy.spec, "pi05" if policy.sizes.pi05 else "pi0"
    if any(".lora_" in k for k in param_shapes(policy)):
        lerobot_tensors(policy)  # names the adapters and the fix
    if type(policy.head).__name__ != "FlowHead":
        raise CheckpointError(f"LeRobot's {kind.upper()} layout holds the flow head; this policy's head is "
                              f"{type(policy.head).__name__}")
    if spec.state_dim != spec.action_dim:
        raise CheckpointError(f"LeRobot pads state and actions to max_state_dim = max_action_dim; the policy has "
                              f"state_dim={spec.state_dim}, action_dim={spec.action_dim}")
    if normalization.type not in MODES or normalization.type == "none":
        raise CheckpointError(f"normalization type {normalization.type!r} has no LeRobot mode; known: "
                              f"{sorted(k for k in MODES if k != 'none')}")
    dims = {"state": int(state_dim or normalization.dim("state")), "action": int(action_dim or
                                                                                 normalization.dim("action"))}
    tensors = lerobot_tensors(policy)  # every check before anything is written
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm, expert = _llm_sizes(policy)
    inputs, outputs = _features(spec.cameras, spec.image_size, dims["state"], dims["action"])
    mode = MODES[normalization.type]
    norm_map = {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
    config = {
        "type": kind, "n_obs_steps": 1, "input_features": inputs, "output_features": outputs, "device": "cpu",
        "use_amp": False, "paligemma_variant": _variant(lm, "gemma_2b"),
        "action_expert_variant": _variant(expert, "gemma_300m"), "dtype": "float32", "chunk_size": spec.horizon,
        "n_action_steps": spec.horizon, "max_state_dim": spec.state_dim, "max_action_dim": spec.action_dim,
        "num_inference_steps": policy.sizes.num_steps, "time_sampling_beta_alpha": 1.5,
        "time_sampling_beta_beta": 1.0, "time_sampling_scale": 0.999, "time_sampling_offset": 0.001,
        "min_period": 0.004, "max_period": 4.0, "image_resolution": [spec.image_size, spec.image_size],
        "empty_cameras": 0, "normalization_mapping": norm_map, "tokenizer_max_length": spec.max_text_len,
    }
    (path / "config.json").write_text(json.dumps(config, indent=4))
    save_file(tensors, str(path / "model.safetensors"))
    pre, post = _processors(kind, {**inputs, **outputs}, norm_map, spec.max_text_len)
    stats = _stats_file(normalization, dims)
    for name, pipeline in (("policy_preprocessor", pre), ("policy_postprocessor", post)):
        (path / f"{name}.json").write_text(json.dumps(pipeline, indent=2))
        for step in pipeline["steps"]:
            if "state_file" in step:
                save_file(stats, str(path / step["state_file"]))
    if tokenizer is not None:
        source = Path(tokenizer)
        if not (source / "tokenizer.json").is_file():
            raise CheckpointError(f"{source} holds no tokenizer.json; pass PaliGemma's tokenizer directory")
        shutil.copytree(source, path / "tokenizer", dirs_exist_ok=True)
    return path


__all__ = ["export_lerobot_pi0", "lerobot_sizes", "lerobot_tensors"]
