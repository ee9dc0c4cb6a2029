"""LeRobot ``DiffusionPolicy`` directories -> :mod:`vlax.presets.diffusion_policy`.

``load_lerobot_diffusion(path)`` reads the directory (:func:`vlax.weights.lerobot_policy.read_policy_dir`),
translates ``config.json`` into a vlax model config and :class:`vlax.policy.PolicySpec`, builds the preset
abstractly and assigns the state dict through one rename table; every missing or unexpected key is named.

torch layouts: ``Linear [out, in]`` -> ``Dense [in, out]``; ``Conv1d [out, in, k]`` -> ``[k, in, out]``;
``ConvTranspose1d [in, out, k]`` -> the flipped ``[k, in, out]`` the dilated convolution of
:class:`vlax.heads.diffusion.Conv1d` uses; ``Conv2d`` as in :func:`vlax.encoders.resnet.conv_kernel`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from vlax.data.normalization import NormalizationArtifact
from vlax.encoders.resnet import torchvision_rules
from vlax.nn.spatial_softmax import keypoint_grid
from vlax.policy import PolicySpec
from vlax.weights.common import CheckpointError, assign_params, linear_rules, rename_tensors
from vlax.weights.lerobot_policy import camera_name, feature_dim, image_features, read_policy_dir

RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34}
# LeRobot keeps torchvision's children by position: conv1, bn1, relu, maxpool, layer1..layer4
BACKBONE_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


@dataclasses.dataclass(frozen=True)
class ImportedDiffusionPolicy:
    policy: Any  # vlax.presets.diffusion_policy.DiffusionPolicy
    spec: PolicySpec
    model_config: dict
    normalization: NormalizationArtifact


def conv1d_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 1, 0))


def conv_transpose1d_kernel(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w[:, :, ::-1], (2, 0, 1)))


def pointwise_kernel(w: np.ndarray) -> np.ndarray:
    """A 1x1 ``Conv2d [out, in, 1, 1]`` as a ``Dense [in, out]``."""
    return np.ascontiguousarray(w[:, :, 0, 0].T)


def _conv1d_rules(src: str, dst: str, kernel=conv1d_kernel) -> list:
    return [(src + r"\.weight", dst + ".kernel", kernel), (src + r"\.bias", dst + ".bias", None)]


def _block_rules(src: str, dst: str) -> list:
    """A ``Conv1dBlock`` (conv, GroupNorm, Mish) -> :class:`vlax.heads.diffusion.ConvBlock`."""
    return (_conv1d_rules(src + r"\.block\.0", dst + ".conv")
            + [(src + r"\.block\.1\.weight", dst + ".norm.scale", None),
               (src + r"\.block\.1\.bias", dst + ".norm.bias", None)])


def _residual_rules(src: str, dst: str) -> list:
    return (_block_rules(src + r"\.conv1", dst + ".block1") + _block_rules(src + r"\.conv2", dst + ".block2")
            + linear_rules(src + r"\.cond_encoder\.1", dst + ".film")
            + _conv1d_rules(src + r"\.residual_conv", dst + ".residual"))


def unet_rules() -> list:
    u, d = r"diffusion\.unet\.", "head.denoiser."
    return (linear_rules(u + r"diffusion_step_encoder\.1", d + "step_mlp_in")
            + linear_rules(u + r"diffusion_step_encoder\.3", d + "step_mlp_out")
            + _residual_rules(u + r"down_modules\.(\d+)\.([01])", d + r"down.\1.\2")
            + _conv1d_rules(u + r"down_modules\.(\d+)\.2", d + r"downsample.\1")
            + _residual_rules(u + r"mid_modules\.(\d+)", d + r"mid.\1")
            + _residual_rules(u + r"up_modules\.(\d+)\.([01])", d + r"up.\1.\2")
            + _conv1d_rules(u + r"up_modules\.(\d+)\.2", d + r"upsample.\1", conv_transpose1d_kernel)
            + _block_rules(u + r"final_conv\.0", d + "final_block")
            + _conv1d_rules(u + r"final_conv\.1", d + "final_conv"))


def encoder_rules(prefix: str, target: str) -> list:
    """One ``DiffusionRgbEncoder`` at checkpoint regex ``prefix`` -> :class:`RgbEncoder` at ``target``."""
    return (torchvision_rules(prefix + r"backbone\.", target + "backbone.", norm="group")
            + [(prefix + r"pool\.nets\.weight", target + "pool.keypoints.kernel", pointwise_kernel),
               (prefix + r"pool\.nets\.bias", target + "pool.keypoints.bias", None)]
            + linear_rules(prefix + r"out", target + "out"))


def _torchvision_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``...backbone.<child index>.`` -> torchvision's ``...backbone.<child name>.``."""
    out = {}
    for key, value in tensors.items():
        m = re.match(r"(.*rgb_encoder\.(?:\d+\.)?backbone\.)(\d+)\.(.*)", key)
        if m and m.group(2) in BACKBONE_CHILDREN:
            key = f"{m.group(1)}{BACKBONE_CHILDREN[m.group(2)]}.{m.group(3)}"
        out[key] = value
    return out


def _square_size(config: dict, features: list[str]) -> int:
    sizes = {tuple(config["input_features"][f]["shape"][1:]) for f in features}
    if len(sizes) != 1 or len(next(iter(sizes))) != 2 or len(set(next(iter(sizes)))) != 1:
        raise CheckpointError(f"the policy's cameras have sizes {sorted(sizes)} (C, H, W without C); vlax's "
                              "Diffusion Policy takes one square size for every camera")
    return int(next(iter(sizes))[0])


def model_config(config: dict, pixel_stats: dict | None = None) -> tuple[dict, PolicySpec]:
    """``(vlax model config, PolicySpec)`` of a LeRobot ``DiffusionConfig`` (``config.json`` as a dict)."""
    backbone = config.get("vision_backbone", "resnet18")
    if backbone not in RESNET_DEPTHS:
        raise CheckpointError(f"vision_backbone={backbone!r}; vlax imports {sorted(RESNET_DEPTHS)}")
    if not config.get("use_group_norm", True):
        raise CheckpointError("use_group_norm=False (BatchNorm ResNet) is not supported; vlax's Diffusion Policy "
                              "uses the GroupNorm ResNet (use_group_norm=True)")
    if config.get("resize_shape") or float(config.get("crop_ratio", 1.0)) != 1.0:
        raise CheckpointError(f"resize_shape={config.get('resize_shape')} / crop_ratio={config.get('crop_ratio')} "
                              "are not supported; resize the images to the policy's size and use crop_shape")
    features = image_features(config)
    if not features:
        raise CheckpointError("the policy has no VISUAL input feature; vlax's Diffusion Policy needs a camera")
    if "observation.environment_state" in config.get("input_features", {}):
        raise CheckpointError("observation.environment_state inputs are not supported")
    cameras = tuple(camera_name(f) for f in features)
    spec = PolicySpec(cameras=cameras, image_size=_square_size(config, features),
                      state_dim=feature_dim(config, "observation.state"), action_dim=feature_dim(config, "action"),
                      horizon=int(config["horizon"]), max_text_len=1, state_input="head",
                      obs_history=int(config["n_obs_steps"]))
    steps = config.get("num_inference_steps") or config["num_train_timesteps"]
    head_kwargs = {
        "schedule": config["beta_schedule"], "num_train_timesteps": int(config["num_train_timesteps"]),
        "beta_start": float(config["beta_start"]), "beta_end": float(config["beta_end"]),
        "prediction_type": config["prediction_type"], "sampler": config["noise_scheduler_type"].lower(),
        "num_steps": int(steps), "clip_sample": bool(config["clip_sample"]),
        "clip_sample_range": float(config["clip_sample_range"]), "variance_type": "fixed_small",
        "denoiser_kwargs": {"down_dims": tuple(config["down_dims"]), "kernel_size": int(config["kernel_size"]),
                            "n_groups": int(config["n_groups"]),
                            "step_embed_dim": int(config["diffusion_step_embed_dim"]),
                            "film_scale": bool(config["use_film_scale_modulation"]),
                            "final_n_groups": 8}}  # LeRobot's final Conv1dBlock keeps its default 8 groups
    crop = config.get("crop_shape")
    model = {
        "preset": "diffusion_policy", "head": "diffusion_unet", "head_kwargs": head_kwargs,
        "diffusion_policy": {
            "encoder": {"crop_shape": tuple(crop) if crop else None,
                        "crop_is_random": bool(config.get("crop_is_random", True)),
                        "num_keypoints": int(config["spatial_softmax_num_keypoints"]),
                        "separate_per_camera": bool(config.get("use_separate_rgb_encoder_per_camera", False)),
                        "resnet": {"depth": RESNET_DEPTHS[backbone]}},
            "n_action_steps": int(config["n_action_steps"]),
            "pixel_stats": {camera_name(f): None if s is None else (np.asarray(s[0]).tolist(),
                                                                    np.asarray(s[1]).tolist())
                            for f, s in (pixel_stats or {}).items()} or None}}
    return model, spec


def _check_grids(tensors: dict[str, np.ndarray], policy: Any) -> dict[str, np.ndarray]:
    """Drop the spatial-softmax ``pos_grid`` buffers after checking them against the grid vlax computes."""
    out = {}
    for key, value in tensors.items():
        if key.endswith("pool.pos_grid"):
            encoder = policy.rgb_encoder[0] if policy.separate else policy.rgb_encoder
            want = keypoint_grid(encoder.pool.height, encoder.pool.width)
            if value.shape != want.shape or not np.allclose(value, want, atol=1e-6):
                raise CheckpointError(f"{key} {tuple(value.shape)} is not the keypoint grid of the "
                                      f"{encoder.pool.height}x{encoder.pool.width} feature map the config implies")
            continue
        out[key] = value
    return out


def assign_state_dict(policy: Any, tensors: dict[str, np.ndarray]) -> Any:
    """Write a LeRobot diffusion state dict into ``policy`` (abstract or concrete); one error names every
    missing, unexpected or misshapen key."""
    tensors = _check_grids(_torchvision_names(tensors), policy)
    rules = unet_rules()
    if policy.separate:
        rules += encoder_rules(r"diffusion\.rgb_encoder\.(\d+)\.", r"rgb_encoder.\1.")
    else:
        rules += encoder_rules(r"diffusion\.rgb_encoder\.", "rgb_encoder.")
    flat, sources = rename_tensors(tensors, rules)
    return assign_params(policy, flat, sources=sources)


def load_lerobot_diffusion(path: str | Path) -> ImportedDiffusionPolicy:
    """A LeRobot diffusion policy directory -> the vlax preset with its weights, spec, model config and the
    state/action :class:`NormalizationArtifact` (MIN_MAX -> ``min_max``); image statistics live in the preset."""
    from vlax.presets.diffusion_policy import build

    lerobot = read_policy_dir(path, supported=["diffusion"])
    model, spec = model_config(lerobot.config, lerobot.pixel_stats)
    policy = nnx.eval_shape(lambda: build(model, spec, 0, nnx.Rngs(0)))
    assign_state_dict(policy, lerobot.tensors)
    return ImportedDiffusionPolicy(policy=policy, spec=spec, model_config=model, normalization=lerobot.normalization)


__all__ = ["load_lerobot_diffusion", "model_config", "assign_state_dict", "ImportedDiffusionPolicy",
           "unet_rules", "encoder_rules"]
