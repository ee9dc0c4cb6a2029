"""The published families that are rows of the Meta-World head ablation (``experiments/ablate_heads.py``
PRESET_ROWS): each row's overrides make a valid Meta-World config whose policy trains and samples on the
Meta-World observation (one 64 px corner camera, 4-dim state, chunk 8 of 4-dim actions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.preset_rows import PRESET_ROWS
from experiments.configs import metaworld
from train_helpers import apply_preset_row
from vlax.build import build_policy, check_components, policy_spec


def _row_config(row: str):
    return apply_preset_row(metaworld.get_config("tiny"), row)


@pytest.mark.parametrize("row", sorted(PRESET_ROWS))
def test_ablation_row_builds_trains_and_samples_on_the_metaworld_observation(row):
    config = _row_config(row)
    check_components(config.model)
    # The row's wiring at narrower ResNets than the ablation trains (the ablation itself keeps ResNet-18 widths).
    config.model.act.backbone_widths = (16, 16, 32, 32)
    config.model.diffusion_policy.encoder.resnet.widths = (16, 16, 32, 32)  # GroupNorm: multiples of 16
    spec = policy_spec(config, state_dim=4, action_dim=4)
    policy = build_policy(config.model, spec, 32, nnx.Rngs(0))
    b, size = 2, spec.image_size
    rng = np.random.default_rng(0)
    obs = {"images": {c: jnp.asarray(rng.integers(0, 256, (b, size, size, 3), np.uint8)) for c in spec.cameras},
           "state": jnp.asarray(rng.normal(size=(b, 4)), jnp.float32),
           "text_ids": jnp.ones((b, spec.max_text_len), jnp.int32),
           "text_mask": jnp.ones((b, spec.max_text_len), bool)}
    actions = jnp.asarray(rng.uniform(-1, 1, (b, spec.horizon, 4)), jnp.float32)

    @nnx.jit
    def loss_and_sample(policy, obs, actions):  # the trainer's and the runner's calls, compiled once
        loss, _ = policy.loss(obs, actions, rngs=jax.random.key(1), train=True)
        return loss, policy.sample(obs, rngs=jax.random.key(2))

    loss, sampled = loss_and_sample(policy, obs, actions)
    assert np.isfinite(float(loss))
    assert sampled.shape == (b, spec.horizon, 4) and bool(jnp.all(jnp.isfinite(sampled)))
