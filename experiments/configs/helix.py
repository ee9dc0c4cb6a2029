"""Helix-style dual system (``model.preset='helix'``) trained on your own data; variants ``tiny`` and ``published``.

    python -m experiments.train --config=experiments/configs/helix.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/helix

* ``tiny``: S2 a SigLIP-style ViT 32 wide (2 layers, patch 8 at 64 px) + a Gemma-style LM 64 wide (2 layers) over
  the tokenizer's ids, latent 32; S1 32 wide, 1 encoder and 1 decoder layer, a ResNet-18 of widths 16-32. S2 runs
  every 4 control steps. Runs on a CPU.
* ``published``: S2 at PaliGemma-3B's shapes (SigLIP So400m/14 at 224 px + Gemma-2B; Helix's own S2 is a closed
  7B VLM), latent 512; S1 at Helix's ~80M (512 wide, 8 heads, 8 encoder and 10 decoder layers, MLP 2048, a
  GroupNorm ResNet-18): 79,267,939 S1 parameters for 35-DoF state and actions (computed abstractly,
  tests/test_preset_helix.py). S2 runs every 25 control steps (~8 Hz under a 200 Hz S1).

``model.head`` swaps S1's action head (``diffusion``, ``binned``, ``l1_mlp``, ...).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

SIZES = {
    "tiny": dict(
        s2=dict(vision=dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8),
                text=dict(vocab_size=0, width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16)),
        s1=dict(width=32, depth=1, num_heads=2, mlp_dim=64, decoder_depth=1, resnet_depth=18,
                resnet_widths=(16, 16, 32, 32)),
        latent_dim=32, plan_every=4, image_size=64),
    "published": dict(
        s2=dict(vision=dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14),
                text=dict(vocab_size=257_152, width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1,
                          head_dim=256)),
        s1=dict(width=512, depth=8, num_heads=8, mlp_dim=2048, decoder_depth=10, resnet_depth=18,
                resnet_widths=(64, 128, 256, 512)),
        latent_dim=512, plan_every=25, image_size=224),
}


def preset_settings(variant: str = "tiny") -> ml_collections.ConfigDict:
    """``model.helix``: S2, S1, the latent and S2's period at ``variant``'s size."""
    if variant not in SIZES:
        raise ValueError(f"unknown helix variant {variant!r}; known: {sorted(SIZES)}")
    return ml_collections.ConfigDict({k: v for k, v in SIZES[variant].items() if k != "image_size"})


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    settings = preset_settings(variant)
    c = finetune.get_config("tiny")
    c.workdir = "runs/helix"
    c.data.image_size = SIZES[variant]["image_size"]
    c.data.action_horizon = 8                      # S1 predicts a short chunk every control step
    c.model.preset = "helix"
    c.model.head = "chunk"
    c.model.head_kwargs = ml_collections.ConfigDict()
    c.model.helix = settings
    c.model.state_input = "head"                   # S1 embeds the proprioceptive state itself
    c.model.max_text_len = 24
    c.model.prompt = "plain"
    c.model.tokenizer = "byte"                     # or PaliGemma's tokenizer file
    if variant == "published":
        c.data.batch_size = 64
        c.model.dtype = "bfloat16"
        c.optim.learning_rate = 1e-4
        c.train.steps = 20000
    return c
