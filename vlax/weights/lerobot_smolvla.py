"""Import a LeRobot SmolVLA policy directory into :class:`vlax.presets.smolvla.SmolVLAPolicy`.

The directory is what ``SmolVLAPolicy.save_pretrained`` plus the processors write: ``config.json`` (type
``smolvla``), ``model.safetensors``, ``policy_preprocessor.json`` / ``policy_postprocessor.json`` with their
normalizer files, and the VLM repository named by ``vlm_model_name`` (its ``config.json`` gives the SmolVLM sizes,
its ``tokenizer.json`` the tokenizer). A relative ``vlm_model_name`` is resolved against the policy directory.

Example::

    policy, pipeline = load_smolvla("/ckpt/smolvla_so100")
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
from vlax.presets.smolvla import SmolVLAPolicy, sizes_from_model
from vlax.tokenizers import load_tokenizer
from vlax.weights.common import CheckpointError, assign_params, linear_kernel, read_config
from vlax.weights.lerobot_policy import camera_name, feature_dim, read_policy_dir
from vlax.weights.llama import convert_decoder_tensors
from vlax.weights.siglip import convert_siglip_tensors

VLM = "model.vlm_with_expert.vlm."
VISION = VLM + "model.vision_model."
TEXT = VLM + "model.text_model."
EXPERT = "model.vlm_with_expert.lm_expert."
# flow-head projections: LeRobot name -> vlax path under the policy
PROJECTIONS = {"model.state_proj": "state_proj", "model.action_in_proj": "head.action_in_proj",
               "model.action_out_proj": "head.action_out_proj", "model.action_time_mlp_in": "head.action_time_mlp_in",
               "model.action_time_mlp_out": "head.action_time_mlp_out"}


def vlm_dir(policy_dir: Path, config: Mapping[str, Any]) -> Path:
    """The VLM repository directory ``vlm_model_name`` names (relative names are inside the policy directory)."""
    name = config.get("vlm_model_name")
    path = Path(name) if name and Path(name).is_absolute() else Path(policy_dir) / str(name)
    if not name or not (path / "config.json").is_file():
        raise CheckpointError(f"the SmolVLA config names vlm_model_name={name!r}, but {path / 'config.json'} does not "
                              "exist; download that VLM repository (config.json and tokenizer files suffice) into "
                              f"{path}")
    return path


def model_config(policy_config: Mapping[str, Any], vlm_config: Mapping[str, Any]) -> dict:
    """The ``model`` section of a vlax config (``preset='smolvla'``) describing this checkpoint."""
    v, t = dict(vlm_config.get("vision_config", {})), dict(vlm_config.get("text_config", {}))
    try:
        vision = dict(width=v["hidden_size"], depth=v["num_hidden_layers"], mlp_dim=v["intermediate_size"],
                      num_heads=v["num_attention_heads"], patch_size=v["patch_size"], image_size=v["image_size"],
                      norm_eps=v.get("layer_norm_eps", 1e-6))
        text = dict(vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
                    mlp_dim=t["intermediate_size"], num_heads=t["num_attention_heads"],
                    num_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
                    head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
                    norm_eps=t.get("rms_norm_eps", 1e-5),
                    tie_embeddings=vlm_config.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise CheckpointError(f"the VLM config.json lacks {e.args[0]!r} (vision_config / text_config); it must be "
                              "a SmolVLM config") from None
    keys = ("resize_imgs_with_padding", "max_state_dim", "max_action_dim", "num_steps", "num_vlm_layers",
            "num_expert_layers", "self_attn_every_n_layers", "expert_width_multiplier", "min_period", "max_period",
            "add_image_special_tokens")
    smolvla = {k: policy_config[k] for k in keys if k in policy_config}
    if policy_config.get("attention_mode", "cross_attn") != "cross_attn":
        raise CheckpointError(f"attention_mode={policy_config.get('attention_mode')!r}: the smolvla preset implements "
                              "'cross_attn' (interleaved self/cross attention), the published setting")
    return dict(preset="smolvla", head="flow_smolvla", head_kwargs={}, state_dim=smolvla["max_state_dim"],
                action_dim=smolvla["max_action_dim"], max_text_len=int(policy_config.get("tokenizer_max_length", 48)),
                smolvla=dict(smolvla, vision=vision, text=text, scale_factor=int(vlm_config.get("scale_factor", 1))))


def convert_state_dict(tensors: Mapping[str, np.ndarray], policy: SmolVLAPolicy
                       ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """LeRobot SmolVLA tensors -> ``(flat vlax params, sources, unexpected LeRobot names)``."""
    flat: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    rest = dict(tensors)

    def take(prefix: str) -> dict[str, np.ndarray]:
        out = {k[len(prefix):]: rest.pop(k) for k in sorted(rest) if k.startswith(prefix)}
        return out

    def put(target: str, converted: tuple[dict, dict], source_prefix: str) -> None:
        values, names = converted
        for k, val in values.items():
            flat[f"{target}.{k}"] = val
            sources[f"{target}.{k}"] = source_prefix + names.get(k, k)

    sizes = policy.sizes
    put("vision", convert_siglip_tensors(take(VISION), sizes.vision.depth), VISION)
    connector = take(VLM + "model.connector.")
    if "modality_projection.proj.weight" in connector:
        flat["connector.proj.kernel"] = linear_kernel(connector.pop("modality_projection.proj.weight"))
        sources["connector.proj.kernel"] = VLM + "model.connector.modality_projection.proj.weight"
    text = take(TEXT)
    if VLM + "lm_head.weight" in rest:
        text["lm_head.weight"] = rest.pop(VLM + "lm_head.weight")
    put("backbone", convert_decoder_tensors(text, sizes.text), TEXT)
    for source, target in PROJECTIONS.items():
        for kind, fn in (("weight", linear_kernel), ("bias", None)):
            name = f"{source}.{kind}"
            if name in rest and (target.startswith("state") or policy_head_is_flow(policy)):
                value = rest.pop(name)
                flat[f"{target}.{'kernel' if kind == 'weight' else 'bias'}"] = fn(value) if fn else value
                sources[f"{target}.{'kernel' if kind == 'weight' else 'bias'}"] = name
    if policy_head_is_flow(policy):
        put("head.expert", _expert(take(EXPERT), sizes.text.depth, sizes.self_attn_every), EXPERT)
    else:  # another head is trained from scratch: LeRobot's expert and action projections are dropped on purpose
        take(EXPERT)
        for source in PROJECTIONS:
            if not source.endswith("state_proj"):
                rest.pop(f"{source}.weight", None), rest.pop(f"{source}.bias", None)
    for k in list(connector):
        rest[VLM + "model.connector." + k] = connector[k]
    return flat, sources, sorted(rest)


def policy_head_is_flow(policy: SmolVLAPolicy) -> bool:
    return hasattr(policy.head, "expert")


def _expert(tensors: dict[str, np.ndarray], depth: int, every: int) -> tuple[dict, dict]:
    """The expert's per-layer tensors, split into self-attention layers (``l % every == 0``) and cross layers,
    each stacked in layer order, as :class:`vlax.heads.flow.SmolVLAExpert` holds them."""
    flat, names = {}, {}
    groups: dict[str, dict[str, list[tuple[int, np.ndarray]]]] = {"self_layers": {}, "cross_layers": {}}
    for i in range(depth):
        kind = "self_layers" if i % every == 0 else "cross_layers"
        prefix = f"layers.{i}."
        for k in sorted(k for k in tensors if k.startswith(prefix)):
            groups[kind].setdefault(k[len(prefix):], []).append((i, tensors.pop(k)))
    missing = []
    for kind, per_name in groups.items():
        layers = [i for i in range(depth) if (i % every == 0) == (kind == "self_layers")]
        for rest, found in per_name.items():
            have = {i for i, _ in found}
            missing += [f"{EXPERT}layers.{i}.{rest}" for i in layers if i not in have]
    if missing:
        raise CheckpointError(f"the SmolVLA checkpoint lacks expert tensors: {missing}")
    for kind, per_name in groups.items():
        for rest, found in per_name.items():
            values = [v for _, v in found]
            module, _, leaf = rest.rpartition(".")
            if leaf != "weight":
                raise CheckpointError(f"unexpected expert tensor {EXPERT}layers.<i>.{rest}")
            stacked = np.stack(values)
            is_norm = module.endswith("layernorm")
            key = f"{kind}.{module}.{'scale' if is_norm else 'kernel'}"
            flat[key] = stacked if is_norm else linear_kernel(stacked)
            names[key] = f"layers.<i>.{rest}"
    if "norm.weight" in tensors:
        flat["norm.scale"], names["norm.scale"] = tensors.pop("norm.weight"), "norm.weight"
    for k in tensors:  # left over: reported as unexpected under their own names
        flat[f"unexpected.{k}"], names[f"unexpected.{k}"] = tensors[k], k
    return flat, names


def load_smolvla(path: str | Path, *, head: str = "flow_smolvla", rngs: nnx.Rngs | None = None,
                 vision_position_ids: str = "sequential") -> tuple[SmolVLAPolicy, ObservationPipeline]:
    """``(policy, pipeline)`` of the LeRobot SmolVLA policy directory ``path`` (see the module docstring).

    Every LeRobot tensor must land on a parameter and every parameter must get one (both are named otherwise).
    The pipeline normalizes the state with the checkpoint's statistics, pads it to ``max_state_dim``, tokenizes
    ``task + "\\n"`` with the VLM's tokenizer and unnormalizes actions. ``head`` other than ``flow_smolvla`` keeps
    the VLM weights and builds a fresh head (``rngs``) for fine-tuning. ``vision_position_ids="bucketized"`` runs
    the vision tower as transformers 4.57 did (LeRobot 0.4.x outputs); the default is transformers 5.x's.
    """
    path = Path(path)
    config = read_config(path)
    if config.get("type") != "smolvla":
        raise CheckpointError(f"{path / 'config.json'} has policy type {config.get('type')!r}; load_smolvla reads "
                              "type 'smolvla' (vlax.weights.lerobot_policy lists the others)")
    vlm = vlm_dir(path, config)
    model = model_config(config, read_config(vlm))
    model["head"] = head
    model["smolvla"]["vision_position_ids"] = vision_position_ids
    padded = {"state": model["state_dim"], "action": model["action_dim"]}
    lerobot = read_policy_dir(path, supported=("smolvla",), padded_dims=padded)
    cameras = tuple(camera_name(f) for f in lerobot.image_features)
    if not cameras:
        raise CheckpointError(f"{path / 'config.json'} lists no VISUAL input feature; SmolVLA needs a camera")
    sizes = sizes_from_model(model)
    spec = PolicySpec(cameras=cameras, image_size=sizes.resize[0], state_dim=model["state_dim"],
                      action_dim=model["action_dim"], horizon=int(config["chunk_size"]),
                      max_text_len=model["max_text_len"], state_input="prefix", image_resize="pad")
    feature_dim(config, "observation.state")  # a config without a state feature is named here
    if head == "flow_smolvla":
        policy = nnx.eval_shape(lambda: SmolVLAPolicy(spec, sizes, rngs=nnx.Rngs(0)))
    else:
        policy = SmolVLAPolicy(spec, sizes, head_name=head, rngs=rngs or nnx.Rngs(0))
    flat, sources, unexpected = convert_state_dict(lerobot.tensors, policy)
    unexpected += sorted(sources[k] for k in flat if ".unexpected." in k)
    flat = {k: v for k, v in flat.items() if ".unexpected." not in k}
    if unexpected:
        raise CheckpointError(f"{path / 'model.safetensors'}: tensors the smolvla preset has no place for: "
                              f"{unexpected}")
    assign_params(policy, flat, strict=head == "flow_smolvla", sources=sources)
    tokenizer = load_tokenizer(vlm)
    pipeline = ObservationPipeline(spec, tokenizer, {path.name: lerobot.normalization}, prompt="smolvla",
                                   resize_backend="jax")
    return policy, pipeline


__all__ = ["load_smolvla", "model_config", "convert_state_dict", "vlm_dir"]
