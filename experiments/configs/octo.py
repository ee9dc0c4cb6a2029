"""Octo (``model.preset='octo'``) trained on your own data; variants ``tiny``, ``small`` and ``base``.

    python -m experiments.train --config=experiments/configs/octo.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/octo

* ``small`` / ``base``: Octo-small / Octo-base (``rail-berkeley/octo-{small,base}-1.5``): ViT-S (384 wide, 12
  layers, 6 heads, MLP 1536) / ViT-B (768, 12, 12, 3072), window 2, SmallStem16 per camera (primary 256 px,
  wrist 128 px, goal image stacked), 16 T5-base language tokens (frozen T5-base encoder), one readout, the
  diffusion head (MLP-ResNet, 3 blocks of 256, 20 cosine steps, actions clipped to +-5), chunk 4. 27.0M / 92.8M
  parameters without T5 (the published 27M / 93M), plus 109.6M of T5-base. Start from a released checkpoint with
  ``vlax.weights.octo.load_octo``.
* ``tiny``: the sizes of the tiny reference models (tests/fixtures/octo): 64 wide, 2 layers, 4 heads, MLP 128,
  stems (32, 32, 64, 64) -> 64, a 1-layer 16-wide T5 over the byte tokenizer. Runs on a CPU.

``model.head`` swaps the action head (``diffusion``: Octo's; ``l1_map``: Octo's L1 head; ``chunk``, ``flow``...).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
               feed_forward_proj="relu")
PUBLISHED_CAMERAS = dict(primary=dict(image_size=256), wrist=dict(image_size=128))
SIZES = {
    "small": dict(width=384, depth=12, num_heads=6, mlp_dim=1536, cameras=PUBLISHED_CAMERAS, t5=T5_BASE),
    "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072, cameras=PUBLISHED_CAMERAS, t5=T5_BASE),
    "tiny": dict(width=64, depth=2, num_heads=4, mlp_dim=128, cameras={},
                 stem=dict(features=(32, 32, 64, 64), num_features=64),
                 t5=dict(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                         feed_forward_proj="gated-gelu")),
}
VARIANTS = tuple(SIZES)
OPTIONS = dict(max_horizon=10, language="t5", proprio=False, num_readouts=1, repeat_task_tokens=True,
               use_correct_attention=True)


def preset_settings(variant: str = "tiny") -> ml_collections.ConfigDict:
    """``model.octo``: the transformer, stems, language encoder and token options at ``variant``'s size."""
    if variant not in SIZES:
        raise ValueError(f"unknown octo variant {variant!r}; known: {list(VARIANTS)}")
    return ml_collections.ConfigDict({**OPTIONS, **SIZES[variant]})


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown octo variant {variant!r}; known: {list(VARIANTS)}")
    c = finetune.get_config("tiny")
    c.workdir = "runs/octo"
    c.data.obs_history = 2                         # Octo's window
    c.data.action_chunks = "every_step"             # each window step's readout trains on its own chunk
    c.data.action_horizon = 4
    c.data.normalization = "normal"                # mean / std, as Octo's NORMAL
    c.data.image_size = 64 if variant == "tiny" else 256
    c.model.preset = "octo"
    c.model.head = "diffusion"
    c.model.head_kwargs = ml_collections.ConfigDict()
    c.model.head_defaults = ml_collections.ConfigDict()
    c.model.octo = preset_settings(variant)
    c.model.state_input = "none"                   # proprio enters as Octo's tokens when model.octo.proprio
    c.model.max_text_len = 16                      # Octo pads instructions to 16 T5 tokens
    c.model.tokenizer = "byte"                     # the released models: a t5-base tokenizer.json directory
    c.model.action_dim = 7 if variant != "tiny" else 0
    if variant == "tiny":
        c.model.head_kwargs = ml_collections.ConfigDict(dict(denoiser_kwargs=dict(hidden_dim=32, num_blocks=2,
                                                                                  time_dim=16)))
    else:
        c.data.batch_size = 256
        c.optim.learning_rate = 3e-4
        c.train.steps = 300000
    return c
