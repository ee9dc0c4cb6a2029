"""RT-2-style VLA (``model.preset='rt2'``) trained on your own data; variants ``tiny`` and ``paligemma_3b``.

    python -m experiments.train --config=experiments/configs/rt2.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/rt2

* ``tiny``: SigLIP-style ViT 32 wide, 2 layers, patch 8 at 64 px (64 tokens per camera); Gemma-style LM 64 wide,
  2 layers, 4 heads, 1 KV head, head size 16, over the tokenizer's ids plus 256 action ids. Runs on a CPU.
* ``paligemma_3b``: PaliGemma-3B's shapes (SigLIP So400m/14 at 224 px + Gemma-2B, vocabulary 257,152), the action
  bins on its location tokens ``<loc0000>`` .. ``<loc0255>``; 2,923,335,408 parameters (computed abstractly,
  tests/test_preset_rt2.py). RT-2 itself (PaLI-X 55B, PaLM-E 12B) is closed; this is its open analogue.

RT-2 writes one step (8 tokens: terminate, 6-DoF delta, gripper) per call; here a call writes ``H * A`` tokens
(``data.action_horizon`` steps of ``A`` values). ``model.head`` swaps the action head (``binned_lm`` is the RT-2 recipe; ``flow``, ``chunk``, ...).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

SIZES = {
    "tiny": dict(vision=dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8),
                 text=dict(vocab_size=0, width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
                 n_bins=256, action_vocab_size=0, image_size=64),
    "paligemma_3b": dict(vision=dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14),
                         text=dict(vocab_size=257_152, width=2048, depth=18, mlp_dim=16_384, num_heads=8,
                                   num_kv_heads=1, head_dim=256),
                         n_bins=256, action_vocab_size=256_256, image_size=224),
}
# RT-2's question-answer prompt for robot actions.
PROMPT = "Q: what action should the robot take to {instruction}? A:"


def preset_settings(variant: str = "tiny") -> ml_collections.ConfigDict:
    """``model.rt2``: the vision tower, LM and action-token settings at ``variant``'s size."""
    if variant not in SIZES:
        raise ValueError(f"unknown rt2 variant {variant!r}; known: {sorted(SIZES)}")
    return ml_collections.ConfigDict({k: v for k, v in SIZES[variant].items() if k != "image_size"})


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    settings = preset_settings(variant)
    c = finetune.get_config("tiny")
    c.workdir = "runs/rt2"
    c.data.image_size = SIZES[variant]["image_size"]
    c.data.action_horizon = 1 if variant == "paligemma_3b" else 4  # RT-2 predicts one step
    c.data.normalization = "bounds"                                # [-1, 1], the range of the bins
    c.model.preset = "rt2"
    c.model.head = "binned_lm"
    c.model.head_kwargs = ml_collections.ConfigDict()
    c.model.rt2 = settings
    c.model.state_input = "none"                                   # RT-2 reads images and text only
    c.model.state_dim = 0
    c.model.action_dim = 7 if variant == "paligemma_3b" else 0     # 0: the data's action dim
    c.model.max_text_len = 32
    c.model.prompt = PROMPT
    c.model.tokenizer = "byte"                                     # or PaliGemma's tokenizer file
    if variant == "paligemma_3b":
        c.data.batch_size = 32
        c.model.dtype = "bfloat16"
        c.optim.learning_rate = 1e-5
        c.train.steps = 20000
    return c
