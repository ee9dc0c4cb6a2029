"""Binned-token action head (RT-2, OpenVLA; Octo's discrete head, OpenVLA-OFT).

Each action dimension of each step becomes one of ``n_bins`` classes (:class:`BinTokenizer`), trained with
cross-entropy. Two modes:

* ``"lm"``: the classes are the last ``n_bins`` ids of the backbone's vocabulary and are decoded one token at a
  time through the backbone's own LM head, appending to its KV cache (RT-2 / OpenVLA). The head itself has no
  parameters; ``loss`` and ``sample`` need ``lm`` (a :class:`vlax.nn.LanguageModel`) and ``ctx.cache``.
* ``"parallel"``: readout tokens pooled from the context feed a per-dimension ``n_bins``-way classifier, all
  steps and dimensions in one pass (Octo discrete, OpenVLA-OFT).

:class:`BinTokenizer` is OpenVLA's action tokenizer (RT-2 binning), usable inside ``jit``. Its semantics
(``prismatic/vla/action_tokenizer.py``): ``n_bins`` edges ``linspace(low, high, n_bins)``;
``digitize(clip(a, low, high), edges)`` gives ``d`` in ``[1, n_bins]``; the token id is ``vocab_size - d`` (the
last ``n_bins`` ids of the vocabulary); decoding maps token ``t`` to ``centers[clip(vocab_size - t - 1, 0,
n_bins - 2)]`` with ``centers`` the ``n_bins - 1`` midpoints of consecutive edges. Class ``d - 1`` in
``[0, n_bins)`` is what the parallel (classifier) head predicts.

OpenVLA computes in float64 numpy. Here each float64 edge is stored as the smallest float32 not below it, so that
for float32 inputs ``x >= edge32`` holds exactly when ``x >= edge64``: encoding float32 actions reproduces the
float64 reference bit for bit, bin boundaries included.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.nn import ContextSpec, Dense, HeadContext, LanguageModel, LayerNorm
from vlax.nn.head_base import ActionHead, AttentionPool, RngLike, masked_mean, masked_mean_pool, split_rngs
from vlax.nn.lm_decoding import autoregressive_decode, check_decode_room, teacher_forced_logits, token_cross_entropy


# ---- the tokenizer -------------------------------------------------------------------------------------------------

def _round_up_float32(x: np.ndarray) -> np.ndarray:
    """Smallest float32 >= each float64 value."""
    x32 = x.astype(np.float32)
    below = x32.astype(np.float64) < x
    return np.where(below, np.nextafter(x32, np.float32(np.inf)), x32).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class BinTokenizer:
    """Uniform (default) or quantile bins per action dimension, mapped onto the end of an LM vocabulary.

    Attributes:
      n_bins: number of bin edges (OpenVLA: 256), which is also the number of token ids / classes used.
      low, high: clipping range of the uniform bins.
      vocab_size: size of the LM vocabulary whose last ``n_bins`` ids carry actions; ``None`` for the parallel head
        (classes only).
      quantile_edges: optional data-derived edges, ``n_bins`` floats shared by all dimensions or one tuple of
        ``n_bins`` floats per action dimension (see :meth:`from_quantiles`); replaces ``low``/``high``.
    """

    n_bins: int = 256
    low: float = -1.0
    high: float = 1.0
    vocab_size: int | None = None
    quantile_edges: tuple | None = None

    def __post_init__(self):
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2 (edges of at least one bin), got {self.n_bins}")
        if self.vocab_size is not None and self.n_bins > self.vocab_size:
            raise ValueError(f"n_bins={self.n_bins} action tokens do not fit a vocabulary of {self.vocab_size} ids; "
                             f"use n_bins <= vocab_size")
        if self.quantile_edges is None and not self.low < self.high:
            raise ValueError(f"need low < high, got low={self.low}, high={self.high}")
        if self.quantile_edges is not None and self.edges.shape[-1] != self.n_bins:
            raise ValueError(f"quantile_edges have {self.edges.shape[-1]} edges per dimension, n_bins={self.n_bins}")

    @classmethod
    def from_quantiles(cls, samples: np.ndarray, n_bins: int = 256, *, vocab_size: int | None = None,
                       quantile_range: tuple[float, float] = (0.0, 1.0), per_dimension: bool = True
                       ) -> "BinTokenizer":
        """Edges at evenly spaced quantiles of ``samples [M, A]`` (equal-mass bins), per dimension by default."""
        samples = np.asarray(samples, np.float64)
        q = np.linspace(quantile_range[0], quantile_range[1], n_bins)
        if per_dimension:
            edges = np.quantile(samples.reshape(-1, samples.shape[-1]), q, axis=0).T  # [A, n_bins]
            packed = tuple(tuple(float(e) for e in row) for row in edges)
        else:
            packed = tuple(float(e) for e in np.quantile(samples.reshape(-1), q))
        return cls(n_bins=n_bins, vocab_size=vocab_size, quantile_edges=packed)

    @functools.cached_property
    def edges(self) -> np.ndarray:
        """Bin edges, float64 ``[n_bins]`` or ``[A, n_bins]``."""
        if self.quantile_edges is not None:
            return np.asarray(self.quantile_edges, np.float64)
        return np.linspace(self.low, self.high, self.n_bins)

    @functools.cached_property
    def centers(self) -> np.ndarray:
        """Bin centres, float64 ``[n_bins - 1]`` or ``[A, n_bins - 1]``."""
        e = self.edges
        return (e[..., :-1] + e[..., 1:]) / 2.0

    @property
    def token_range(self) -> tuple[int, int]:
        """Inclusive range of the vocabulary ids that carry actions."""
        vocab = self._vocab()
        return vocab - self.n_bins, vocab - 1

    def _vocab(self) -> int:
        if self.vocab_size is None:
            raise ValueError("this tokenizer has no vocab_size: token ids need BinTokenizer(vocab_size=...)")
        return self.vocab_size

    def encode_classes(self, actions: jax.Array) -> jax.Array:
        """Bin class ``digitize - 1`` in ``[0, n_bins)``: ``[..., A]`` float -> int32 (clipped like OpenVLA)."""
        edges = jnp.asarray(_round_up_float32(self.edges))
        x = jnp.asarray(actions, jnp.float32)[..., None]
        count = jnp.sum((x >= edges).astype(jnp.int32), axis=-1)  # == np.digitize for sorted edges
        return jnp.clip(count, 1, self.n_bins) - 1

    def decode_classes(self, classes: jax.Array) -> jax.Array:
        """Bin centre of each class ``[..., A]`` (the top class folds onto the last centre, as in OpenVLA)."""
        idx = jnp.clip(jnp.asarray(classes, jnp.int32), 0, self.n_bins - 2)
        centers = jnp.asarray(self.centers.astype(np.float32))
        if centers.ndim == 1:
            return centers[idx]
        return jnp.take_along_axis(jnp.broadcast_to(centers, (*idx.shape, centers.shape[-1])), idx[..., None],
                                   axis=-1)[..., 0]

    def encode(self, actions: jax.Array) -> jax.Array:
        """Token ids ``vocab_size - digitize(clip(actions))``: ``[..., A]`` -> int32 ``[..., A]``."""
        return self._vocab() - 1 - self.encode_classes(actions)

    def decode(self, tokens: jax.Array) -> jax.Array:
        """Actions (bin centres) of token ids ``[..., A]``; ids outside the action range are clipped onto it."""
        return self.decode_classes(self._vocab() - 1 - jnp.asarray(tokens, jnp.int32))

    def classes_to_tokens(self, classes: jax.Array) -> jax.Array:
        return self._vocab() - 1 - jnp.asarray(classes, jnp.int32)

    def tokens_to_classes(self, tokens: jax.Array) -> jax.Array:
        return self._vocab() - 1 - jnp.asarray(tokens, jnp.int32)


# ---- the head ------------------------------------------------------------------------------------------------------
MODES = ("parallel", "lm")


def _pick(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """Argmax (``temperature == 0``) or a temperature-scaled categorical draw over the last axis."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits.astype(jnp.float32) / temperature, axis=-1).astype(jnp.int32)


class BinnedHead(ActionHead):
    """Cross-entropy over action bins; see the module docstring for the two modes.

    Args:
      action_dim, horizon: actions are ``[B, horizon, action_dim]``.
      context: :class:`vlax.nn.ContextSpec` (``width``; ``vocab_size`` in LM mode).
      mode: ``"parallel"`` or ``"lm"``.
      n_bins, low, high: uniform bins (OpenVLA: 256 over [-1, 1]); or pass ``tokenizer`` (e.g. quantile bins).
      pool: parallel mode readout: ``"map"`` (one attention-pooling probe per step) or ``"mean"``.
      temperature: 0 = argmax decoding, else categorical sampling at that temperature.
      constrain_to_action_tokens: LM mode sampling picks among the action ids only (else the whole vocabulary,
        with out-of-range ids clipped onto the action range when decoded, as OpenVLA does).
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, mode: str = "parallel",
                 n_bins: int = 256, low: float = -1.0, high: float = 1.0, tokenizer: BinTokenizer | None = None,
                 pool: str = "map", num_heads: int | None = None, temperature: float = 0.0,
                 constrain_to_action_tokens: bool = True, rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        if mode not in MODES:
            raise ValueError(f"unknown binned-head mode {mode!r}; known: {list(MODES)}")
        self.mode, self.temperature, self.constrain = mode, float(temperature), constrain_to_action_tokens
        vocab = None
        if mode == "lm":
            self.context.require("vocab_size", why="the binned head in LM mode")
            vocab = self.context.vocab_size
        if tokenizer is None:
            tokenizer = BinTokenizer(n_bins=n_bins, low=low, high=high, vocab_size=vocab)
        elif mode == "lm" and tokenizer.vocab_size != vocab:
            raise ValueError(f"tokenizer.vocab_size={tokenizer.vocab_size} differs from the backbone's "
                             f"vocab_size={vocab}")
        if tokenizer.edges.ndim == 2 and tokenizer.edges.shape[0] != self.action_dim:
            raise ValueError(f"tokenizer has per-dimension edges for {tokenizer.edges.shape[0]} dimensions, "
                             f"action_dim={self.action_dim}")
        self.tokenizer = tokenizer
        self.n_bins = tokenizer.n_bins
        if mode == "parallel":
            width = self.context.width
            if pool == "map":
                heads = num_heads or max(1, width // 64)
                self.pool = AttentionPool(width, heads, num_probes=self.horizon, rngs=rngs)
                self.norm = LayerNorm(width, rngs=rngs)
                self.classifier = Dense(width, self.action_dim * self.n_bins, axes=("embed", "vocab"), rngs=rngs)
            elif pool == "mean":
                self.pool, self.norm = None, LayerNorm(width, rngs=rngs)
                self.classifier = Dense(width, self.horizon * self.action_dim * self.n_bins, axes=("embed", "vocab"),
                                        rngs=rngs)
            else:
                raise ValueError(f"unknown pool {pool!r}; known: ['map', 'mean']")

    @property
    def cache_slots(self) -> int | None:
        return self.horizon * self.action_dim if self.mode == "lm" else None

    # ---- parallel mode ------------------------------------------------------------------------------------------
    def class_logits(self, ctx: HeadContext) -> jax.Array:
        """Parallel mode: logits ``[B, H, A, n_bins]`` in one pass."""
        if self.pool is not None:
            x = self.classifier(self.norm(self.pool(ctx.tokens, ctx.mask)))  # [B, H, A * n_bins]
        else:
            x = self.classifier(self.norm(masked_mean_pool(ctx.tokens, ctx.mask)))  # [B, H * A * n_bins]
        return x.reshape(x.shape[0], self.horizon, self.action_dim, self.n_bins)

    # ---- LM mode ------------------------------------------------------------------------------------------------
    def _check_lm(self, ctx: HeadContext, lm: LanguageModel | None, new_tokens: int) -> None:
        check_decode_room(ctx, lm, new_tokens, "the binned head in LM mode")

    def _restrict(self, logits: jax.Array) -> jax.Array:
        """Logits of the action ids only, reordered by class (class c is id ``vocab - 1 - c``)."""
        vocab = self.tokenizer.vocab_size
        return logits[..., vocab - self.n_bins:vocab][..., ::-1]  # an LM head may be padded past vocab

    # ---- contract -----------------------------------------------------------------------------------------------
    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike | None = None, train: bool = True, lm: LanguageModel | None = None
             ) -> tuple[jax.Array, dict]:
        """Cross-entropy of the binned actions; metrics: ``accuracy`` and ``l1`` of the argmax decoding."""
        self.check_context(ctx)
        actions, mask = self.prepare_actions(actions, action_mask)
        classes = self.tokenizer.encode_classes(actions)  # [B, H, A]
        if self.mode == "parallel":
            logits = self.class_logits(ctx)
            ce = token_cross_entropy(logits, classes)
            predicted = jnp.argmax(logits, axis=-1)
        else:
            b, n_tokens = actions.shape[0], self.horizon * self.action_dim
            self._check_lm(ctx, lm, n_tokens - 1)
            targets = self.tokenizer.classes_to_tokens(classes).reshape(b, n_tokens)
            logits = teacher_forced_logits(ctx, lm, targets)
            ce = token_cross_entropy(logits, targets).reshape(classes.shape)
            predicted = self.tokenizer.tokens_to_classes(jnp.argmax(logits, axis=-1)).reshape(classes.shape)
        loss = masked_mean(ce, mask)
        decoded = self.tokenizer.decode_classes(predicted)
        metrics = {"loss": loss, "accuracy": masked_mean((predicted == classes).astype(jnp.float32), mask),
                   "l1": masked_mean(jnp.abs(decoded - actions), mask)}
        return loss, metrics

    def sample(self, ctx: HeadContext, *, rngs: RngLike, num_steps: int | None = None,
               lm: LanguageModel | None = None) -> jax.Array:
        """Actions ``[B, H, A]`` (bin centres). LM mode decodes ``H * A`` tokens reusing the prefix cache."""
        self.check_context(ctx)
        key, _ = split_rngs(rngs)
        if self.mode == "parallel":
            classes = _pick(self.class_logits(ctx), key, self.temperature)
            return self.tokenizer.decode_classes(classes)
        b, n_tokens = ctx.batch_size, self.horizon * self.action_dim
        self._check_lm(ctx, lm, n_tokens - 1)

        def choose(logits, k):
            if self.constrain:
                return self.tokenizer.classes_to_tokens(_pick(self._restrict(logits), k, self.temperature))
            return _pick(logits, k, self.temperature)

        tokens = autoregressive_decode(ctx, lm, n_tokens, choose, key)
        return self.tokenizer.decode(tokens.reshape(b, self.horizon, self.action_dim))
