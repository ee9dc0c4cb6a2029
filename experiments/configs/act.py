"""ACT (LeRobot's ``ACTPolicy``) on a LeRobot v3 / RLDS dataset.

    python -m experiments.train --config=experiments/configs/act.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/act

Variants: ``default`` (LeRobot's ACTConfig: ResNet-18 with frozen batch norm, dim_model 512, 8 heads, FFN 3200,
4 encoder layers, 1 decoder layer, a 4-layer VAE encoder with latent 32, chunk 100, dropout 0.1, kl_weight 10;
51,613,582 parameters for one camera, 14-dim state and action) and ``tiny`` (the LeRobot reference fixture's
sizes: dim_model 32, 2 heads, FFN 64, one layer each, latent 8, chunk 8, dropout 0). ``--config.model.head=flow``
(or any registered head) keeps ACT's encoder and swaps the action head.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

SIZES = {
    "default": dict(dim_model=512, n_heads=8, dim_feedforward=3200, n_encoder_layers=4, n_decoder_layers=1,
                    n_vae_encoder_layers=4, latent_dim=32, dropout=0.1, chunk_size=100),
    "tiny": dict(dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
                 n_vae_encoder_layers=1, latent_dim=8, dropout=0.0, chunk_size=8),
}


def preset_settings(variant: str = "tiny") -> ml_collections.ConfigDict:
    """``model.act``: the encoder / decoder / VAE settings at ``variant``'s size (the chunk is data.action_horizon)."""
    s = {k: v for k, v in SIZES[variant].items() if k != "chunk_size"}
    return ml_collections.ConfigDict({**s, "use_vae": True, "kl_weight": 10.0, "pre_norm": False,
                                      "backbone_depth": 18, "backbone_widths": (64, 128, 256, 512)})


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in SIZES:
        raise ValueError(f"unknown act variant {variant!r}; known: {sorted(SIZES)}")
    s = dict(SIZES[variant])
    c = finetune.get_config("tiny")
    c.workdir = "runs/act"
    c.data.obs_history = 1
    c.data.action_horizon = s.pop("chunk_size")
    c.data.normalization = "normal"                 # LeRobot's MEAN_STD for state and action
    c.model.preset = "act"
    c.model.state_input = "head"                    # ACT embeds the state as its own encoder token
    c.model.head = "act"
    c.model.head_kwargs = ml_collections.ConfigDict()
    c.model.act = preset_settings(variant)
    c.optim.learning_rate, c.optim.weight_decay = 1e-5, 1e-4  # LeRobot's optimizer settings
    return c
