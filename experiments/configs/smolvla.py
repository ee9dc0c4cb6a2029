"""SmolVLA (``model.preset='smolvla'``) trained on your own data; variants ``tiny`` and ``published``.

    python -m experiments.train --config=experiments/configs/smolvla.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/smolvla

* ``tiny``: the sizes of LeRobot's reference fixture (tests/fixtures/lerobot_refs/smolvla): SigLIP-style vision 32
  wide, 2 layers, patch 8 at 64 px, pixel shuffle 2 (16 tokens per camera), SmolLM2-style text 64 wide, 4 layers,
  expert 48 wide, chunk 8, 4 Euler steps. Runs on a CPU.
* ``published``: ``lerobot/smolvla_base``: SmolVLM2-500M-Video-Instruct (vision 768 wide, 12 layers, patch 16 at
  512 px, pixel shuffle 4: 64 tokens per camera; text 960 wide, 15 heads, 5 KV heads, MLP 2560, vocabulary 49280)
  truncated to its first 16 text layers, expert 720 wide (MLP 2048), chunk 50, 10 Euler steps, state and
  actions padded to 32. Start from the checkpoint with ``vlax.weights.lerobot_smolvla.load_smolvla``.

``model.head`` swaps the action head (``chunk``, ``diffusion``, ...) while keeping the SmolVLM prefix.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

TINY = dict(
    vision=dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=64, norm_eps=1e-6),
    text=dict(vocab_size=345, width=64, depth=4, mlp_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
              norm_eps=1e-5, tie_embeddings=False),
    scale_factor=2, resize_imgs_with_padding=(64, 64), max_state_dim=8, max_action_dim=8, num_steps=4,
    num_vlm_layers=4, num_expert_layers=-1, self_attn_every_n_layers=2, expert_width_multiplier=0.75,
    min_period=4e-3, max_period=4.0, add_image_special_tokens=False, chunk_size=8)

PUBLISHED = dict(
    vision=dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16, image_size=512, norm_eps=1e-6),
    text=dict(vocab_size=49280, width=960, depth=32, mlp_dim=2560, num_heads=15, num_kv_heads=5, head_dim=64,
              norm_eps=1e-5, tie_embeddings=False),
    scale_factor=4, resize_imgs_with_padding=(512, 512), max_state_dim=32, max_action_dim=32, num_steps=10,
    num_vlm_layers=16, num_expert_layers=0, self_attn_every_n_layers=2, expert_width_multiplier=0.75,
    min_period=4e-3, max_period=4.0, add_image_special_tokens=False, chunk_size=50)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in ("tiny", "published"):
        raise ValueError(f"unknown smolvla variant {variant!r}; known: 'tiny', 'published'")
    sizes = dict(TINY if variant == "tiny" else PUBLISHED)
    c = finetune.get_config("tiny")
    c.workdir = "runs/smolvla"
    chunk = sizes.pop("chunk_size")
    c.data.image_size = sizes["resize_imgs_with_padding"][0]
    c.data.image_resize = "pad"                    # aspect kept, zeros left and top (resize_imgs_with_padding)
    c.data.action_horizon = chunk
    c.data.normalization = "normal"                # LeRobot's MEAN_STD for state and action
    c.data.max_state_dim = sizes["max_state_dim"]  # SmolVLA zero-pads state and actions
    c.data.max_action_dim = sizes["max_action_dim"]
    c.model.preset = "smolvla"
    c.model.head = "flow_smolvla"
    c.model.head_kwargs = ml_collections.ConfigDict()
    c.model.head_defaults = ml_collections.ConfigDict()
    c.model.smolvla = ml_collections.ConfigDict(sizes)
    c.model.state_dim = sizes["max_state_dim"]
    c.model.action_dim = sizes["max_action_dim"]
    c.model.max_text_len = 16 if variant == "tiny" else 48
    c.model.prompt = "smolvla"                     # the task with a trailing newline
    c.model.tokenizer = "byte"                     # or the vlm/ directory of a checkpoint (its tokenizer.json)
    # LeRobot's defaults (freeze_vision_encoder, train_expert_only): the VLM stays as loaded; the state projection
    # and the head train. '' trains everything.
    c.optim.freeze = r"^(vision|connector|backbone)/"
    if variant == "published":
        c.data.batch_size = 64
        c.model.dtype = "bfloat16"
        c.optim.learning_rate = 1e-4
        c.train.steps = 20000
    return c
