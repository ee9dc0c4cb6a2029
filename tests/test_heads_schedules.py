"""Noise schedules and DDPM/DDIM steps (vlax.nn.noise_schedules) against diffusers' DDPMScheduler/DDIMScheduler on
the same inputs, Octo's cosine schedule and DDPM update against their published formulas, and the flow head's
Beta-distributed times against the Beta CDF.

Tolerance: max-abs <= 1e-6 everywhere (float32 arithmetic on values of order 1; in practice most agree exactly).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from vlax.heads.flow import sample_beta
from vlax.nn import noise_schedules as ns

TOL = 1e-6
SCHEDULES = ["squaredcos_cap_v2", "linear"]
SHAPE = (3, 4, 2)  # a batch of [H, A] chunks


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    model_output = torch.randn(SHAPE, generator=g)
    sample = 1.5 * torch.randn(SHAPE, generator=g)  # wide enough that clip_sample clips some predicted x0
    return model_output, sample


def _noise_drawn_by_diffusers(seed: int) -> torch.Tensor:
    """The variance noise ``DDPMScheduler.step`` draws from ``torch.Generator().manual_seed(seed)`` (CPU randn)."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@pytest.mark.parametrize("name", SCHEDULES + ["scaled_linear"])
@pytest.mark.parametrize("num_train_timesteps", [100, 1000])
def test_betas_and_alphas_cumprod_match_diffusers(name, num_train_timesteps):
    ref = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=name)
    ours = ns.NoiseSchedule(name, num_train_timesteps)
    assert ours.betas.dtype == np.float32 and ours.betas.shape == (num_train_timesteps,)
    assert _max_abs(ours.betas, ref.betas.numpy()) <= TOL
    assert _max_abs(ours.alphas_cumprod, ref.alphas_cumprod.numpy()) <= TOL


@pytest.mark.parametrize("spacing", list(ns.SPACINGS))
@pytest.mark.parametrize("steps,offset", [(10, 0), (7, 1), (100, 0)])
def test_inference_timesteps_match_diffusers(spacing, steps, offset):
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(num_train_timesteps=100, timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(ns.inference_timesteps(100, steps, spacing, offset), ref.timesteps.numpy())


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("variance_type", list(ns.VARIANCE_TYPES))
@pytest.mark.parametrize("prediction_type", list(ns.PREDICTION_TYPES))
def test_ddpm_step_matches_diffusers(name, variance_type, prediction_type):
    ref = DDPMScheduler(num_train_timesteps=100, beta_schedule=name, variance_type=variance_type,
                        prediction_type=prediction_type, clip_sample=True)
    ref.set_timesteps(10)  # strided chain: prev_t is the next listed timestep, not t - 1
    schedule = ns.NoiseSchedule(name, 100)
    timesteps = ns.inference_timesteps(100, 10)
    previous = ns.ddpm_previous_timesteps(timesteps)
    for i in (0, 4, 9):  # first, middle, last (t = 0: no noise, abar_prev = 1)
        t = int(timesteps[i])
        model_output, sample = _inputs(seed=i)
        want = ref.step(model_output, t, sample, generator=torch.Generator().manual_seed(100 + i))
        args = (schedule, jnp.asarray(model_output.numpy()), t, int(previous[i]), jnp.asarray(sample.numpy()))
        kwargs = dict(prediction_type=prediction_type, variance_type=variance_type)
        got_prev, got_x0 = ns.ddpm_step(*args, jnp.asarray(_noise_drawn_by_diffusers(100 + i)), **kwargs)
        assert _max_abs(got_x0, want.pred_original_sample.numpy()) <= TOL, (t, "x0")
        assert _max_abs(got_prev, want.prev_sample.numpy()) <= TOL, (t, "prev_sample")
        mean_only, _ = ns.ddpm_step(*args, None, **kwargs)
        assert (t == 0) == (_max_abs(mean_only, want.prev_sample.numpy()) <= TOL)  # noise enters iff t > 0


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("eta,set_alpha_to_one,prediction_type",
                         [(0.0, True, "epsilon"), (0.0, False, "v_prediction"), (1.0, True, "epsilon"),
                          (0.5, False, "sample")])
def test_ddim_step_matches_diffusers(name, eta, set_alpha_to_one, prediction_type):
    ref = DDIMScheduler(num_train_timesteps=100, beta_schedule=name, prediction_type=prediction_type,
                        set_alpha_to_one=set_alpha_to_one, clip_sample=True)
    ref.set_timesteps(10)
    schedule = ns.NoiseSchedule(name, 100)
    timesteps = ns.inference_timesteps(100, 10)
    previous = ns.ddim_previous_timesteps(timesteps, 100, 10)
    for i in (0, 5, 9):
        t = int(timesteps[i])
        model_output, sample = _inputs(seed=20 + i)
        noise = _noise_drawn_by_diffusers(200 + i)
        want = ref.step(model_output, t, sample, eta=eta, variance_noise=noise if eta > 0 else None)
        got_prev, got_x0 = ns.ddim_step(schedule, jnp.asarray(model_output.numpy()), t, int(previous[i]),
                                        jnp.asarray(sample.numpy()), jnp.asarray(noise.numpy()), eta=eta,
                                        prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
        assert _max_abs(got_x0, want.pred_original_sample.numpy()) <= TOL, (t, "x0")
        assert _max_abs(got_prev, want.prev_sample.numpy()) <= TOL, (t, "prev_sample")


@pytest.mark.parametrize("name", SCHEDULES)
def test_forward_process_and_velocity_target_match_diffusers(name):
    ref = DDPMScheduler(num_train_timesteps=100, beta_schedule=name)
    x0, noise = _inputs(seed=3)
    t = torch.tensor([0, 37, 99])
    schedule = ns.NoiseSchedule(name, 100)
    x0j, noisej, tj = jnp.asarray(x0.numpy()), jnp.asarray(noise.numpy()), jnp.asarray(t.numpy())
    assert _max_abs(ns.add_noise(schedule, x0j, noisej, tj), ref.add_noise(x0, noise, t).numpy()) <= TOL
    velocity = ns.training_target(schedule, x0j, noisej, tj, "v_prediction")
    assert _max_abs(velocity, ref.get_velocity(x0, noise, t).numpy()) <= TOL


def _octo_cosine_betas(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Octo's published cosine schedule (Nichol & Dhariwal), written out in float64:
    ``abar(t) = cos((t/T + s) / (1 + s) * pi/2)^2 / abar(0)``, ``beta_t = clip(1 - abar(t+1) / abar(t), 0, 0.999)``."""
    abar = [math.cos((i / timesteps + s) / (1 + s) * math.pi / 2) ** 2 for i in range(timesteps + 1)]
    abar = [a / abar[0] for a in abar]
    return np.asarray([min(max(1 - abar[i + 1] / abar[i], 0.0), 0.999) for i in range(timesteps)])


@pytest.mark.parametrize("num_train_timesteps", [20, 100])
def test_octo_cosine_schedule_matches_its_formula(num_train_timesteps):
    ours = ns.NoiseSchedule("cosine", num_train_timesteps)
    want = _octo_cosine_betas(num_train_timesteps)
    assert _max_abs(ours.betas, want) <= TOL
    assert _max_abs(ours.alphas_cumprod, np.cumprod(1 - want)) <= TOL
    assert want[-1] == 0.999  # the last beta hits the cap: the clip is exercised
    # Normalising by abar(0) cancels in the ratios: the same betas as diffusers' squaredcos_cap_v2.
    assert _max_abs(ours.betas, ns.NoiseSchedule("squaredcos_cap_v2", num_train_timesteps).betas) <= TOL


def test_ddpm_fixed_large_step_is_octos_update():
    """Octo samples with ``x <- (x - (1 - a_t) / sqrt(1 - abar_t) * eps) / sqrt(a_t) + sqrt(beta_t) z`` over every
    timestep: the diffusers-form step with ``fixed_large`` variance and no x0 clipping is the same update."""
    schedule = ns.NoiseSchedule("cosine", 20)
    betas = _octo_cosine_betas(20)
    alphas, abar = 1 - betas, np.cumprod(1 - betas)
    eps, x = (np.asarray(a.numpy(), np.float64) for a in _inputs(seed=5))
    z = np.asarray(_noise_drawn_by_diffusers(6).numpy(), np.float64)
    for t in (19, 10, 1, 0):
        want = (x - (1 - alphas[t]) / np.sqrt(1 - abar[t]) * eps) / np.sqrt(alphas[t]) + (t > 0) * np.sqrt(
            betas[t]) * z
        got, _ = ns.ddpm_step(schedule, jnp.asarray(eps, jnp.float32), t, t - 1, jnp.asarray(x, jnp.float32),
                              jnp.asarray(z, jnp.float32), variance_type="fixed_large", clip_sample=False)
        assert _max_abs(got, want) <= 1e-5 * max(1.0, float(np.abs(want).max())), t  # float32 vs float64 reference


@pytest.mark.parametrize("a,b", [(1.5, 1.0), (1.0, 2.0), (2.0, 3.0)])
def test_flow_time_draws_follow_the_beta_distribution(a, b):
    """π0 draws flow times from Beta(1.5, 1); the inverse-CDF shortcut must give that distribution (KS distance of
    100k draws against the exact CDF, below 0.006: just above the 99 % critical value 1.63 / sqrt(n) = 0.0052)."""
    from scipy.stats import beta as beta_dist

    draws = np.sort(np.asarray(sample_beta(jax.random.key(0), a, b, (100_000,)), np.float64))
    empirical = np.arange(1, draws.size + 1) / draws.size
    assert draws.min() >= 0.0 and draws.max() <= 1.0
    assert np.max(np.abs(empirical - beta_dist.cdf(draws, a, b))) < 0.006
