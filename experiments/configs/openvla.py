"""OpenVLA (``model.preset='openvla'``) trained on your own data; variants ``tiny``, ``tiny_oft``, ``tiny_oft_film``,
``openvla_7b``, ``oft_7b`` and ``oft_film_7b``.

    python -m experiments.train --config=experiments/configs/openvla.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/openvla

* ``tiny``: the sizes of the tiny OpenVLA reference checkpoint (tests/fixtures/openvla): DINOv2-reg4 64 wide and
  SigLIP 48 wide (3 blocks each, 4 heads, patch 14 at 224 px), Llama 64 wide, 2 layers, 4 heads, 2 KV heads, the
  real 32064-id vocabulary. Runs on a CPU.
* ``openvla_7b``: ``openvla/openvla-7b``: DINOv2-L/14-reg4 + SigLIP So400m/14 at 224 px, the fused-gelu-mlp
  projector, Llama-2-7B (vocabulary padded to 32064). Start from the checkpoint with
  ``vlax.weights.openvla.load_openvla``.

* ``oft_7b``: OpenVLA-OFT's LIBERO recipe on openvla-7b: parallel decoding of an 8-step chunk with the
  ``l1_mlp`` head (2 residual blocks), learning rate 5e-4.
* ``oft_film_7b``: OpenVLA-OFT+ (its ALOHA recipe): ``oft_7b`` plus FiLM (``model.film``) in every block of both
  towers, a 25-step chunk of 14-D actions, min / max normalisation. OFT+'s three cameras and proprio input are not
  part of this preset (it reads the first camera, no state).
* ``tiny_oft``, ``tiny_oft_film``: the same options at ``tiny`` sizes.

``model.head`` swaps the action head (``binned_lm``: OpenVLA's 7 greedy action tokens; ``flow``, ``chunk``, ...).
``model.film`` adds OFT's FiLM; ``model.openvla.film_init`` is ``uniform`` (torch ``nn.Linear``'s default, as OFT)
or ``zeros`` (the identity at init), ``model.openvla.film_stop_token`` the id averaged with the prompt (``</s>``).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

TINY = dict(
    dino=dict(width=64, depth=3, num_heads=4, mlp_ratio=4.0),
    siglip=dict(width=48, depth=3, num_heads=4, mlp_ratio=3.7362),
    text=dict(vocab_size=32064, width=64, depth=2, mlp_dim=176, num_heads=4, num_kv_heads=2, norm_eps=1e-5),
    image_size=224, n_bins=256, action_vocab_size=32000)

OPENVLA_7B = dict(
    dino=dict(width=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    siglip=dict(width=1152, depth=27, num_heads=16, mlp_ratio=3.7362),
    text=dict(vocab_size=32064, width=4096, depth=32, mlp_dim=11008, num_heads=32, num_kv_heads=32, norm_eps=1e-5),
    image_size=224, n_bins=256, action_vocab_size=32000)

VARIANTS = ("tiny", "tiny_oft", "tiny_oft_film", "openvla_7b", "oft_7b", "oft_film_7b")
# OFT's FiLM: the init of its nn.Linear layers, and the </s> id its language mean includes (Llama-2's)
FILM = dict(film_init="uniform", film_stop_token=2)
# The Meta-World ablation row: the tiny towers on a 4 x 4 patch grid (56 px; data.image_size must match) and a
# 512-id vocabulary whose last 256 ids are the bins, over the run's own tokenizer (no Llama-2 trailing token).
METAWORLD = dict(TINY, image_size=56, text=dict(TINY["text"], vocab_size=512), action_vocab_size=512,
                 append_trailing_token=False)
SETTINGS = {"tiny": TINY, "openvla_7b": OPENVLA_7B, "metaworld": METAWORLD}


def preset_settings(size: str = "tiny") -> ml_collections.ConfigDict:
    """``model.openvla``: the towers, LM and action-token settings at ``size`` (tiny | openvla_7b | metaworld)."""
    if size not in SETTINGS:
        raise ValueError(f"unknown openvla size {size!r}; known: {sorted(SETTINGS)}")
    return ml_collections.ConfigDict({**SETTINGS[size], **FILM})


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown openvla variant {variant!r}; known: {list(VARIANTS)}")
    large = variant.endswith("_7b")
    settings = preset_settings("openvla_7b" if large else "tiny")
    c = finetune.get_config("tiny")
    c.workdir = "runs/openvla"
    c.data.image_size = settings.image_size
    c.data.action_horizon = 1                      # OpenVLA predicts one 7-D action per step
    c.data.normalization = "bounds"                # q01 / q99 -> [-1, 1], the gripper left as is
    c.model.preset = "openvla"
    c.model.head = "binned_lm"
    c.model.film = False                           # OpenVLA-OFT+'s FiLM in the vision towers
    c.model.head_kwargs = ml_collections.ConfigDict()
    c.model.head_defaults = ml_collections.ConfigDict()
    c.model.openvla = settings
    c.model.action_dim = 7 if large else 0         # 0: the data's action dim
    c.model.state_dim = 0                          # the policy reads no state
    c.model.max_text_len = 32
    c.model.prompt = "In: What action should the robot take to {instruction}?\nOut:"
    c.model.tokenizer = "byte"                     # or a checkpoint directory's tokenizer.json
    if large:
        c.data.batch_size = 16
        c.model.dtype = "bfloat16"
        c.optim.learning_rate = 2e-5
        c.train.steps = 20000
    if "oft" in variant:
        c.model.head = "l1_mlp"
        c.model.head_kwargs = ml_collections.ConfigDict(dict(num_blocks=2))
        c.data.action_horizon = 8                  # OFT's LIBERO chunk
        if large:
            c.data.batch_size = 8
            c.optim.learning_rate = 5e-4
    if "film" in variant:
        c.model.film = True
        if large:                                  # OFT+'s ALOHA recipe: 25-step chunks of 14 joint targets
            c.data.action_horizon = 25
            c.data.normalization = "min_max"       # OFT's BOUNDS for absolute joint angles (no q01/q99 clipping)
            c.model.action_dim = 14
            c.data.batch_size = 4
    return c
