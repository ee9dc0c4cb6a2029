"""DDPM noise schedules and DDPM/DDIM update steps, following diffusers' ``DDPMScheduler`` / ``DDIMScheduler``.

Schedules are numpy constants (betas in float64 where diffusers uses Python floats, then float32 like its
tensors); the step functions are pure ``jnp`` and trace inside ``jit``/``fori_loop`` with traced timesteps.
Formulas, their order of operations, variance clamping, the ``prev_timestep`` arithmetic, ``clip_sample``,
``set_alpha_to_one``, ``steps_offset`` and ``timestep_spacing`` mirror diffusers 0.42 so that results agree to
float32 rounding (tested against it).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SPACINGS = ("leading", "trailing", "linspace")


def linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """``n`` float32 points from ``start`` to ``end``, rounded as torch's CPU ``linspace`` rounds them.

    torch computes ``step = (end - start) / (n - 1)`` in float32, then each point with one fused multiply-add from
    the nearer end; the float64 products below are exact, so the single rounding to float32 is reproduced.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    low = np.float64(start32) + np.float64(step) * i
    high = np.float64(end32) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, low, high).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A beta schedule over ``num_train_timesteps`` steps.

    ``name``: ``"linear"`` / ``"scaled_linear"`` (``beta_start`` .. ``beta_end``), ``"squaredcos_cap_v2"``
    (diffusers' Glide cosine, betas capped at 0.999) or ``"cosine"`` (Octo's cosine schedule with offset
    ``cosine_s``, betas clipped to [0, 0.999]; equal to ``squaredcos_cap_v2`` for ``s = 0.008`` up to rounding).
    """

    name: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.name!r}; known: {list(SCHEDULES)}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """``[T]`` float32."""
        n = self.num_train_timesteps
        if self.name == "linear":
            return linspace_float32(self.beta_start, self.beta_end, n)
        if self.name == "scaled_linear":
            return linspace_float32(self.beta_start ** 0.5, self.beta_end ** 0.5, n) ** 2
        if self.name == "squaredcos_cap_v2":
            abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            return np.asarray([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], np.float32)
        s = self.cosine_s
        t = np.linspace(0, n, n + 1, dtype=np.float64) / n
        abar = np.cos((t + s) / (1 + s) * np.pi * 0.5) ** 2
        abar = abar / abar[0]
        return np.clip(1 - abar[1:] / abar[:-1], 0, 0.999).astype(np.float32)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """``[T]`` float32 running product of ``1 - beta`` (accumulated in float64 like torch's CPU cumprod)."""
        alphas = (np.float32(1.0) - self.betas).astype(np.float32)
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def inference_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                        steps_offset: int = 0) -> np.ndarray:
    """Descending int timesteps ``[num_steps]`` visited at sampling time (diffusers' ``set_timesteps``)."""
    t_max = num_train_timesteps
    if num_steps > t_max:
        raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={t_max}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if spacing == "linspace":
        return np.linspace(0, t_max - 1, num_steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = t_max // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = t_max / num_steps
        return np.round(np.arange(t_max, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; known: {list(SPACINGS)}")


def ddpm_previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """DDPM's previous timestep of each entry: the next one in the list, -1 after the last."""
    return np.concatenate([timesteps[1:], [-1]]).astype(np.int64)


def ddim_previous_timesteps(timesteps: np.ndarray, num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """DDIM's previous timestep: ``t - num_train_timesteps // num_steps`` (arithmetic, whatever the spacing)."""
    return (timesteps - num_train_timesteps // num_steps).astype(np.int64)


def _expand(value: jax.Array, like: jax.Array) -> jax.Array:
    """Scalar stays scalar; a per-example ``[B]`` value broadcasts over the trailing axes of ``like``."""
    value = jnp.asarray(value)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim)) if value.ndim else value


def _gather(table: np.ndarray, t: jax.Array) -> jax.Array:
    return jnp.asarray(table)[jnp.maximum(jnp.asarray(t), 0)]


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (``t`` scalar or ``[B]``)."""
    abar = _expand(_gather(schedule.alphas_cumprod, t), x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                    prediction_type: str) -> jax.Array:
    """What the denoiser regresses: the noise, the clean sample, or the velocity ``sqrt(abar) n - sqrt(1-abar) x0``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        abar = _expand(_gather(schedule.alphas_cumprod, t), x0)
        return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {list(PREDICTION_TYPES)}")


def _predict_x0(model_output, sample, alpha_prod_t, beta_prod_t, prediction_type):
    if prediction_type == "epsilon":
        return (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return jnp.sqrt(alpha_prod_t) * sample - jnp.sqrt(beta_prod_t) * model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {list(PREDICTION_TYPES)}")


def ddpm_step(schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array, prev_t: jax.Array, sample: jax.Array,
              noise: jax.Array | None, *, prediction_type: str = "epsilon", variance_type: str = "fixed_small",
              clip_sample: bool = True, clip_sample_range: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """One reverse DDPM step ``x_t -> x_prev``; returns ``(prev_sample, pred_original_sample)``.

    ``noise`` (standard normal, shaped like ``sample``) is added with the chosen variance when ``t > 0``;
    ``prev_t < 0`` means the chain ends (``abar_prev = 1``).
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance_type {variance_type!r}; known: {list(VARIANCE_TYPES)}")
    acp = schedule.alphas_cumprod
    alpha_prod_t = _expand(_gather(acp, t), sample)
    alpha_prod_t_prev = _expand(jnp.where(jnp.asarray(prev_t) >= 0, _gather(acp, prev_t), jnp.float32(1.0)), sample)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    x0 = _predict_x0(model_output, sample, alpha_prod_t, beta_prod_t, prediction_type)
    if clip_sample:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    x0_coeff = (jnp.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
    sample_coeff = jnp.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
    prev = x0_coeff * x0 + sample_coeff * sample
    if noise is not None:
        if variance_type == "fixed_small":
            variance = jnp.maximum((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20)
        else:
            variance = current_beta_t
        prev = prev + jnp.where(_expand(jnp.asarray(t) > 0, sample), jnp.sqrt(variance) * noise, 0.0)
    return prev, x0


def ddpm_sample_space_step(schedule: NoiseSchedule, eps: jax.Array, t: jax.Array, sample: jax.Array,
                           noise: jax.Array | None, *, clip_range: float | None = None
                           ) -> tuple[jax.Array, jax.Array]:
    """Octo's reverse step, written on ``x_t`` itself rather than through the predicted clean sample.

    ``x = (x_t - (1 - alpha_t) / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)``, plus ``sqrt(beta_t) * noise`` when
    ``t > 0``; then ``x`` (not the clean-sample estimate) is clipped to ``+-clip_range``. Returns
    ``(x_prev, x_prev before clipping)``. Same mean and variance as ``fixed_large`` DDPM, but no division by
    ``sqrt(abar_t)``, which makes the first steps of the cosine schedule (``abar`` ~ 1e-3) exact in float32.
    """
    betas = np.asarray(schedule.betas, np.float32)
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alpha = _expand(_gather(alphas, t), sample)
    abar = _expand(_gather(schedule.alphas_cumprod, t), sample)
    beta = _expand(_gather(betas, t), sample)
    x = (1 / jnp.sqrt(alpha)) * (sample - (1 - alpha) / jnp.sqrt(1 - abar) * eps)
    if noise is not None:
        x = x + _expand(jnp.asarray(t) > 0, sample) * (jnp.sqrt(beta) * noise)
    clipped = x if clip_range is None else jnp.clip(x, -clip_range, clip_range)
    return clipped, x


def ddim_step(schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array, prev_t: jax.Array, sample: jax.Array,
              noise: jax.Array | None = None, *, eta: float = 0.0, prediction_type: str = "epsilon",
              clip_sample: bool = True, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
              use_clipped_model_output: bool = False) -> tuple[jax.Array, jax.Array]:
    """One DDIM step ``x_t -> x_prev`` (``eta = 0``: deterministic); returns ``(prev_sample, pred_original_sample)``."""
    acp = schedule.alphas_cumprod
    final = jnp.float32(1.0) if set_alpha_to_one else jnp.float32(acp[0])
    alpha_prod_t = _expand(_gather(acp, t), sample)
    alpha_prod_t_prev = _expand(jnp.where(jnp.asarray(prev_t) >= 0, _gather(acp, prev_t), final), sample)
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        x0 = (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
        eps = model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - jnp.sqrt(alpha_prod_t) * x0) / jnp.sqrt(beta_prod_t)
    elif prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_prod_t) * sample - jnp.sqrt(beta_prod_t) * model_output
        eps = jnp.sqrt(alpha_prod_t) * model_output + jnp.sqrt(beta_prod_t) * sample
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {list(PREDICTION_TYPES)}")
    if clip_sample:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * jnp.sqrt(variance)
    if use_clipped_model_output:
        eps = (sample - jnp.sqrt(alpha_prod_t) * x0) / jnp.sqrt(beta_prod_t)
    direction = jnp.sqrt(1 - alpha_prod_t_prev - std ** 2) * eps
    prev = jnp.sqrt(alpha_prod_t_prev) * x0 + direction
    if eta > 0:
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs noise")
        prev = prev + std * noise
    return prev, x0
