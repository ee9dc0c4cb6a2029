"""π0 / π0.5 / π0-FAST (``model.preset='pi0'`` / ``'pi05'`` / ``'pi0_fast'``) trained on your own data; variants
``tiny``, ``tiny_pi05``, ``tiny_fast``, ``published``, ``published_pi05`` and ``published_fast``, each also as
``<variant>_lora``.

    python -m experiments.train --config=experiments/configs/pi0.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/pi0

* ``tiny`` / ``tiny_pi05``: the sizes of the openpi reference fixtures (tests/fixtures/openpi): SigLIP 32 wide,
  2 layers, patch 14 at 224 px (256 tokens per camera); Gemma 64 wide, 2 layers, 4 heads, 1 KV head, head size
  16, vocabulary 1024; expert 32 wide; 8-dim actions, chunk 10. Runs on a CPU.
* ``published`` / ``published_pi05``: openpi's stock sizes: SigLIP So400m/14 at 224, Gemma-2B (PaliGemma, vocabulary
  257,152) with a Gemma-300M action expert, actions padded to 32, chunk 50, 10 Euler steps, bfloat16 compute.
  Start from an openpi checkpoint with ``vlax.weights.openpi.load_openpi``.

π0 embeds the state as a token of the expert's suffix (``model.state_input='head'``); π0.5 writes it, discretized
into 256 bins, into the prompt (``model.prompt='pi05'``, ``state_input='none'``). ``model.head`` swaps the head
(``chunk``, ``diffusion``, ...) while keeping the PaliGemma prefix.

``tiny_fast`` / ``published_fast``: π0-FAST in openpi's token layout (``model.fast_layout='openpi'``), PaliGemma
alone decoding FAST tokens. Set ``--config.model.tokenizer`` to PaliGemma's ``tokenizer.model`` and
``--config.model.head_kwargs.tokenizer`` to a FAST tokenizer: a local copy of openpi's ``physical-intelligence/fast``
processor directory, or a vlax file from ``experiments/fit_fast_tokenizer.py``. As openpi's FAST pipeline, actions
and state are not padded (``model.action_dim`` / ``state_dim`` 0: the data's), normalized by quantiles, and the
prompt is ``Task: <instruction>, State: <256 bins>;\n`` with the instruction lower-cased as openpi does.
``published_fast`` is openpi's ``pi0_fast_libero`` (chunk 10, 256 decoding steps); start from
``pi0_fast_base`` with ``vlax.weights.openpi.load_openpi``. ``--config.model.fast_layout=vlax`` trains vlax's own
layout instead (any tokenizer, e.g. ``byte``).

``<variant>_lora`` (e.g. ``published_lora``): LoRA on the PaliGemma LM (``model.pi0.lora``: rank 16, alpha 16 as
openpi's ``gemma_2b_lora``; tiny: rank 4) with the LM's own weights frozen (``optim.freeze``), the action expert,
SigLIP and the projector trained in full.

π0.5 variants take knowledge insulation (``--config.model.knowledge_insulation.tokenizer=<FAST tokenizer>``): the
VLM co-trained on the chunk's FAST tokens, the flow loss kept off it (see :mod:`vlax.presets.pi0`).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune

VARIANTS = ("tiny", "tiny_pi05", "tiny_fast", "published", "published_pi05", "published_fast")  # each also "_lora"
# π0-FAST's prompt in openpi's FASTTokenizer (vlax.prompts: "Task: ..., State: ...;\n", lower-cased)
FAST_PROMPT = "pi0_fast"
# openpi's gemma_2b_lora (rank 16, alpha 16 on every attention and MLP projection); tiny: rank 4
LORA = {"tiny": dict(rank=4, alpha=4.0), "published": dict(rank=16, alpha=16.0)}
# LoRA fine-tuning freezes the LM's own weights (embeddings included) and trains its adapters, SigLIP, the
# projector and the whole action expert, as openpi's freeze filter for a LoRA PaliGemma with a full expert does
LORA_FREEZE = r"^backbone/(?!.*/lora_[ab](/|$))"

TINY = dict(paligemma_variant="tiny", action_expert_variant="tiny_expert", vocab_size=1024,
            vision=dict(variant="So400m/14", width=32, depth=2, mlp_dim=128, num_heads=2, image_size=224),
            num_steps=10)
PUBLISHED = dict(paligemma_variant="gemma_2b", action_expert_variant="gemma_300m", vocab_size=257_152,
                 vision=dict(variant="So400m/14", image_size=224), num_steps=10)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    lora = variant.endswith("_lora")
    variant = variant.removesuffix("_lora")
    if variant not in VARIANTS:
        raise ValueError(f"unknown pi0 variant {variant!r}; known: {list(VARIANTS)}, each also with '_lora'")
    if variant.endswith("_fast"):
        return _fast_config(variant.startswith("tiny"), lora)
    pi05 = variant.endswith("pi05")
    tiny = variant.startswith("tiny")
    sizes = dict(TINY if tiny else PUBLISHED, pi05=pi05)
    dims, horizon = (8, 10) if tiny else (32, 50)
    c = finetune.get_config("tiny")
    c.workdir = "runs/pi05" if pi05 else "runs/pi0"
    c.data.image_size = 224
    c.data.action_horizon = horizon
    c.data.normalization = "bounds" if pi05 else "normal"  # openpi: quantiles for π0.5, mean/std for π0
    c.data.max_state_dim = dims                            # openpi zero-pads state and actions
    c.data.max_action_dim = dims
    c.model.preset = "pi05" if pi05 else "pi0"
    c.model.head = "flow_pi05" if pi05 else "flow"
    c.model.head_kwargs = ml_collections.ConfigDict()
    c.model.head_defaults = ml_collections.ConfigDict()
    c.model.pi0 = ml_collections.ConfigDict(sizes)
    c.model.state_dim = dims
    c.model.action_dim = dims
    c.model.state_input = "none" if pi05 else "head"
    c.model.max_text_len = 16 if tiny else (200 if pi05 else 48)
    c.model.prompt = "pi05" if pi05 else "pi0"
    c.model.tokenizer = "byte"  # or PaliGemma's tokenizer.json
    if pi05:  # knowledge insulation: on when given a FAST tokenizer (a vlax file or a processor directory)
        c.model.knowledge_insulation = ml_collections.ConfigDict({"tokenizer": "", "fast_weight": 1.0})
    if lora:
        c.model.pi0.lora = ml_collections.ConfigDict(LORA["tiny" if tiny else "published"])
        c.optim.freeze = LORA_FREEZE
    if not tiny:
        c.data.batch_size = 32
        c.model.dtype = "bfloat16"
        c.optim.learning_rate = 2.5e-5
        c.train.steps = 30_000
    return c


def _fast_config(tiny: bool, lora: bool) -> ml_collections.ConfigDict:
    """π0-FAST in openpi's layout (see the module docstring)."""
    c = get_config(("tiny" if tiny else "published") + ("_lora" if lora else ""))
    c.workdir = "runs/pi0_fast"
    c.data.action_horizon = 10                  # openpi's pi0_fast_libero (its DROID configs: 16)
    c.data.normalization = "bounds"             # openpi: quantiles for every model but π0
    c.data.max_state_dim = 0                    # openpi's FAST pipeline pads neither state nor actions
    c.data.max_action_dim = 0
    c.model.preset = "pi0_fast"
    c.model.head = "fast"
    c.model.fast_layout = "openpi"
    c.model.head_kwargs = ml_collections.ConfigDict({"tokenizer": ""})  # a FAST processor directory or vlax file
    if not tiny:
        c.model.head_kwargs.max_decoding_steps = 256  # openpi's sample_actions
    c.model.state_dim = 0
    c.model.action_dim = 0
    c.model.state_input = "none"
    c.model.max_text_len = 48 if tiny else 96       # prompt and state (Gemma splits digits); the postfix is the head's
    c.model.prompt = FAST_PROMPT
    return c
