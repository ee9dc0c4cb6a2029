"""RoboFlamingo (``model.preset='roboflamingo'``) on a LeRobot v3 / RLDS dataset; variants ``tiny``, ``3b``, ``9b``.

    python -m experiments.train --config=experiments/configs/roboflamingo.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/roboflamingo

Every variant sees a 12-frame history (``data.obs_history=12``, RoboFlamingo's ``window_size``), each frame
predicting its own action (``action_horizon=12``, the chunk from the oldest frame), with the LSTM head; CLIP and
the LM's decoder layers are frozen as in RoboFlamingo (the resampler, the cross-attention blocks, the token
embeddings and the head train). ``--config.model.head=chunk`` (or any head reading context tokens) swaps the head.

* ``3b`` (RoboFlamingo's default ``mpt_dolly_3b``, on OpenFlamingo-3B): CLIP ViT-L/14 at 224 px, resampler
  1024 wide (6 layers, 64 latents), a cross-attention block before every one of 24 LM layers (width 2048),
  LSTM head (4 x 1024). The LM is a Llama-style stand-in at MPT-1B's size (2048 x 24, 16 heads, SwiGLU 5461
  wide, which holds as many weights as MPT's 8192-wide GELU MLP; RoPE instead of ALiBi; GPT-NeoX's 50,277 ids + 3
  special tokens): it counts the same parameters, but MPT-1B's weights do not load into it.
* ``9b`` (RoboFlamingo's ``llama_9b``): the same vision side, LLaMA-7B (4096 x 32, 32,003 ids) with a block
  every 4th layer; LLaMA weights load with :mod:`vlax.weights.llama`.

Parameter counts (:func:`param_counts`, an abstract build with ``nnx.eval_shape``, 7-D actions; the preset test
checks them) against OpenFlamingo's paper (Awadalla et al. 2023, "OpenFlamingo: An Open-Source Framework for
Training Large Autoregressive Vision-Language Models", table 1), whose 3B and 9B models train 1.05B and 1.38B
parameters (resampler + cross-attention + token embeddings; its 9B is on MPT-7B, 50,280 ids, where RoboFlamingo's
``llama_9b`` has LLaMA's 32,003, hence 75M fewer here):

=======  ===========  ==========  =============  =============  ===========  ==========  =============
variant  CLIP vision  resampler   cross-attn     LM layers      embeddings   LSTM head   total
=======  ===========  ==========  =============  =============  ===========  ==========  =============
3b       303,179,776  63,019,008    881,000,496  1,208,010,752  102,973,440  41,194,759  2,599,378,231
9b       303,179,776  63,019,008  1,115,815,952  6,476,271,616  131,084,288  49,583,367  8,138,954,007
=======  ===========  ==========  =============  =============  ===========  ==========  =============

Trained (resampler + cross-attention + embeddings): 3b 1,046,992,944 (the paper: 1.05B), 9b 1,309,919,248 (the
paper's MPT-7B model: 1.38B); the LSTM head adds its own. Totals without the head: 2.56B ("3B") and 8.09B ("9B").

Training state per device on 8 devices (FSDP, RoboFlamingo's freeze, float32 master weights, before activations;
``experiments.estimate_memory.estimate(get_config(v).model.to_dict(), spec, 256, fsdp=8, freeze=FREEZE)``):
3b 3.46 GiB (parameters 1.22, AdamW moments 1.02, gradients 1.22), 9b 8.88 GiB (3.80, 1.28, 3.80).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

FREEZE = r"^(vision|lm/lm/(layers|norm))/"  # RoboFlamingo trains the resampler, cross-attention, embeddings, head

LSTM_HEAD = dict(hidden_dim=1024, num_layers=4, dropout=0.1, tower_dims=(1024, 512, 256), gripper_dims=1,
                 gripper_weight=0.01, supervise="every_frame", steps_per_frame=1)

SIZES = {
    "3b": dict(
        vision=dict(variant="L/14", image_size=224),
        resampler=dict(depth=6, num_latents=64, num_heads=8, head_dim=64, ff_mult=4),
        lm=dict(backbone="llama2_7b", overrides=dict(vocab_size=50280, width=2048, depth=24, mlp_dim=5461,
                                                     num_heads=16, num_kv_heads=16, head_dim=128)),
        cross_attn_every=1, cross_attn=dict(num_heads=8, head_dim=64, ff_mult=4),
        head=LSTM_HEAD, image_size=224, history=12),
    "9b": dict(
        vision=dict(variant="L/14", image_size=224),
        resampler=dict(depth=6, num_latents=64, num_heads=8, head_dim=64, ff_mult=4),
        lm=dict(backbone="llama2_7b", overrides=dict(vocab_size=32003)),
        cross_attn_every=4, cross_attn=dict(num_heads=8, head_dim=64, ff_mult=4),
        head=LSTM_HEAD, image_size=224, history=12),
    # The Meta-World head ablation's size (experiments/ablate_heads.py): 128 wide like its generic VLA's backbone.
    "metaworld": dict(
        vision=dict(variant="Ti/8", image_size=64, width=128, depth=2, mlp_dim=256, num_heads=4),
        resampler=dict(depth=1, num_latents=16, num_heads=4, head_dim=32, ff_mult=2),
        lm=dict(backbone="tiny", overrides=dict(vocab_size=0, width=128, depth=4, mlp_dim=384, num_heads=4,
                                                num_kv_heads=2, head_dim=32)),
        cross_attn_every=2, cross_attn=dict(num_heads=4, head_dim=32, ff_mult=2),
        head=dict(LSTM_HEAD, hidden_dim=128, num_layers=2, dropout=0.0, tower_dims=(128,)),
        image_size=64, history=1),
    "tiny": dict(
        vision=dict(variant="Ti/8", image_size=32, width=32, depth=1, mlp_dim=64, num_heads=2),
        resampler=dict(depth=1, num_latents=4, num_heads=2, head_dim=16, ff_mult=2),
        lm=dict(backbone="tiny", overrides=dict(vocab_size=0, width=32, depth=2, mlp_dim=64, num_heads=2,
                                                num_kv_heads=1, head_dim=16)),
        cross_attn_every=1, cross_attn=dict(num_heads=2, head_dim=16, ff_mult=2),
        head=dict(LSTM_HEAD, hidden_dim=32, num_layers=2, dropout=0.0, tower_dims=(32,)),
        image_size=32, history=12),
}


def preset_settings(variant: str = "tiny") -> ml_collections.ConfigDict:
    """``model.roboflamingo`` at ``variant``'s size."""
    s = SIZES[variant]
    return ml_collections.ConfigDict({k: s[k] for k in ("vision", "resampler", "lm", "cross_attn_every",
                                                         "cross_attn")})


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in SIZES:
        raise ValueError(f"unknown roboflamingo variant {variant!r}; known: {sorted(SIZES)}")
    s = SIZES[variant]
    c = finetune.get_config("tiny")
    c.workdir = "runs/roboflamingo"
    c.data.obs_history = s["history"]              # window_size: the current frame and the 11 before it
    c.data.action_horizon = s["history"]           # one action per frame, from the oldest (steps_per_frame=1)
    c.data.image_size = s["image_size"]
    c.data.normalization = "bounds"                # q01 / q99 -> [-1, 1]: the range of the tanh pose head
    c.model.preset = "roboflamingo"
    c.model.state_input = "none"                   # RoboFlamingo's default policy reads no proprioception
    c.model.state_dim = 0
    c.model.tokenizer = "byte"                     # or the LM's tokenizer file
    c.model.max_text_len = 32
    c.model.head = "lstm"
    c.model.head_kwargs = ml_collections.ConfigDict()
    # head_defaults apply only while that head is chosen, so model.head=chunk does not receive the LSTM's keywords.
    c.model.head_defaults = ml_collections.ConfigDict({"lstm": dict(s["head"])})
    c.model.roboflamingo = preset_settings(variant)
    c.optim.freeze = FREEZE
    c.optim.learning_rate = 1e-4                   # RoboFlamingo's learning rate
    if variant != "tiny":
        c.data.batch_size = 6                      # RoboFlamingo's per-GPU batch of 6 windows
        c.model.dtype = "bfloat16"
    return c


def param_counts(variant: str) -> dict[str, int]:
    """Parameters of ``variant`` by part, built abstractly (no arrays are allocated): ``vision``, ``resampler``,
    ``cross_attn``, ``lm_layers`` (decoder layers and final norm), ``embeddings``, ``head``, ``total`` and
    ``trainable`` (what RoboFlamingo trains: everything but CLIP and the decoder layers). 7-D actions."""
    from flax import nnx

    from vlax.nn import count_params
    from vlax.policy import PolicySpec
    from vlax.presets.roboflamingo import build

    c = get_config(variant)
    spec = PolicySpec(cameras=("rgb",), image_size=c.data.image_size, state_dim=0, action_dim=7,
                      horizon=c.data.action_horizon, max_text_len=c.model.max_text_len, state_input="none",
                      obs_history=c.data.obs_history)
    model = c.model.to_dict()
    policy = nnx.eval_shape(lambda: build(model, spec, 256, nnx.Rngs(0)))
    size = lambda m: count_params(nnx.state(m, nnx.Param))  # noqa: E731
    counts = dict(vision=size(policy.vision), resampler=size(policy.resampler),
                  cross_attn=size(policy.lm.gated_cross_attn_layers),
                  lm_layers=size(policy.lm.lm.layers) + size(policy.lm.lm.norm),
                  embeddings=size(policy.lm.lm.embed_tokens), head=size(policy.head))
    counts["total"] = size(policy)
    counts["trainable"] = counts["total"] - counts["vision"] - counts["lm_layers"]
    return counts
