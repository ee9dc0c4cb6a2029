"""π0-FAST-style action head: FAST tokens decoded autoregressively through the backbone's LM head.

A chunk ``[H, A]`` becomes a variable-length sequence of FAST token ids (DCT + BPE, see
:mod:`vlax.action_tokens.fast`) followed by an end-of-sequence id. Like RT-2 / OpenVLA's binned tokens they take
the LAST ids of the backbone's vocabulary, counted from the end: FAST id ``t`` is vocabulary id
``vocab_size - 1 - t`` and the end marker is ``vocab_size - 1 - n`` for a tokenizer of ``n`` ids, so
``n + 1`` ids are reserved (``vlax.build.backbone_vocab_size`` adds them to the text vocabulary).

* ``loss``: next-token cross-entropy over the whole vocabulary with teacher forcing, the prefix's KV cache
  extended by the targets; positions after the end marker are masked out.
* ``sample``: greedy decoding of up to ``max_tokens + 1`` ids (by default restricted to the reserved ids), cut at
  the first end marker, then FAST-decoded to ``[B, H, A]``. A sequence the tokenizer cannot decode (ids outside
  its vocabulary, nothing before the end marker) becomes zeros; :meth:`FastHead.sample_with_validity` returns
  the per-example flag and the tokenizer counts them.

BPE cannot run under ``jit``, so the head receives a fitted tokenizer object and calls it on the host through
``jax.pure_callback``: ``vocab_size``, ``action_shape``, ``max_tokens``, ``encode_padded(chunks [B, H, A],
length) -> (ids int32 [B, length], lengths int32 [B])`` and ``decode_padded(ids [B, T], lengths [B]) -> (chunks
float32 [B, H, A], valid bool [B])`` (:class:`vlax.action_tokens.FastTokenizer` is one).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.nn import ContextSpec, HeadContext, LanguageModel
from vlax.nn.head_base import ActionHead, RngLike, masked_mean, split_rngs
from vlax.nn.lm_decoding import (autoregressive_decode, check_decode_room, teacher_forced_logits,
                                 token_cross_entropy)

TOKENIZER_API = ("vocab_size", "action_shape", "max_tokens", "encode_padded", "decode_padded")


class _HostTokenizer:
    """Holds the tokenizer as static data: nnx does not walk into it, and equal heads share one graph definition."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __eq__(self, other):
        return isinstance(other, _HostTokenizer) and other.tokenizer is self.tokenizer

    def __hash__(self):
        return id(self.tokenizer)


class FastHead(ActionHead):
    """Cross-entropy over FAST tokens in the backbone's vocabulary; greedy autoregressive decoding.

    Args:
      action_dim, horizon: actions are ``[B, horizon, action_dim]`` (the tokenizer's ``action_shape``).
      context: :class:`vlax.nn.ContextSpec` with ``vocab_size`` (the backbone's, reserved ids included).
      tokenizer: a fitted FAST tokenizer (see the module docstring for the methods used).
      max_tokens: most FAST tokens per chunk (default: the tokenizer's bound ``H * A``); decoding takes
        ``max_tokens + 1`` steps so the end marker fits, and needs that many KV-cache slots minus one.
      constrain_to_action_tokens: sampling picks among the reserved ids only (else the whole vocabulary; a text id
        then makes the sequence invalid).
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, tokenizer: Any = None,
                 max_tokens: int | None = None, constrain_to_action_tokens: bool = True, rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        self.context.require("vocab_size", why="the FAST head")
        if tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("the FAST head needs a fitted tokenizer object (tokenizer=FastTokenizer.load(path)); "
                             "through build_policy, set model.head_kwargs.tokenizer to the file's path")
        missing = [name for name in TOKENIZER_API if not hasattr(tokenizer, name)]
        if missing:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} lacks {missing}; pass a FastTokenizer")
        if tuple(tokenizer.action_shape) != self.action_shape:
            raise ValueError(f"the tokenizer encodes chunks {tuple(tokenizer.action_shape)} but the head's actions "
                             f"are {self.action_shape} (horizon, action_dim); fit a tokenizer for this shape")
        self.num_action_ids = int(tokenizer.vocab_size)
        vocab = self.context.vocab_size
        if self.num_action_ids + 1 > vocab:
            raise ValueError(f"{self.num_action_ids} FAST ids + 1 end marker do not fit a vocabulary of {vocab} "
                             f"ids; the backbone needs vocab_size >= {self.num_action_ids + 1}")
        self.max_tokens = int(max_tokens or tokenizer.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.constrain = bool(constrain_to_action_tokens)
        self.host = _HostTokenizer(tokenizer)

    @property
    def tokenizer(self) -> Any:
        return self.host.tokenizer

    @property
    def end_id(self) -> int:
        """Vocabulary id of the end marker."""
        return self.context.vocab_size - 1 - self.num_action_ids

    @property
    def cache_slots(self) -> int:
        return self.max_tokens  # max_tokens + 1 ids are decoded, all but the last fed back

    # ---- ids ---------------------------------------------------------------------------------------------------
    def encode_targets(self, actions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Vocabulary targets ``[B, max_tokens + 1]`` (FAST ids, end marker, end-marker padding) and FAST lengths
        ``[B]`` of normalized actions ``[B, H, A]``."""
        b, length = actions.shape[0], self.max_tokens
        shapes = (jax.ShapeDtypeStruct((b, length), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
        tokenizer = self.tokenizer

        def host(chunks):
            return tokenizer.encode_padded(np.asarray(chunks), length)

        fast, lengths = jax.pure_callback(host, shapes, jax.lax.stop_gradient(actions), vmap_method="sequential")
        fast = jnp.pad(fast, ((0, 0), (0, 1)))
        position = jnp.arange(length + 1)[None]
        targets = jnp.where(position < lengths[:, None], self.context.vocab_size - 1 - fast, self.end_id)
        return targets, lengths

    def decode_tokens(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(actions float32 [B, H, A], valid bool [B])`` of vocabulary ids ``[B, T]``, cut at the first end
        marker (all ``T`` ids when there is none)."""
        b, t = tokens.shape
        is_end = tokens == self.end_id
        lengths = jnp.where(is_end.any(axis=1), jnp.argmax(is_end, axis=1), t).astype(jnp.int32)
        fast = (self.context.vocab_size - 1 - tokens).astype(jnp.int32)  # a text id lands outside [0, n)
        shapes = (jax.ShapeDtypeStruct((b, *self.action_shape), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.bool_))
        tokenizer = self.tokenizer

        def host(ids, n):
            chunks, valid = tokenizer.decode_padded(np.asarray(ids), np.asarray(n))
            return chunks.astype(np.float32), valid.astype(bool)

        return jax.pure_callback(host, shapes, fast, lengths, vmap_method="sequential")

    # ---- contract ----------------------------------------------------------------------------------------------
    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike | None = None, train: bool = True, lm: LanguageModel | None = None
             ) -> tuple[jax.Array, dict]:
        """Cross-entropy of the FAST tokens and end marker; metrics ``accuracy`` (teacher-forced argmax) and
        ``tokens`` (mean FAST tokens per chunk)."""
        self.check_context(ctx)
        actions, mask = self.prepare_actions(actions, action_mask)
        check_decode_room(ctx, lm, self.max_tokens, "the FAST head")
        # The DCT mixes every time step into every coefficient, so masked entries cannot leave the loss; they are
        # tokenized as zeros (the normalized mean) instead of whatever padding the data holds.
        actions = jnp.where(mask, actions, 0.0)
        targets, lengths = self.encode_targets(actions)
        logits = teacher_forced_logits(ctx, lm, targets)
        weight = jnp.arange(targets.shape[1])[None] <= lengths[:, None]  # FAST tokens and the end marker
        ce = token_cross_entropy(logits, targets)
        loss = masked_mean(ce, weight)
        hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        metrics = {"loss": loss, "accuracy": masked_mean(hit, weight),
                   "tokens": jnp.mean(lengths.astype(jnp.float32))}
        return loss, metrics

    def sample_tokens(self, ctx: HeadContext, *, lm: LanguageModel | None, rngs: RngLike | None = None
                      ) -> jax.Array:
        """Greedy vocabulary ids ``[B, max_tokens + 1]``."""
        self.check_context(ctx)
        check_decode_room(ctx, lm, self.max_tokens, "the FAST head")
        vocab, reserved = self.context.vocab_size, self.num_action_ids + 1

        def choose(logits, _key):
            if self.constrain:  # index k of the reversed tail is vocabulary id vocab - 1 - k
                return (vocab - 1 - jnp.argmax(logits[..., vocab - reserved:][..., ::-1], axis=-1)).astype(jnp.int32)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)

        key = split_rngs(rngs)[0] if rngs is not None else jax.random.key(0)  # greedy: the key is not read
        return autoregressive_decode(ctx, lm, self.max_tokens + 1, choose, key)

    def sample_with_validity(self, ctx: HeadContext, *, rngs: RngLike | None = None,
                             lm: LanguageModel | None = None) -> tuple[jax.Array, jax.Array]:
        """``(actions [B, H, A], valid [B])``: invalid sequences decode to zeros with ``valid`` False."""
        return self.decode_tokens(self.sample_tokens(ctx, lm=lm, rngs=rngs))

    def sample(self, ctx: HeadContext, *, rngs: RngLike, num_steps: int | None = None,
               lm: LanguageModel | None = None) -> jax.Array:
        """Actions ``[B, H, A]`` (normalized), greedily decoded; ``num_steps`` is not used."""
        return self.sample_with_validity(ctx, rngs=rngs, lm=lm)[0]
