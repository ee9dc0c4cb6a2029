"""Real-time chunking in the flow and diffusion heads: off is the old sampling bit for bit; on, the chunk's first
actions inpaint the actions still to execute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vlax.nn as vn
from vlax.heads import get_head
from vlax.nn import noise_schedules as ns
from vlax.serve.rtc import check_schedule, guide_from_remaining, soft_mask

SPEC = vn.ContextSpec(width=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, vocab_size=64)
H, A, B = 8, 3, 2


def _context(seed: int = 0) -> vn.HeadContext:
    rs = np.random.RandomState(seed)
    n = 5
    tokens = jnp.asarray(rs.normal(size=(B, n, SPEC.width)), jnp.float32)
    k, v = (jnp.asarray(rs.normal(size=(SPEC.num_layers, B, n, SPEC.num_kv_heads, SPEC.head_dim)), jnp.float32)
            for _ in range(2))
    mask = jnp.ones((B, n), bool)
    return vn.HeadContext(tokens=tokens, mask=mask, cache=vn.KVCache.from_prefix(k, v, mask))


def _head(name: str):
    kwargs = {"flow": dict(width=8, mlp_dim=16),
              "diffusion": dict(denoiser_kwargs=dict(hidden_dim=16, num_blocks=1)),
              "diffusion_ddim": dict(sampler="ddim", denoiser_kwargs=dict(hidden_dim=16, num_blocks=1))}[name]
    return get_head(name.split("_")[0], action_dim=A, horizon=H, context=SPEC, rngs=nnx.Rngs(0), **kwargs)


@nnx.jit
def _sample(head, ctx, key):
    return head.sample(ctx, rngs=key)


@nnx.jit
def _sample_guided(head, ctx, key, target, weights):
    return head.sample(ctx, rngs=key, guide_actions=target, guide_weights=weights)


@nnx.jit
def _flow_reference(head, ctx, key):
    """The flow head's Euler loop as it was before real-time chunking existed."""
    prefix = head.expert.prepare(ctx.cache)
    noise = jax.random.normal(vn.head_base.split_rngs(key)[0], (ctx.batch_size, H, A), ctx.tokens.dtype)
    steps, dt = head.num_steps, -1.0 / head.num_steps

    def step(i, x):
        t = jnp.full((x.shape[0],), 1.0 + i * dt, jnp.float32)
        return x + dt * head.velocity(prefix, None, x, t).astype(x.dtype)

    return jax.lax.fori_loop(0, steps, step, noise)


@nnx.jit
def _diffusion_reference(head, ctx, key):
    """The diffusion head's DDPM loop as it was before real-time chunking existed."""
    big_t = head.schedule.num_train_timesteps
    timesteps = ns.inference_timesteps(big_t, head.num_steps, head.spacing, head.steps_offset)
    previous = ns.ddpm_previous_timesteps(timesteps)
    cond = head.condition(ctx)
    init_key, loop_key = jax.random.split(vn.head_base.split_rngs(key)[0])
    x = jax.random.normal(init_key, (ctx.batch_size, H, A), ctx.tokens.dtype)
    ts, prevs = jnp.asarray(timesteps, jnp.int32), jnp.asarray(previous, jnp.int32)

    def step(i, x):
        t, prev = ts[i], prevs[i]
        out = head.denoiser(x, jnp.full((x.shape[0],), t), cond, train=False)
        noise = jax.random.normal(jax.random.fold_in(loop_key, i), x.shape, x.dtype)
        new, _ = ns.ddpm_step(head.schedule, out, t, prev, x, noise, variance_type=head.variance_type,
                              prediction_type=head.prediction_type, clip_sample=head.clip_sample,
                              clip_sample_range=head.clip_sample_range)
        return new.astype(x.dtype)

    return jax.lax.fori_loop(0, head.num_steps, step, x)


@pytest.mark.parametrize("name,reference", [("flow", _flow_reference), ("diffusion", _diffusion_reference)])
def test_rtc_off_is_the_old_sampling_bit_for_bit(name, reference):
    head, ctx, key = _head(name), _context(), jax.random.key(7)
    np.testing.assert_array_equal(np.asarray(_sample(head, ctx, key)), np.asarray(reference(head, ctx, key)))


@pytest.mark.parametrize("name", ["flow", "diffusion", "diffusion_ddim"])
def test_guided_chunk_starts_with_the_actions_still_to_execute(name):
    head, ctx = _head(name), _context(1)
    delay, execute = 2, 4
    rs = np.random.RandomState(3)
    previous = np.clip(rs.normal(0, 0.5, (B, H, A)), -0.9, 0.9).astype(np.float32)  # the chunk executing now
    remaining = previous[:, execute:]  # not yet executed when the new observation is taken
    target, weights = zip(*(guide_from_remaining(r, H, delay) for r in remaining))
    target, weights = np.stack(target), np.stack(weights)
    frozen = slice(0, delay)
    guided_err, free_err = [], []
    for seed in range(3):
        key = jax.random.key(seed)
        guided = np.asarray(_sample_guided(head, ctx, key, target, weights))
        free = np.asarray(_sample(head, ctx, key))
        guided_err.append(np.abs(guided[:, frozen] - target[:, frozen]).mean())
        free_err.append(np.abs(free[:, frozen] - target[:, frozen]).mean())
        assert np.isfinite(guided).all()
    assert np.mean(guided_err) < 0.25 * np.mean(free_err), (guided_err, free_err)


def test_soft_mask_freezes_the_delay_decays_over_the_overlap_and_frees_the_rest():
    w = soft_mask(10, 2, 4)
    np.testing.assert_array_equal(w[:2], 1.0)
    np.testing.assert_array_equal(w[6:], 0.0)
    assert np.all(np.diff(w[1:7]) < 0) and 0 < w[5] < w[2] < 1
    np.testing.assert_allclose(soft_mask(8, 0, 8), 0.0)  # nothing overlaps: unguided
    for bad in [(8, 5, 4), (8, 3, 2), (8, 2, 0)]:
        with pytest.raises(ValueError, match="delay <= execute_steps <= horizon - delay"):
            check_schedule(*bad)
    with pytest.raises(ValueError, match="remaining actions have shape"):
        guide_from_remaining(np.zeros((8, 3)), 8, 2)
