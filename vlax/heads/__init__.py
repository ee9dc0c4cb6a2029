"""Action heads behind one contract (see :mod:`vlax.nn.head_base`), looked up by name.

``get_head("flow", action_dim=7, horizon=50, context=spec, rngs=nnx.Rngs(0))`` builds a head; a config swaps heads
with one value. Registry entries are a head class plus published defaults, overridable by keyword.
"""

from __future__ import annotations

import functools
from typing import Callable

from flax import nnx
from flax.core import FrozenDict

from vlax.heads.binned import BinnedHead, BinTokenizer
from vlax.heads.chunk import ACTDecoderHead, ChunkHead
from vlax.heads.diffusion import ConditionalUnet1D, DiffusionHead, MLPResNetDenoiser
from vlax.heads.execution import ActionQueue, EnsembleState, TemporalEnsembler
from vlax.heads.fast import FastHead
from vlax.heads.flow import FlowHead, Pi0Expert, SmolVLAExpert
from vlax.heads.l1_map import L1MapHead
from vlax.heads.l1_mlp import L1MLPHead
from vlax.heads.lstm import LSTMHead
from vlax.nn.head_base import ActionHead, combine_masks, split_rngs
from vlax.nn.noise_schedules import NoiseSchedule

HEADS: dict[str, Callable[..., ActionHead]] = {
    # RT-2 / OpenVLA: action tokens decoded through the backbone's LM head with its KV cache.
    "binned_lm": functools.partial(BinnedHead, mode="lm"),
    # π0-FAST: DCT + BPE action tokens decoded autoregressively through the backbone's LM head.
    "fast": FastHead,
    # Octo discrete / OpenVLA-OFT: one-pass per-dimension classifier on pooled readouts.
    "binned": functools.partial(BinnedHead, mode="parallel"),
    # OpenVLA-OFT: L1-regression MLP-ResNet on the LLM's action-slot states, a whole chunk in one pass.
    "l1_mlp": L1MLPHead,
    # Octo's L1ActionHead: attention-pooled readouts -> one linear map -> tanh squash to +-5, L1 loss.
    "l1_map": L1MapHead,
    # ACT: L1 regression of the chunk from learned queries; with its CVAE.
    "chunk": ChunkHead,
    "chunk_cvae": functools.partial(ChunkHead, cvae=True),
    # LeRobot's ACT decoder: post-norm, zero queries with learned positions, positions on the memory keys.
    "act": ACTDecoderHead,
    # π0: flow matching, action expert sharing attention with every backbone layer, time MLP.
    "flow": functools.partial(FlowHead, expert="pi0"),
    # π0.5: the same with adaptive-RMSNorm time conditioning.
    "flow_pi05": functools.partial(FlowHead, expert="pi0", time_conditioning="adarms"),
    # SmolVLA: narrower expert (0.75 width), self-attention interleaved with cross-attention, causal actions.
    "flow_smolvla": functools.partial(FlowHead, expert="smolvla", causal_actions=True),
    # Octo: MLP-ResNet denoiser, cosine schedule over 20 steps, DDPM with the larger variance.
    "diffusion": DiffusionHead,
    # Diffusion Policy: 1-D FiLM U-Net, squaredcos_cap_v2 over 100 steps, DDPM fixed_small.
    "diffusion_unet": functools.partial(DiffusionHead, denoiser="unet1d", schedule="squaredcos_cap_v2",
                                        num_train_timesteps=100, variance_type="fixed_small"),
    # RoboFlamingo: LSTM over per-frame features, tanh pose + sigmoid gripper towers (temporal="mlp": its fc head).
    "lstm": LSTMHead,
}


def head_class(name: str) -> tuple[type, dict]:
    """``(class, default keyword arguments)`` of the head registered as ``name``."""
    if name not in HEADS:
        raise ValueError(f"unknown action head {name!r}; known: {sorted(HEADS)}")
    entry = HEADS[name]
    if isinstance(entry, functools.partial):
        return entry.func, dict(entry.keywords)
    return entry, {}


def get_head(name: str, **kwargs) -> ActionHead:
    """Build the head registered as ``name`` (keywords override its defaults; ``rngs`` defaults to ``Rngs(0)``)."""
    cls, defaults = head_class(name)
    kwargs.setdefault("rngs", nnx.Rngs(0))
    return cls(**{**defaults, **kwargs})


def to_linen(name: str, **kwargs) -> nnx.bridge.ToLinen:
    """The head registered as ``name`` as a Linen module (``flax.nnx.bridge.ToLinen``).

    Call its methods on the Linen side as ``head.loss(ctx, actions, rngs=key)`` / ``head.sample(ctx, rngs=key)``;
    parameters live in the ``params`` collection of the enclosing Linen module.
    """
    cls, defaults = head_class(name)
    return nnx.bridge.ToLinen(cls, kwargs=FrozenDict({**defaults, **kwargs}))


__all__ = ["HEADS", "get_head", "head_class", "to_linen", "ActionHead", "BinTokenizer", "BinnedHead", "ChunkHead",
           "ACTDecoderHead", "LSTMHead",
           "FastHead", "FlowHead", "L1MapHead", "L1MLPHead", "Pi0Expert", "SmolVLAExpert", "DiffusionHead",
           "MLPResNetDenoiser",
           "ConditionalUnet1D", "NoiseSchedule", "TemporalEnsembler", "EnsembleState", "ActionQueue", "combine_masks",
           "split_rngs"]
