"""optax optimizer from config: AdamW, warmup + cosine, global-norm clipping, freezing and per-group learning
rates chosen by regex over parameter paths, gradient accumulation, and an EMA of the weights."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """``groups`` are ``(regex, lr_multiplier)`` pairs tried in order; the first match wins.

    ``freeze`` is a regex of paths that never change (no update and no optimizer state). Paths look like
    ``"backbone/layers/self_attn/q_proj/kernel"``.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 10_000
    end_learning_rate_ratio: float = 0.0
    weight_decay: float = 1e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float | None = 1.0
    accumulate_steps: int = 1
    freeze: str | None = None
    groups: Sequence[tuple[str, float]] = ()


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=max(cfg.warmup_steps, 1),
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.end_learning_rate_ratio)


def _labels(params: Any, cfg: OptimizerConfig) -> Any:
    freeze = re.compile(cfg.freeze) if cfg.freeze else None
    groups = [(re.compile(p), i) for i, (p, _) in enumerate(cfg.groups)]

    def label(path, _):
        name = path_str(path)
        if freeze is not None and freeze.search(name):
            return "frozen"
        for pattern, i in groups:
            if pattern.search(name):
                return f"group{i}"
        return "default"

    return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params: Any) -> Any:
    # Weight decay on matrices only: norms, biases and scalars are left alone (standard AdamW practice).
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    """The full transformation for a params pytree (used only for its paths and shapes)."""
    if cfg.accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {cfg.accumulate_steps}")
    base = schedule(cfg)

    def adamw(multiplier: float) -> optax.GradientTransformation:
        lr = lambda step: base(step) * multiplier  # noqa: E731
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=_decay_mask)

    transforms = {"default": adamw(1.0), "frozen": optax.set_to_zero()}
    for i, (_, multiplier) in enumerate(cfg.groups):
        transforms[f"group{i}"] = adamw(multiplier)
    labels = _labels(params, cfg)
    used = set(jax.tree.leaves(labels))
    tx = optax.multi_transform({k: v for k, v in transforms.items() if k in used}, labels)
    if cfg.grad_clip_norm is not None:
        # Clip on the trainable gradients only: frozen ones are zeroed first so they do not count.
        zero_frozen = optax.masked(optax.set_to_zero(), jax.tree.map(lambda lab: lab == "frozen", labels))
        tx = optax.chain(zero_frozen, optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    if cfg.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps)
    return tx


def frozen_paths(params: Any, cfg: OptimizerConfig) -> list[str]:
    """Paths the config freezes (printed at start so a wrong regex is visible)."""
    flat = jax.tree_util.tree_flatten_with_path(_labels(params, cfg))[0]
    return [path_str(p) for p, lab in flat if lab == "frozen"]


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf."""
    return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)

