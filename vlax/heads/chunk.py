"""ACT-style chunk head: H future actions regressed at once from learned queries (Zhao et al., 2023).

A small pre-norm transformer decoder: ``horizon`` learned query tokens attend to each other and, by
cross-attention, to the context tokens (projected to the head's width), plus an optional state token and, with
the CVAE option, a latent-style token. Loss: L1 by default (``"mse"``, ``"huber"`` options). The CVAE encoder
(training only) reads ``[CLS, state, a_1 .. a_H]`` and yields ``mu, log_var`` of a ``latent_dim`` latent; inference
uses the zero latent, as ACT does. Temporal ensembling and an action queue live in :mod:`vlax.heads.execution`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn import Attention, ContextSpec, Dense, HeadContext, LayerNorm, Mlp, scan_layers, stack_layers
from vlax.nn.head_base import ActionHead, RngLike, dropout, masked_mean, split_rngs
from vlax.nn.params import param

REGRESSION_LOSSES = ("l1", "mse", "huber")


def regression_error(pred: jax.Array, target: jax.Array, kind: str, delta: float = 1.0) -> jax.Array:
    """Elementwise L1, squared or Huber (quadratic below ``delta``, linear above) error."""
    diff = pred - target
    if kind == "l1":
        return jnp.abs(diff)
    if kind == "mse":
        return jnp.square(diff)
    if kind == "huber":
        a = jnp.abs(diff)
        return jnp.where(a <= delta, 0.5 * jnp.square(diff), delta * (a - 0.5 * delta))
    raise ValueError(f"unknown regression loss {kind!r}; known: {list(REGRESSION_LOSSES)}")


class TransformerLayer(nnx.Module):
    """Pre-norm layer: self-attention, optional cross-attention to a memory, ReLU MLP (ACT's FFN)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, cross: bool, rngs: nnx.Rngs):
        self.self_norm = LayerNorm(width, rngs=rngs)
        self.self_attn = Attention(width, num_heads, use_bias=True, rngs=rngs)
        if cross:
            self.cross_norm = LayerNorm(width, rngs=rngs)
            self.cross_attn = Attention(width, num_heads, use_bias=True, rngs=rngs)
        else:
            self.cross_norm = self.cross_attn = None
        self.mlp_norm = LayerNorm(width, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, act="relu", rngs=rngs)

    def __call__(self, x: jax.Array, self_mask: jax.Array, memory: jax.Array | None, memory_mask: jax.Array | None,
                 *, rate: float, key: jax.Array | None, train: bool) -> jax.Array:
        keys = jax.random.split(key, 3) if key is not None else (None,) * 3
        h, _ = self.self_attn(self.self_norm(x), mask=self_mask)
        x = x + dropout(h, rate, keys[0], train)
        if self.cross_attn is not None:
            h, _ = self.cross_attn(self.cross_norm(x), mask=memory_mask, kv_input=memory)
            x = x + dropout(h, rate, keys[1], train)
        return x + dropout(self.mlp(self.mlp_norm(x)), rate, keys[2], train)


def _run_stack(layers: nnx.Module, depth: int, x, self_mask, memory, memory_mask, *, rate, key, train):
    keys = jax.random.split(key, depth) if key is not None else None

    def body(layer, carry, k):
        return layer(carry, self_mask, memory, memory_mask, rate=rate, key=k, train=train), None

    x, _ = scan_layers(layers, body, x, keys)
    return x


class ChunkHead(ActionHead):
    """Action chunking with transformers (ACT), optionally with its CVAE.

    Args:
      action_dim, horizon: actions are ``[B, horizon, action_dim]``.
      context: :class:`vlax.nn.ContextSpec` (``width`` of the context tokens).
      width, depth, num_heads, mlp_dim: decoder size (LeRobot's ACT: 512, 1, 8, 3200).
      loss: ``"l1"`` (ACT), ``"mse"`` or ``"huber"`` (``huber_delta``).
      cvae: train with ACT's conditional VAE (``latent_dim`` 32, ``kl_weight`` 10, ``encoder_depth`` layers).
      state_dim: if set, ``ctx.state [B, state_dim]`` becomes one more memory token (and a CVAE encoder input).
      dropout: residual dropout rate during training (ACT: 0.1), from the dropout RNG stream.
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, width: int = 512,
                 depth: int = 1, num_heads: int = 8, mlp_dim: int = 3200, loss: str = "l1", huber_delta: float = 1.0,
                 cvae: bool = False, latent_dim: int = 32, kl_weight: float = 10.0, encoder_depth: int = 4,
                 state_dim: int | None = None, dropout: float = 0.1, rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        if loss not in REGRESSION_LOSSES:
            raise ValueError(f"unknown regression loss {loss!r}; known: {list(REGRESSION_LOSSES)}")
        if width % num_heads:
            raise ValueError(f"width={width} is not a multiple of num_heads={num_heads}")
        self.loss_kind, self.huber_delta, self.rate = loss, float(huber_delta), float(dropout)
        self.cvae, self.latent_dim, self.kl_weight = cvae, int(latent_dim), float(kl_weight)
        self.depth, self.encoder_depth, self.state_dim = int(depth), int(encoder_depth), state_dim
        init = nnx.initializers.normal(0.02)
        self.queries = param(rngs, init, (self.horizon, width), (None, "embed"))
        self.context_proj = Dense(self.context.width, width, axes=("embed", "embed"), rngs=rngs)
        self.state_proj = Dense(state_dim, width, rngs=rngs) if state_dim else None
        self.decoder = stack_layers(lambda r: TransformerLayer(width, num_heads, mlp_dim, cross=True, rngs=r),
                                    self.depth, rngs)
        self.final_norm = LayerNorm(width, rngs=rngs)
        self.action_out = Dense(width, self.action_dim, axes=("embed", None), rngs=rngs)
        if cvae:
            n_in = 1 + (1 if state_dim else 0) + self.horizon
            self.vae_cls = param(rngs, init, (1, width), (None, "embed"))
            self.vae_pos = param(rngs, init, (n_in, width), (None, "embed"))
            self.vae_action_proj = Dense(self.action_dim, width, axes=(None, "embed"), rngs=rngs)
            self.vae_state_proj = Dense(state_dim, width, rngs=rngs) if state_dim else None
            self.vae_encoder = stack_layers(
                lambda r: TransformerLayer(width, num_heads, mlp_dim, cross=False, rngs=r), self.encoder_depth, rngs)
            self.vae_out = Dense(width, 2 * self.latent_dim, axes=("embed", None), rngs=rngs)
            self.latent_proj = Dense(self.latent_dim, width, axes=(None, "embed"), rngs=rngs)

    def predict(self, ctx: HeadContext, latent: jax.Array | None = None, *, key: jax.Array | None = None,
                train: bool = False) -> jax.Array:
        """Chunk ``[B, H, A]`` from the context (and ``latent [B, latent_dim]`` with the CVAE; zeros if ``None``)."""
        self.check_context(ctx)
        b = ctx.batch_size
        memory, memory_mask = [self.context_proj(ctx.tokens)], [ctx.mask.astype(bool)]
        if self.state_proj is not None:
            memory.insert(0, self.state_proj(self.require_state(ctx, self.state_dim))[:, None])
            memory_mask.insert(0, jnp.ones((b, 1), bool))
        if self.cvae:
            latent = jnp.zeros((b, self.latent_dim), memory[-1].dtype) if latent is None else latent
            memory.insert(0, self.latent_proj(latent)[:, None])
            memory_mask.insert(0, jnp.ones((b, 1), bool))
        memory, memory_mask = jnp.concatenate(memory, axis=1), jnp.concatenate(memory_mask, axis=1)
        x = jnp.broadcast_to(self.queries[...].astype(memory.dtype), (b, *self.queries.shape))
        self_mask = jnp.ones((b, self.horizon, self.horizon), bool)
        cross_mask = jnp.broadcast_to(memory_mask[:, None, :], (b, self.horizon, memory.shape[1]))
        x = _run_stack(self.decoder, self.depth, x, self_mask, memory, cross_mask, rate=self.rate, key=key,
                       train=train)
        return self.action_out(self.final_norm(x))

    def encode(self, ctx: HeadContext, actions: jax.Array, step_mask: jax.Array, *, key: jax.Array | None,
               train: bool) -> tuple[jax.Array, jax.Array]:
        """CVAE posterior ``(mu, log_var)``, each ``[B, latent_dim]``; ``step_mask [B, H]`` hides padded steps."""
        b = actions.shape[0]
        tokens = [jnp.broadcast_to(self.vae_cls[...], (b, 1, self.vae_cls.shape[-1]))]
        mask = [jnp.ones((b, 1), bool)]
        if self.vae_state_proj is not None:
            tokens.append(self.vae_state_proj(self.require_state(ctx, self.state_dim))[:, None])
            mask.append(jnp.ones((b, 1), bool))
        tokens.append(self.vae_action_proj(actions))
        mask.append(step_mask.astype(bool))
        x = jnp.concatenate(tokens, axis=1) + self.vae_pos[...]
        mask = jnp.concatenate(mask, axis=1)
        attn_mask = mask[:, None, :] & mask[:, :, None]
        x = _run_stack(self.vae_encoder, self.encoder_depth, x, attn_mask, None, None, rate=self.rate, key=key,
                       train=train)
        stats = self.vae_out(x[:, 0])
        return stats[:, :self.latent_dim], stats[:, self.latent_dim:]

    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike | None = None, train: bool = True, lm=None) -> tuple[jax.Array, dict]:
        """Regression loss over real entries (+ ``kl_weight`` × KL with the CVAE while training)."""
        actions, mask = self.prepare_actions(actions, action_mask)
        noise_key, drop_key = split_rngs(rngs) if rngs is not None else (None, None)
        if train and self.rate > 0 and drop_key is None:
            raise ValueError("training with dropout needs rngs")
        enc_key, dec_key = jax.random.split(drop_key) if drop_key is not None else (None, None)
        latent, kl = None, jnp.zeros((), jnp.float32)
        if self.cvae and train:
            if noise_key is None:
                raise ValueError("training the CVAE needs rngs (latent noise)")
            mu, log_var = self.encode(ctx, actions, mask.max(axis=-1) > 0, key=enc_key, train=train)
            latent = mu + jnp.exp(0.5 * log_var) * jax.random.normal(noise_key, mu.shape, mu.dtype)
            kl = jnp.mean(jnp.sum(-0.5 * (1.0 + log_var - jnp.square(mu) - jnp.exp(log_var)), axis=-1))
        pred = self.predict(ctx, latent, key=dec_key, train=train)
        recon = masked_mean(regression_error(pred, actions, self.loss_kind, self.huber_delta), mask)
        loss = recon + self.kl_weight * kl
        metrics = {"loss": loss, self.loss_kind: recon, "l1": masked_mean(jnp.abs(pred - actions), mask)}
        if self.cvae:
            metrics["kl"] = kl
        return loss, metrics

    def sample(self, ctx: HeadContext, *, rngs: RngLike | None = None, num_steps: int | None = None,
               lm=None) -> jax.Array:
        """The chunk ``[B, H, A]`` predicted with the zero latent (deterministic; ``rngs`` is not used)."""
        return self.predict(ctx, None, train=False)


# ---------------------------------------------------------------------------------------- ACT's own layout
# LeRobot's ACT differs from the pre-norm ChunkHead above: positions are added to queries and keys (never to
# values) inside every layer, layers are post-norm unless ``pre_norm``, the decoder queries start at zero and carry
# only their learned position, and the image / latent / state tokens go through a transformer encoder first.


class PositionalAttention(nnx.Module):
    """Multi-head attention of torch's ``nn.MultiheadAttention`` layout: separate query, key and value inputs."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width={width} is not a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_proj = Dense(width, width, axes=("embed", "heads"), rngs=rngs)
        self.k_proj = Dense(width, width, axes=("embed", "heads"), rngs=rngs)
        self.v_proj = Dense(width, width, axes=("embed", "heads"), rngs=rngs)
        self.out_proj = Dense(width, width, axes=("heads", "embed"), rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        """``q [B, Q, D]``, ``k, v [B, K, D]``, ``key_mask [B, K]`` (True = attend) -> ``[B, Q, D]``."""
        b, nq, d = q.shape
        h = self.num_heads
        split = lambda x: x.reshape(x.shape[0], x.shape[1], h, d // h)
        qh, kh, vh = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / jnp.sqrt(jnp.asarray(d // h, qh.dtype))
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), vh)
        return self.out_proj(out.reshape(b, nq, d))


def _with_pos(x: jax.Array, pos: jax.Array | None) -> jax.Array:
    return x if pos is None else x + pos


class ACTEncoderLayer(nnx.Module):
    """Self-attention (positions on queries and keys) + ReLU FFN; post-norm unless ``pre_norm`` (ACT's)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, pre_norm: bool = False, eps: float = 1e-5,
                 rngs: nnx.Rngs):
        self.pre_norm = pre_norm
        self.self_attn = PositionalAttention(width, num_heads, rngs=rngs)
        self.linear1 = Dense(width, mlp_dim, axes=("embed", "mlp"), rngs=rngs)
        self.linear2 = Dense(mlp_dim, width, axes=("mlp", "embed"), rngs=rngs)
        self.norm1 = LayerNorm(width, eps=eps, rngs=rngs)
        self.norm2 = LayerNorm(width, eps=eps, rngs=rngs)

    def __call__(self, x: jax.Array, pos: jax.Array | None, key_mask: jax.Array | None = None, *, rate: float = 0.0,
                 key: jax.Array | None = None, train: bool = False) -> jax.Array:
        """``x [B, N, D]``, ``pos [B or 1, N, D]`` -> ``[B, N, D]``."""
        keys = jax.random.split(key, 3) if key is not None else (None,) * 3
        h = self.norm1(x) if self.pre_norm else x
        qk = _with_pos(h, pos)
        x = x + dropout(self.self_attn(qk, qk, h, key_mask), rate, keys[0], train)
        if self.pre_norm:  # x + f(norm2(x))
            h = self.norm2(x)
            return x + dropout(self.linear2(dropout(jax.nn.relu(self.linear1(h)), rate, keys[1], train)), rate,
                               keys[2], train)
        h = self.norm1(x)  # post-norm: norm2(h + f(h)) with h = norm1(x + attention)
        return self.norm2(h + dropout(self.linear2(dropout(jax.nn.relu(self.linear1(h)), rate, keys[1], train)),
                                      rate, keys[2], train))


class ACTEncoder(nnx.Module):
    """A stack of :class:`ACTEncoderLayer` (a final LayerNorm only with ``pre_norm``, as ACT does)."""

    def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, *, pre_norm: bool = False,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([ACTEncoderLayer(width, num_heads, mlp_dim, pre_norm=pre_norm, rngs=rngs)
                                for _ in range(depth)])
        self.norm = LayerNorm(width, eps=1e-5, rngs=rngs) if pre_norm else None

    def __call__(self, x: jax.Array, pos: jax.Array | None, key_mask: jax.Array | None = None, *, rate: float = 0.0,
                 key: jax.Array | None = None, train: bool = False) -> jax.Array:
        """``[B, N, D] -> [B, N, D]``."""
        keys = jax.random.split(key, len(self.layers)) if key is not None else [None] * len(self.layers)
        for layer, k in zip(self.layers, keys):
            x = layer(x, pos, key_mask, rate=rate, key=k, train=train)
        return x if self.norm is None else self.norm(x)


class ACTDecoderLayer(nnx.Module):
    """Self-attention, cross-attention to the encoder memory, ReLU FFN; post-norm unless ``pre_norm``."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, pre_norm: bool = False, eps: float = 1e-5,
                 rngs: nnx.Rngs):
        self.pre_norm = pre_norm
        self.self_attn = PositionalAttention(width, num_heads, rngs=rngs)
        self.multihead_attn = PositionalAttention(width, num_heads, rngs=rngs)
        self.linear1 = Dense(width, mlp_dim, axes=("embed", "mlp"), rngs=rngs)
        self.linear2 = Dense(mlp_dim, width, axes=("mlp", "embed"), rngs=rngs)
        self.norm1 = LayerNorm(width, eps=eps, rngs=rngs)
        self.norm2 = LayerNorm(width, eps=eps, rngs=rngs)
        self.norm3 = LayerNorm(width, eps=eps, rngs=rngs)

    def __call__(self, x: jax.Array, query_pos: jax.Array, memory: jax.Array, memory_pos: jax.Array | None,
                 memory_mask: jax.Array | None, *, rate: float = 0.0, key: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """``x [B, H, D]``, ``memory [B, N, D]`` -> ``[B, H, D]``."""
        keys = jax.random.split(key, 4) if key is not None else (None,) * 4
        norms = (self.norm1, self.norm2, self.norm3)

        def residual(x, branch, i):
            # pre-norm: x + f(norm(x)); post-norm: norm(x + f(x))
            if self.pre_norm:
                return x + dropout(branch(norms[i](x)), rate, keys[i], train)
            return norms[i](x + dropout(branch(x), rate, keys[i], train))

        def self_attention(h):
            qk = _with_pos(h, query_pos)
            return self.self_attn(qk, qk, h)

        def cross_attention(h):
            return self.multihead_attn(_with_pos(h, query_pos), _with_pos(memory, memory_pos), memory, memory_mask)

        def ffn(h):
            return self.linear2(dropout(jax.nn.relu(self.linear1(h)), rate, keys[3], train))

        x = residual(x, self_attention, 0)
        x = residual(x, cross_attention, 1)
        return residual(x, ffn, 2)


class ACTDecoderHead(ActionHead):
    """ACT's decoder as a head: ``horizon`` zero queries with learned positions attend to the context tokens.

    The context tokens are ACT's encoder output; ``memory_pos [B or 1, N, D]`` (the positions the encoder used)
    is added to the cross-attention keys when given. Loss: LeRobot's L1 (see :meth:`loss`; the CVAE's KL term
    belongs to the encoder, which the ACT preset runs).
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, depth: int = 1,
                 num_heads: int = 8, mlp_dim: int = 3200, pre_norm: bool = False, dropout: float = 0.1,
                 rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        width = self.context.width
        self.rate = float(dropout)
        self.query_pos = param(rngs, nnx.initializers.normal(1.0), (self.horizon, width), (None, "embed"))
        self.layers = nnx.List([ACTDecoderLayer(width, num_heads, mlp_dim, pre_norm=pre_norm, rngs=rngs)
                                for _ in range(depth)])
        self.norm = LayerNorm(width, eps=1e-5, rngs=rngs)
        self.action_out = Dense(width, self.action_dim, axes=("embed", None), rngs=rngs)

    def predict(self, ctx: HeadContext, memory_pos: jax.Array | None = None, *, key: jax.Array | None = None,
                train: bool = False) -> jax.Array:
        """Chunk ``[B, H, A]``."""
        self.check_context(ctx)
        b, width = ctx.batch_size, ctx.width
        x = jnp.zeros((b, self.horizon, width), ctx.tokens.dtype)
        query_pos = self.query_pos[...][None].astype(x.dtype)
        keys = jax.random.split(key, len(self.layers)) if key is not None else [None] * len(self.layers)
        for layer, k in zip(self.layers, keys):
            x = layer(x, query_pos, ctx.tokens, memory_pos, ctx.mask.astype(bool), rate=self.rate, key=k,
                      train=train)
        return self.action_out(self.norm(x))

    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike | None = None, train: bool = True, lm=None, memory_pos: jax.Array | None = None
             ) -> tuple[jax.Array, dict]:
        """L1 as LeRobot's ACT computes it: ``|pred - a|`` zeroed on padded entries, averaged over all ``B*H*A``
        entries (padded ones count in the denominator, so a padded batch weighs less than with a masked mean)."""
        actions, mask = self.prepare_actions(actions, action_mask)
        key = split_rngs(rngs)[1] if rngs is not None else None
        if train and self.rate > 0 and key is None:
            raise ValueError("training with dropout needs rngs")
        pred = self.predict(ctx, memory_pos, key=key, train=train)
        l1 = jnp.mean(jnp.abs(pred - actions) * mask)
        return l1, {"loss": l1, "l1": l1}

    def sample(self, ctx: HeadContext, *, rngs: RngLike | None = None, num_steps: int | None = None,
               lm=None, memory_pos: jax.Array | None = None) -> jax.Array:
        """The chunk ``[B, H, A]`` (deterministic; ``rngs`` is not used)."""
        return self.predict(ctx, memory_pos, train=False)
