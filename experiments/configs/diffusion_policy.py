"""Diffusion Policy (LeRobot's ``DiffusionPolicy``) on a LeRobot v3 / RLDS dataset.

    python -m experiments.train --config=experiments/configs/diffusion_policy.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/dp

Variants: ``default`` (LeRobot's DiffusionConfig: ResNet-18 GroupNorm, 32 keypoints, U-Net (512, 1024, 2048)
kernel 5, DDPM over 100 steps, horizon 16, 8 actions executed from index 1, two observation steps, 96 px) and
``tiny`` (the sizes of the LeRobot reference fixture: U-Net (32, 64), DDIM 20 train / 5 sampling steps,
8 keypoints, horizon 8, 4 executed actions, 64 px). ``--config.model.head=chunk`` keeps the observation
encoder and swaps the action head.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

SIZES = {
    "default": dict(down_dims=(512, 1024, 2048), kernel_size=5, n_groups=8, step_embed_dim=128, sampler="ddpm",
                    num_train_timesteps=100, num_steps=100, num_keypoints=32, horizon=16, n_action_steps=8,
                    image_size=96),
    "tiny": dict(down_dims=(32, 64), kernel_size=3, n_groups=4, step_embed_dim=32, sampler="ddim",
                 num_train_timesteps=20, num_steps=5, num_keypoints=8, horizon=8, n_action_steps=4, image_size=64),
}


def preset_settings(variant: str = "tiny") -> ml_collections.ConfigDict:
    """``model.diffusion_policy``: the observation encoder's settings at ``variant``'s size."""
    s = SIZES[variant]
    return ml_collections.ConfigDict({
        "encoder": {"crop_shape": (), "crop_is_random": True, "num_keypoints": s["num_keypoints"],
                    "separate_per_camera": False, "resnet": {"depth": 18}},
        "n_action_steps": s["n_action_steps"],
        "pixel_stats": {}})                         # {camera: (mean [3], std [3])}; empty: pixels in [0, 1]


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in SIZES:
        raise ValueError(f"unknown diffusion_policy variant {variant!r}; known: {sorted(SIZES)}")
    s = SIZES[variant]
    c = finetune.get_config("tiny")
    c.workdir = "runs/diffusion_policy"
    c.data.obs_history = 2                          # n_obs_steps: the current observation and the one before
    c.data.action_horizon = s["horizon"]            # from the oldest observation step
    c.data.image_size = s["image_size"]
    c.data.normalization = "min_max"                # LeRobot's MIN_MAX for state and action
    c.data.augment = False                          # the preset's own random crop is its augmentation
    c.model.preset = "diffusion_policy"
    c.model.state_input = "head"
    c.model.head = "diffusion_unet"
    # head_defaults apply only while that head is chosen, so model.head=chunk does not receive the U-Net's keywords.
    c.model.head_kwargs = ml_collections.ConfigDict()
    c.model.head_defaults = ml_collections.ConfigDict({"diffusion_unet": {
        "schedule": "squaredcos_cap_v2", "num_train_timesteps": s["num_train_timesteps"], "beta_start": 1e-4,
        "beta_end": 0.02, "prediction_type": "epsilon", "sampler": s["sampler"], "num_steps": s["num_steps"],
        "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
        "denoiser_kwargs": {"down_dims": s["down_dims"], "kernel_size": s["kernel_size"],
                            "n_groups": s["n_groups"], "step_embed_dim": s["step_embed_dim"], "film_scale": True,
                            "final_n_groups": 8}}})
    c.model.diffusion_policy = preset_settings(variant)
    c.optim.learning_rate, c.optim.weight_decay = 1e-4, 1e-6  # LeRobot's optimizer settings
    return c
