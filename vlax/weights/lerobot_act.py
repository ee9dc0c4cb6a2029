"""Import a LeRobot ACT policy directory into the ACT preset (:mod:`vlax.presets.act`).

``config.json`` gives the sizes, ``model.safetensors`` the state dict (mapped key by key below; every missing or
unexpected key is named), and the processor files the normalization: state and action statistics become a
:class:`vlax.data.normalization.NormalizationArtifact`, the per-camera VISUAL MEAN_STD statistics are applied
inside the preset's image path. Example::

    policy, artifact = load_lerobot_act("/ckpt/act_aloha")       # policy.sample(obs, rngs=key) -> [B, H, A]
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from flax import nnx

from vlax.data.normalization import NormalizationArtifact
from vlax.encoders.resnet import assign_frozen_stats, conv_kernel, torchvision_rules
from vlax.policy import PolicySpec
from vlax.presets.act import ACTPolicy, sequence_position_table
from vlax.weights.common import CheckpointError, assign_params, linear_kernel, read_config, rename_tensors
from vlax.weights.lerobot_policy import (LeRobotPolicy, camera_name, check_policy_type, feature_dim,
                                         image_features, read_policy_dir)

SUPPORTED_TYPES = ("act",)
BACKBONES = {"resnet18": 18, "resnet34": 34}
SOURCE = r"model\."
# a fixed buffer the preset recomputes (checked, not loaded)
VAE_POSITION_TABLE = "model.vae_encoder_pos_enc"


def _linear(src: str, dst: str) -> list:
    return [(SOURCE + src + r"\.weight", dst + ".kernel", linear_kernel),
            (SOURCE + src + r"\.bias", dst + ".bias", None)]


def _norm(src: str, dst: str) -> list:
    return [(SOURCE + src + r"\.weight", dst + ".scale", None), (SOURCE + src + r"\.bias", dst + ".bias", None)]


def _layer_rules(src: str, dst: str, attention: Sequence[str], norms: Sequence[str]) -> list:
    rules = []
    for name in attention:
        rules += _linear(rf"{src}\.(\d+)\.{name}\.out_proj", rf"{dst}.\1.{name}.out_proj")
    rules += _linear(rf"{src}\.(\d+)\.linear1", rf"{dst}.\1.linear1")
    rules += _linear(rf"{src}\.(\d+)\.linear2", rf"{dst}.\1.linear2")
    for name in norms:
        rules += _norm(rf"{src}\.(\d+)\.{name}", rf"{dst}.\1.{name}")
    return rules


def act_rules() -> list:
    """``(checkpoint regex, vlax path, transform)`` for every ACT state-dict entry (``in_proj`` split first)."""
    rules = torchvision_rules(SOURCE + r"backbone\.", "resnet.")
    rules += [(SOURCE + r"encoder_img_feat_input_proj\.weight", "image_proj.kernel", conv_kernel),
              (SOURCE + r"encoder_img_feat_input_proj\.bias", "image_proj.bias", None),
              (SOURCE + r"encoder_1d_feature_pos_embed\.weight", "token_pos", None),
              (SOURCE + r"vae_encoder_cls_embed\.weight", "vae_cls", None),
              (SOURCE + r"decoder_pos_embed\.weight", "head.query_pos", None)]
    rules += _linear("encoder_latent_input_proj", "latent_proj")
    rules += _linear("encoder_robot_state_input_proj", "state_proj")
    rules += _linear("vae_encoder_robot_state_input_proj", "vae_state_proj")
    rules += _linear("vae_encoder_action_input_proj", "vae_action_proj")
    rules += _linear("vae_encoder_latent_output_proj", "vae_out")
    rules += _linear("action_head", "head.action_out")
    rules += _norm(r"encoder\.norm", "encoder.norm") + _norm(r"vae_encoder\.norm", "vae_encoder.norm")
    rules += _norm(r"decoder\.norm", "head.norm")
    rules += _layer_rules(r"encoder\.layers", "encoder.layers", ["self_attn"], ["norm1", "norm2"])
    rules += _layer_rules(r"vae_encoder\.layers", "vae_encoder.layers", ["self_attn"], ["norm1", "norm2"])
    rules += _layer_rules(r"decoder\.layers", "head.layers", ["self_attn", "multihead_attn"],
                          ["norm1", "norm2", "norm3"])
    # the split in_proj pieces (see split_in_proj)
    for src, dst in ((r"encoder\.layers", "encoder.layers"), (r"vae_encoder\.layers", "vae_encoder.layers"),
                     (r"decoder\.layers", "head.layers")):
        for part in "qkv":
            rules += [(SOURCE + rf"{src}\.(\d+)\.(self_attn|multihead_attn)\.{part}_proj\.weight",
                       rf"{dst}.\1.\2.{part}_proj.kernel", linear_kernel),
                      (SOURCE + rf"{src}\.(\d+)\.(self_attn|multihead_attn)\.{part}_proj\.bias",
                       rf"{dst}.\1.\2.{part}_proj.bias", None)]
    return rules


def split_in_proj(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch ``nn.MultiheadAttention.in_proj_weight [3D, D]`` / ``in_proj_bias [3D]`` -> ``{q,k,v}_proj`` pieces."""
    out = {}
    for key, value in tensors.items():
        for kind in ("weight", "bias"):
            suffix = f".in_proj_{kind}"
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                for part, piece in zip("qkv", np.split(np.asarray(value), 3, axis=0)):
                    out[f"{base}.{part}_proj.{kind}"] = piece
                break
        else:
            out[key] = value
    return out


def act_settings_from_config(config: Mapping) -> dict:
    """The preset's ``model.act`` settings a LeRobot ``ACTConfig`` describes (unsupported options are errors)."""
    backbone = config.get("vision_backbone", "resnet18")
    if backbone not in BACKBONES:
        raise CheckpointError(f"ACT vision_backbone={backbone!r} is not supported; supported: {sorted(BACKBONES)}")
    if config.get("replace_final_stride_with_dilation"):
        raise CheckpointError("ACT replace_final_stride_with_dilation=true (a dilated layer 4) is not supported; "
                              "only the stock strided ResNet is")
    if config.get("feedforward_activation", "relu") != "relu":
        raise CheckpointError(f"ACT feedforward_activation={config['feedforward_activation']!r} is not supported; "
                              "only 'relu' is")
    features = config.get("input_features", {}).values()
    if config.get("env_state_feature") or any(v.get("type") == "ENV" for v in features):
        raise CheckpointError("ACT with an environment-state feature is not supported; only images + robot state")
    return dict(dim_model=int(config["dim_model"]), n_heads=int(config["n_heads"]),
                dim_feedforward=int(config["dim_feedforward"]), n_encoder_layers=int(config["n_encoder_layers"]),
                n_decoder_layers=int(config["n_decoder_layers"]),
                n_vae_encoder_layers=int(config["n_vae_encoder_layers"]), latent_dim=int(config["latent_dim"]),
                use_vae=bool(config["use_vae"]), kl_weight=float(config["kl_weight"]),
                pre_norm=bool(config["pre_norm"]), dropout=float(config["dropout"]),
                backbone_depth=BACKBONES[backbone], backbone_widths=(64, 128, 256, 512))


def spec_from_config(config: Mapping, cameras: Sequence[str]) -> PolicySpec:
    """The vlax spec of a LeRobot ACT config (one observation step, the state as the encoder's own token)."""
    images = [f for f, v in config["input_features"].items() if v.get("type") == "VISUAL"]
    sizes = {tuple(config["input_features"][f]["shape"][1:]) for f in images}
    if len(sizes) != 1 or len(next(iter(sizes))) != 2 or len(set(next(iter(sizes)))) != 1:
        raise CheckpointError(f"ACT cameras of shapes {sorted(sizes)}: the preset needs square images of one size")
    return PolicySpec(cameras=tuple(cameras), image_size=int(next(iter(sizes))[0]),
                      state_dim=feature_dim(config, "observation.state"), action_dim=feature_dim(config, "action"),
                      horizon=int(config["chunk_size"]),
                      # ACT reads no text; one slot keeps the shared observation path's tokenizer happy
                      max_text_len=1, state_input="head")


def policy_cameras(config: Mapping, camera_map: Mapping[str, str] | None = None,
                   data_cameras: Sequence[str] | None = None) -> list[str]:
    """vlax camera names of a LeRobot config's image features (``camera_map`` renames; the default drops the
    ``observation.images.`` prefix); a name ``camera_map`` or ``data_cameras`` cannot satisfy is an error."""
    features = image_features(config)
    camera_map = dict(camera_map or {})
    unknown = sorted(set(camera_map) - set(features))
    if unknown:
        raise CheckpointError(f"camera_map names image feature(s) {unknown} the policy does not have; it has "
                              f"{features}")
    cameras = [camera_map.get(f, camera_name(f)) for f in features]
    if data_cameras is not None:
        lacking = [c for c in cameras if c not in data_cameras]
        if lacking:
            raise CheckpointError(f"the policy reads camera(s) {lacking} the data does not have (data cameras: "
                                  f"{sorted(data_cameras)}); map them with camera_map={{feature: data camera}}")
    return cameras


def load_lerobot_act(path: str | Path, *, camera_map: Mapping[str, str] | None = None,
                     data_cameras: Sequence[str] | None = None) -> tuple[ACTPolicy, NormalizationArtifact]:
    """``(policy, normalization)`` from a LeRobot ACT directory.

    ``camera_map`` renames LeRobot image features (``observation.images.top``) to vlax camera names (default:
    the feature without its prefix). ``data_cameras``, if given, are the cameras the data provides: a policy
    camera they lack is an error before any weight is read.
    """
    config = read_config(path)
    check_policy_type(config, SUPPORTED_TYPES, path)
    policy_cameras(config, camera_map, data_cameras)  # the cheap checks first
    act_settings_from_config(config)
    policy_dir = read_policy_dir(path, supported=SUPPORTED_TYPES)
    return import_act(policy_dir, camera_map=camera_map, data_cameras=data_cameras)


def import_act(lerobot: LeRobotPolicy, *, camera_map: Mapping[str, str] | None = None,
               data_cameras: Sequence[str] | None = None) -> tuple[ACTPolicy, NormalizationArtifact]:
    """:func:`load_lerobot_act` from an already read directory."""
    config = lerobot.config
    features = lerobot.image_features
    cameras = policy_cameras(config, camera_map, data_cameras)
    spec = spec_from_config(config, cameras)
    settings = act_settings_from_config(config)
    pixel_stats = {camera: lerobot.pixel_stats.get(feature) for feature, camera in zip(features, cameras)}
    pixel_stats = {c: (np.ravel(s[0]), np.ravel(s[1])) for c, s in pixel_stats.items() if s is not None}
    policy = nnx.eval_shape(lambda: ACTPolicy(spec, pixel_stats=pixel_stats, rngs=nnx.Rngs(0), **settings))
    tensors = dict(lerobot.tensors)
    table = tensors.pop(VAE_POSITION_TABLE, None)
    if table is not None:
        want = sequence_position_table(np.shape(table)[1], settings["dim_model"])[None]
        if np.shape(table) != want.shape or not np.allclose(table, want, atol=1e-6):
            raise CheckpointError(f"{VAE_POSITION_TABLE} is not the sinusoidal table ACT computes (shape "
                                  f"{np.shape(table)}, expected {want.shape}); the checkpoint is not a stock ACT")
    flat, sources = rename_tensors(split_in_proj(tensors), act_rules())
    missing_stats = assign_frozen_stats(policy, flat)
    if missing_stats:
        raise CheckpointError(f"{lerobot.path}: missing frozen batch-norm entries: {missing_stats}")
    assign_params(policy, flat, sources=sources)
    return policy, lerobot.normalization
