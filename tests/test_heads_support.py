"""Shared fixtures for the head tests: a tiny decoder-only LM built from vlax.nn, producing what a backbone gives
a head (final hidden states, a per-layer prefix KV cache, next-token logits and cached decoding)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import vlax.nn as vn
from xla_flags import OPTIMISED
from vlax.heads import get_head

# Programs run only a few times compile in about half the time without XLA's backend optimisations.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


class TinyLM(nnx.Module):
    """Llama-style LM: embed -> stacked DecoderBlocks -> RMSNorm -> tied logits. Satisfies vlax.nn.LanguageModel."""

    def __init__(self, vocab: int = 300, width: int = 32, depth: int = 2, heads: int = 4, kv_heads: int = 1,
                 head_dim: int = 8, *, rngs: nnx.Rngs):
        self.spec = self.spec_for(vocab, width, depth, heads, kv_heads, head_dim)
        self.embed = vn.Embed(vocab, width, embedding_init=nnx.initializers.normal(0.5), rngs=rngs)
        self.layers = vn.stack_layers(lambda r: vn.DecoderBlock(width, heads, kv_heads, head_dim, 2 * width,
                                                                rngs=r), depth, rngs)
        self.norm = vn.RMSNorm(width, rngs=rngs)

    @staticmethod
    def spec_for(vocab: int = 300, width: int = 32, depth: int = 2, heads: int = 4, kv_heads: int = 1,
                 head_dim: int = 8) -> vn.ContextSpec:
        return vn.ContextSpec(width=width, num_layers=depth, num_heads=heads, num_kv_heads=kv_heads,
                              head_dim=head_dim, vocab_size=vocab)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.embed.attend(hidden)

    def prefix(self, tokens: jax.Array, mask: jax.Array, *, cache_size: int | None = None,
               embeds: jax.Array | None = None) -> vn.HeadContext:
        """Bidirectional pass over a prefix (``embeds`` ahead of ``tokens``); a HeadContext with its KV cache."""
        x = self.embed(tokens)
        if embeds is not None:
            x = jnp.concatenate([embeds.astype(x.dtype), x], axis=1)
        mask = jnp.asarray(mask, bool)
        attn = vn.make_attn_mask(mask, jnp.zeros(mask.shape[1], jnp.int32))
        pos = vn.positions_from_mask(mask)

        def body(layer, h, _):
            h, kv = layer(h, mask=attn, positions=pos)
            return h, kv

        h, (k, v) = vn.scan_layers(self.layers, body, x)
        cache = vn.KVCache.from_prefix(k, v, mask, max_len=cache_size)
        return vn.HeadContext(tokens=self.norm(h), mask=mask, cache=cache)

    def decode_step(self, tokens: jax.Array, cache: vn.KVCache, *, input_mask: jax.Array | None = None):
        """Append ``tokens [B, T]`` (causal among themselves) at ``cache.end``; ``(logits [B, T, V], cache)``."""
        b, t = tokens.shape
        new_mask = jnp.ones((b, t), bool) if input_mask is None else jnp.asarray(input_mask, bool)
        slots = cache.append_mask(new_mask)  # [B, S]
        slot_idx = jnp.arange(cache.max_len)
        causal = slot_idx[None, :] <= (cache.end + jnp.arange(t))[:, None]  # [T, S]
        attn = slots[:, None, :] & causal[None]
        pos = vn.positions_from_mask(new_mask, cache.next_position)

        def body(layer, h, kv):
            h, new_kv = layer(h, mask=attn, positions=pos, kv=kv, cache_index=cache.end)
            return h, new_kv

        h, (k, v) = vn.scan_layers(self.layers, body, self.embed(tokens), (cache.k, cache.v))
        new = cache.replace(k=k, v=v, mask=slots, end=cache.end + t,
                            next_position=cache.next_position + jnp.sum(new_mask, axis=1).astype(jnp.int32))
        return self.logits(self.norm(h)), new


class LinearBackbone(nnx.Module):
    """The cheapest stand-in for a backbone: an observation becomes ``num_tokens`` context tokens, and each layer's
    prefix keys/values are linear maps of them (shapes as a real backbone's cache, without attention)."""

    def __init__(self, obs_dim: int, spec: vn.ContextSpec, num_tokens: int = 2, *, rngs: nnx.Rngs):
        self.spec, self.num_tokens = spec, num_tokens
        self.tokens = vn.Dense(obs_dim, num_tokens * spec.width, rngs=rngs)
        kv = spec.num_layers * spec.num_kv_heads * spec.head_dim
        self.kv = vn.Dense(spec.width, 2 * kv, rngs=rngs)

    def context(self, obs: jax.Array, cache_room: int = 0) -> vn.HeadContext:
        b, s = obs.shape[0], self.spec
        tokens = jnp.tanh(self.tokens(obs)).reshape(b, self.num_tokens, s.width)
        kv = self.kv(tokens).reshape(b, self.num_tokens, 2, s.num_layers, s.num_kv_heads, s.head_dim)
        k, v = (jnp.moveaxis(kv[:, :, i], 2, 0) for i in range(2))  # [L, B, N, K, Dh]
        mask = jnp.ones((b, self.num_tokens), bool)
        return vn.HeadContext(tokens=tokens, mask=mask, cache=vn.KVCache.from_prefix(k, v, mask))


class HeadPolicy(nnx.Module):
    """A minimal VLA: prompt tokens + (optional) an observation vector -> backbone prefix -> head.

    ``backbone="lm"`` runs :class:`TinyLM` over ``[obs token, prompt]``; ``"linear"`` uses :class:`LinearBackbone`
    on the observation alone (heads that do not decode through an LM learn the same, and compile faster).
    """

    def __init__(self, head_name: str, *, action_dim: int, horizon: int, obs_dim: int = 0, lm_kwargs=None,
                 head_kwargs=None, cache_room: int = 32, backbone: str = "lm", rngs: nnx.Rngs):
        self.lm = TinyLM(**(lm_kwargs or {}), rngs=rngs) if backbone == "lm" else None
        spec = TinyLM.spec_for(**(lm_kwargs or {}))
        self.linear = LinearBackbone(obs_dim, spec, rngs=rngs) if backbone == "linear" else None
        self.obs_proj = vn.Dense(obs_dim, spec.width, rngs=rngs) if obs_dim and backbone == "lm" else None
        self.cache_room = cache_room
        self.head = get_head(head_name, action_dim=action_dim, horizon=horizon, context=spec,
                             **(head_kwargs or {}), rngs=rngs)

    def context(self, prompt: jax.Array, obs: jax.Array | None = None) -> vn.HeadContext:
        if self.linear is not None:
            return self.linear.context(obs)
        b, n = prompt.shape
        embeds = None if self.obs_proj is None else self.obs_proj(obs)[:, None]
        mask = jnp.ones((b, n + (0 if embeds is None else 1)), bool)
        return self.lm.prefix(prompt, mask, cache_size=mask.shape[1] + self.cache_room, embeds=embeds)

    def loss(self, prompt, actions, key, obs=None, action_mask=None):
        return self.head.loss(self.context(prompt, obs), actions, action_mask=action_mask, rngs=key, lm=self.lm)

    def sample(self, prompt, key, obs=None):
        return self.head.sample(self.context(prompt, obs), rngs=key, lm=self.lm)


def build(factory):
    """``factory()`` (an ``nnx.Module``) built inside one fast-compiled ``jit``: initialising parameters op by op
    outside ``jit`` costs seconds per module on CPU, as every small initializer op compiles on its own."""
    graphdef, _ = nnx.split(nnx.eval_shape(factory))
    state = jax.jit(lambda: nnx.split(factory())[1], compiler_options=FAST_COMPILE)()
    return nnx.merge(graphdef, state)


def train(model: nnx.Module, batch_fn, steps: int, lr: float = 3e-3, seed: int = 0):
    """Adam on ``model.loss(*batch)`` with a jitted pure step; returns the trained model and the last loss."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))  # a decayed rate settles noisy fits
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = opt.init(params)

    @functools.partial(jax.jit, compiler_options=OPTIMISED)  # hundreds of steps: optimised code pays
    def step(params, opt_state, key):
        k_batch, k_loss = jax.random.split(key)

        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            return m.loss(*batch_fn(k_batch), k_loss)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(seed)
    loss = None
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
    return nnx.merge(graphdef, params, rest), float(loss)


def sampler(model: nnx.Module):
    """Jitted ``sample(prompt, key, obs)`` over the split model."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, prompt, key, obs):
        return nnx.merge(graphdef, state).sample(prompt, key, obs)

    return lambda prompt, key, obs=None: run(state, prompt, key, obs)


def near_mode_fractions(samples: np.ndarray, c: float, tol: float) -> tuple[float, float]:
    """Fractions of chunks whose mean |x - mode| is below ``tol`` for the +c and the -c mode."""
    plus = np.mean(np.abs(samples - c), axis=(1, 2)) < tol
    minus = np.mean(np.abs(samples + c), axis=(1, 2)) < tol
    return float(plus.mean()), float(minus.mean())
