"""Learning behaviour of every head on a small toy problem (each head trains once, inside a plain NNX module).

One mixed task per head: the context carries ``(z1, z2, flag)``. With ``flag = 0`` the target chunk is a fixed
pattern scaled by ``z`` (unimodal, conditional): every head must reach a low error. With ``flag = 1`` and ``z = 0``
(one and the same context) the target is ``+c`` or ``-c`` everywhere with equal probability (bimodal): flow and
diffusion samples must cover both modes, while the L1 chunk head, which regresses one answer per context, lands
between them — the reason the generative heads exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_heads_support import HeadPolicy, build, near_mode_fractions, sampler, train

H, A, B, C = 4, 2, 32, 0.8
PROMPT = jnp.ones((B, 3), jnp.int32)
PATTERN = jnp.asarray(np.linspace(1.0, 0.4, H), jnp.float32)[:, None] * jnp.asarray([1.0, -1.0])

# Tiny sizes, training steps enough for each family on this task (seconds on CPU), and a learning rate if not 3e-3.
SETUPS = {
    "binned": (dict(num_heads=2), 400),
    "binned_lm": ({}, 800, 1e-2),
    "chunk": (dict(width=32, num_heads=4, mlp_dim=64, dropout=0.0), 250),
    "chunk_cvae": (dict(width=32, num_heads=4, mlp_dim=64, encoder_depth=1, dropout=0.0), 250),
    "flow": (dict(width=32), 1500),
    "flow_pi05": (dict(width=32), 800),
    "flow_smolvla": (dict(mlp_dim=64), 800),
    "diffusion": (dict(denoiser_kwargs=dict(hidden_dim=64, num_blocks=2)), 1500),
    "diffusion_unet": (dict(num_train_timesteps=20,
                            denoiser_kwargs=dict(down_dims=(32, 64), step_embed_dim=16, n_groups=4)), 400),
}


def mixed_batch(key):
    """Half the rows unimodal (random ``z``), half bimodal with exactly as many ``+c`` as ``-c`` targets."""
    kz, ks = jax.random.split(key)
    bimodal = jnp.arange(B) >= B // 2
    z = jnp.where(bimodal[:, None], 0.0, jax.random.uniform(kz, (B, A), minval=-1, maxval=1))
    half = jax.random.permutation(ks, B // 2) % 2  # as many zeros as ones
    signs = jnp.where(jnp.concatenate([half, half]) == 0, C, -C)[:, None, None]
    target = jnp.where(bimodal[:, None, None], jnp.broadcast_to(signs, (B, H, A)), C * z[:, None, :] * PATTERN[None])
    obs = jnp.concatenate([z, bimodal[:, None].astype(jnp.float32)], axis=-1)
    return PROMPT, target, obs


class Task(nnx.Module):
    def __init__(self, policy: HeadPolicy):
        self.policy = policy

    def loss(self, prompt, actions, obs, key):
        return self.policy.loss(prompt, actions, key, obs=obs)


_TRAINED: dict[str, tuple] = {}


def trained(name: str):
    """Train ``name`` once per session; returns ``(sample_fn, final_loss)``."""
    if name not in _TRAINED:
        kwargs, steps, *lr = SETUPS[name]
        backbone = "lm" if name == "binned_lm" else "linear"
        policy = build(lambda: HeadPolicy(name, action_dim=A, horizon=H, obs_dim=A + 1, head_kwargs=kwargs,
                                          backbone=backbone, rngs=nnx.Rngs(0)))
        task, loss = train(Task(policy), mixed_batch, steps, *lr)
        _TRAINED[name] = (sampler(task.policy), loss)
    return _TRAINED[name]


@pytest.mark.parametrize("name", list(SETUPS))
def test_every_head_learns_a_unimodal_conditional_target(name):
    sample, _ = trained(name)
    z = jax.random.uniform(jax.random.key(7), (B, A), minval=-1, maxval=1)
    pred = sample(PROMPT, jax.random.key(5), jnp.concatenate([z, jnp.zeros((B, 1))], -1))
    err = float(jnp.mean(jnp.abs(pred - C * z[:, None, :] * PATTERN[None])))
    # Predicting the mean chunk (zero) would score C * E|z| * mean|pattern| = 0.28.
    assert err < 0.1, f"{name}: mean |error| {err:.3f} on the unimodal target"


def _bimodal_samples(name: str) -> np.ndarray:
    sample, _ = trained(name)
    obs = jnp.tile(jnp.asarray([[0.0, 0.0, 1.0]]), (B, 1))
    return np.concatenate([np.asarray(sample(PROMPT, jax.random.key(100 + i), obs)) for i in range(8)])


@pytest.mark.parametrize("name", ["flow", "diffusion"])
def test_generative_heads_cover_both_modes(name):
    samples = _bimodal_samples(name)
    plus, minus = near_mode_fractions(samples, C, tol=0.25 * C)
    assert plus >= 0.3 and minus >= 0.3, f"{name}: {plus:.0%} near +c, {minus:.0%} near -c"


def test_l1_chunk_head_collapses_between_the_modes():
    samples = _bimodal_samples("chunk")
    plus, minus = near_mode_fractions(samples, C, tol=0.25 * C)
    assert plus == 0.0 and minus == 0.0, f"chunk head reached a mode: {plus:.0%} / {minus:.0%}"
    assert np.abs(samples.mean(axis=(1, 2))).max() < 0.5 * C  # one answer between -c and +c
