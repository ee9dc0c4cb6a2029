"""Octo (Octo Model Team, 2024) as a preset: a block-causal transformer over a window of observations, trained
from scratch, with its diffusion head reading learned readout tokens.

Composition::

    task:   language embeddings [B, L, E] (precomputed, or a frozen T5 encoder over text_ids) -> Dense -> + pos
    obs:    per camera, observation and goal image stacked to 6 channels -> SmallStem16 -> Dense -> + pos[t]
            proprio (optional): one token per state dimension, Dense(1 -> D) -> + pos[t]
            repeat_task_tokens: the task tokens again at every timestep (an obs group "task_language")
    readouts: R learned position embeddings per timestep (zero inputs)
    sequence = [task, (obs groups, readouts) of t = 0, ... t = T - 1]   pre-norm transformer, block-causal mask
    head (model.head, default "diffusion"): the readouts of the last timestep, [B, R, D], as its context

Attention (:mod:`vlax.nn.group_mask`): the task sees the task; observation tokens see the task and observations
of their own and earlier timesteps; readouts see those and their own group, and nothing sees them. Padding hides
keys: ``timestep_pad_mask [B, T]`` (False: a padded timestep, e.g. before an episode's start),
``pad_mask {camera | "state": [B, T]}`` (a missing image), ``task_pad_mask {"language" | camera: [B]}``.

Token groups come in Octo's order: observation tokenizers sorted by name (Flax iterates a module dict sorted).

``obs``: ``images {camera: [B, T, H, W, 3]}`` uint8 (``[B, H, W, 3]`` for T = 1), ``goal_images {camera: [B, H, W,
3]}`` (zeros when absent, as Octo), ``state [B, T, P]``, ``language_embeddings [B, L, E]`` or ``text_ids`` /
``text_mask [B, L]`` (with a T5 encoder), and the pad masks above. Actions are z-scored with the dataset's mean /
std (:func:`vlax.weights.octo.action_normalization`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.encoders.small_stem import SmallStem
from vlax.encoders.t5 import T5Config, T5Encoder
from vlax.heads import get_head
from vlax.nn import ContextSpec, Dense, HeadContext, MaskedEncoder, param
from vlax.nn.group_mask import Group, group_attention_mask, group_layout_mask
from vlax.policy import PolicySpec
from vlax.presets import register

LANGUAGE_INPUTS = ("t5", "embeddings", "none")
# Octo's head hyper-parameters (its DiffusionActionHead / L1ActionHead defaults), applied unless overridden
HEAD_DEFAULTS = {
    "diffusion": dict(denoiser="mlp_resnet", schedule="cosine", num_train_timesteps=20, sampler="octo",
                      prediction_type="epsilon", clip_sample=True, clip_sample_range=5.0, pool="mean",
                      denoiser_kwargs=dict(hidden_dim=256, num_blocks=3, time_dim=32, dropout=0.0,
                                           use_layer_norm=True)),
    "l1_map": dict(pool="map", num_heads=8, max_action=5.0, loss="l1"),
}


@dataclasses.dataclass(frozen=True)
class CameraSizes:
    """One image tokenizer: ``image_size`` px square inputs, a SmallStem with ``features`` -> ``num_features``."""

    name: str
    image_size: int
    features: tuple[int, ...] = (32, 96, 192, 384)
    num_features: int = 512
    patch_size: int = 16
    goal: bool = True  # stack the goal image on the channels (6 in)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class OctoSizes:
    """Everything that shapes an :class:`OctoPolicy` (defaults: Octo-small)."""

    cameras: tuple[CameraSizes, ...]
    width: int = 384
    depth: int = 12
    mlp_dim: int = 1536
    num_heads: int = 6
    max_horizon: int = 10
    proprio_dim: int = 0
    language: str = "t5"
    language_dim: int = 768
    language_tokens: int = 16
    t5: T5Config | None = None
    num_readouts: int = 1
    repeat_task_tokens: bool = True
    use_correct_attention: bool = True

    def __post_init__(self):
        if self.language not in LANGUAGE_INPUTS:
            raise ValueError(f"model.octo.language={self.language!r}; known: {list(LANGUAGE_INPUTS)}")
        if self.language == "t5" and self.t5 is None:
            raise ValueError("model.octo.language='t5' needs model.octo.t5 (the encoder's sizes)")

    def observation_groups(self) -> list[tuple[str, int]]:
        """``(tokenizer name, tokens per timestep)`` in Octo's (sorted) order; proprio is named ``proprio``."""
        groups = {c.name: c.num_tokens for c in self.cameras}
        if self.proprio_dim:
            groups["proprio"] = self.proprio_dim
        return sorted(groups.items())


class OctoPolicy(nnx.Module):
    """The Octo policy (module docstring); keeps :class:`vlax.policy.VLA`'s contract."""

    # Live runs pass the history's timestep_pad_mask [B, T] (vlax.observation_history), as training batches do.
    reads_timestep_pad_mask = True

    def __init__(self, spec: PolicySpec, sizes: OctoSizes, *, head_name: str = "diffusion",
                 head_kwargs: Mapping[str, Any] | None = None, rngs: nnx.Rngs):
        if spec.obs_history > sizes.max_horizon:
            raise ValueError(f"obs_history={spec.obs_history} exceeds Octo's max_horizon={sizes.max_horizon}")
        if "proprio" in {c.name for c in sizes.cameras}:
            raise ValueError("a camera may not be named 'proprio' (the proprio tokenizer's name)")
        self.spec, self.sizes = spec, sizes
        d, pos = sizes.width, nnx.initializers.normal(0.02)
        self.image_tokenizers = nnx.Dict({c.name: SmallStem(num_channels=6 if c.goal else 3, features=c.features,
                                                            num_features=c.num_features, patch_size=c.patch_size,
                                                            rngs=rngs) for c in sizes.cameras})
        inputs = {c.name: c.num_features for c in sizes.cameras}
        if sizes.proprio_dim:
            inputs["proprio"] = 1
        self.obs_projections = nnx.Dict({n: Dense(inputs[n], d, axes=(None, "embed"), rngs=rngs) for n in inputs})
        self.obs_pos_embeddings = nnx.Dict({n: param(rngs, pos, (sizes.max_horizon, k, d), (None, None, "embed"))
                                            for n, k in sizes.observation_groups()})
        self.t5 = T5Encoder(sizes.t5, rngs=rngs) if sizes.language == "t5" else None
        if sizes.language != "none":
            self.language_projection = Dense(sizes.language_dim, d, axes=(None, "embed"), rngs=rngs)
            self.language_pos_embedding = param(rngs, pos, (sizes.language_tokens, d), (None, "embed"))
        else:
            self.language_projection = self.language_pos_embedding = None
        self.readout_pos_embedding = param(rngs, pos, (sizes.max_horizon, sizes.num_readouts, d),
                                           (None, None, "embed"))
        self.transformer = MaskedEncoder(d, sizes.depth, sizes.num_heads, sizes.mlp_dim, rngs=rngs)
        kwargs = {**HEAD_DEFAULTS.get(head_name, {}), **dict(head_kwargs or {})}
        self.head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon,
                             context=ContextSpec(width=d), rngs=rngs, **kwargs)
        self.backbone = None

    # ---- inputs -> token groups ---------------------------------------------------------------------------------

    def language_embeddings(self, obs: Mapping[str, Any]) -> jax.Array:
        """``[B, L, E]``: the given embeddings, or the frozen T5 encoder's output for ``text_ids``."""
        if self.t5 is None:
            if "language_embeddings" not in obs:
                raise KeyError("Octo without a T5 encoder takes obs['language_embeddings'] [B, L, E]; it has "
                               f"{sorted(obs)}")
            emb = jnp.asarray(obs["language_embeddings"], jnp.float32)
            return emb[:, None] if emb.ndim == 2 else emb
        ids = jnp.asarray(obs["text_ids"])
        emb = self.t5(ids, obs.get("text_mask"))
        return jax.lax.stop_gradient(emb)  # frozen, as Octo trains it

    def _window(self, obs: Mapping[str, Any]) -> tuple[int, int]:
        first = self.spec.cameras[0] if self.sizes.cameras else None
        x = obs["images"][first] if first in obs.get("images", {}) else None
        if x is None:
            x = jnp.asarray(obs["state"])
            return x.shape[0], (x.shape[1] if x.ndim == 3 else 1)
        return x.shape[0], (x.shape[1] if x.ndim == 5 else 1)

    def _camera_tokens(self, obs: Mapping[str, Any], cam: CameraSizes, b: int, t: int) -> jax.Array:
        images = obs.get("images", {})
        if cam.name not in images:
            raise KeyError(f"observation lacks camera {cam.name!r}; it has {sorted(images)}")
        x = jnp.asarray(images[cam.name])
        x = x[:, None] if x.ndim == 4 else x
        if x.shape[2] != cam.image_size or x.shape[3] != cam.image_size:
            raise ValueError(f"camera {cam.name!r} images are {tuple(x.shape[2:4])} px; this Octo tokenizes "
                             f"{cam.image_size} x {cam.image_size} (its position embeddings fix the token count)")
        if cam.goal:
            goal = obs.get("goal_images", {}).get(cam.name)
            goal = jnp.zeros_like(x[:, 0]) if goal is None else jnp.asarray(goal, x.dtype)
            x = jnp.concatenate([x, jnp.broadcast_to(goal[:, None], x.shape)], axis=-1)
        tokens = self.image_tokenizers[cam.name](x.reshape(b * t, *x.shape[2:]))
        return tokens.reshape(b, t, *tokens.shape[1:])

    def token_groups(self, obs: Mapping[str, Any]) -> tuple[list, list]:
        """``(prefix, timestep)`` lists of ``(Group, tokens, mask)``: prefix ``[B, n, D]`` / ``[B, n]``,
        timestep ``[B, T, n, D]`` / ``[B, T, n]``, before the transformer."""
        b, t = self._window(obs)
        d = self.sizes.width
        step_pad = jnp.asarray(obs.get("timestep_pad_mask", jnp.ones((b, t), bool)), bool)
        pads, task_pads = obs.get("pad_mask", {}), obs.get("task_pad_mask", {})
        prefix, steps = [], []
        if self.language_projection is not None:
            emb = self.language_embeddings(obs)
            if emb.shape[1] != self.sizes.language_tokens:
                raise ValueError(f"language has {emb.shape[1]} tokens; this Octo's position embedding has "
                                 f"{self.sizes.language_tokens} (pad or truncate the instruction to it)")
            tokens = self.language_projection(emb) + self.language_pos_embedding[...][None]
            flag = jnp.asarray(task_pads.get("language", jnp.ones((b,), bool)), bool)
            mask = jnp.broadcast_to(flag[:, None], tokens.shape[:2])
            prefix.append((Group("task_language", tokens.shape[1], "task"), tokens, mask))
        cameras = {c.name: c for c in self.sizes.cameras}
        for name, n in self.sizes.observation_groups():
            if name == "proprio":
                state = jnp.asarray(obs["state"], jnp.float32)
                state = jnp.broadcast_to(state[:, None], (b, t, state.shape[-1])) if state.ndim == 2 else state
                raw, present = state[..., None], jnp.ones((b, t), bool)  # Octo never masks proprio itself
            else:
                raw = self._camera_tokens(obs, cameras[name], b, t)
                present = jnp.asarray(pads.get(name, jnp.ones((b, t), bool)), bool)
            tokens = self.obs_projections[name](raw) + self.obs_pos_embeddings[name][...][None, :t]
            mask = jnp.broadcast_to((step_pad & present)[..., None], tokens.shape[:3])
            steps.append((Group(f"obs_{name}", n, "obs"), tokens, mask))
        if self.sizes.repeat_task_tokens:
            for group, tokens, mask in prefix:
                steps.append((Group("obs_" + group.name, group.num_tokens, "obs"),
                              jnp.broadcast_to(tokens[:, None], (b, t, *tokens.shape[1:])),
                              jnp.broadcast_to(mask[:, None], (b, t, mask.shape[1]))))
        readouts = jnp.broadcast_to(self.readout_pos_embedding[...][None, :t], (b, t, self.sizes.num_readouts, d))
        steps.append((Group("readout_action", self.sizes.num_readouts, "readout"), readouts,
                      jnp.ones(readouts.shape[:3], bool)))
        return prefix, steps

    def transformer_outputs(self, obs: Mapping[str, Any]) -> dict[str, tuple[jax.Array, jax.Array]]:
        """``{group: (tokens, mask)}`` after the transformer, in Octo's names (``task_language``, ``obs_<name>``,
        ``readout_action``, and the concatenations ``task`` / ``obs``)."""
        prefix, steps = self.token_groups(obs)
        b, t = steps[0][1].shape[:2]
        d = self.sizes.width
        parts = [x for _, x, _ in prefix] + [jnp.concatenate([x for _, x, _ in steps], 2).reshape(b, -1, d)]
        masks = [m for _, _, m in prefix] + [jnp.concatenate([m for _, _, m in steps], 2).reshape(b, -1)]
        layout = group_layout_mask([g for g, _, _ in prefix], [g for g, _, _ in steps], t,
                                   correct_boundaries=self.sizes.use_correct_attention)
        out = self.transformer(jnp.concatenate(parts, 1), group_attention_mask(layout, jnp.concatenate(masks, 1)))
        n_prefix = sum(g.num_tokens for g, _, _ in prefix)
        result, offset = {}, 0
        for group, _, mask in prefix:
            result[group.name] = (out[:, offset:offset + group.num_tokens], mask)
            offset += group.num_tokens
        per_step = out[:, n_prefix:].reshape(b, t, -1, d)
        offset = 0
        for group, _, mask in steps:
            result[group.name] = (per_step[:, :, offset:offset + group.num_tokens], mask)
            offset += group.num_tokens
        if prefix:
            result["task"] = tuple(jnp.concatenate([result[g.name][i] for g, _, _ in prefix], 1) for i in (0, 1))
        obs_names = [g.name for g, _, _ in steps if g.kind == "obs"]
        result["obs"] = tuple(jnp.concatenate([result[n][i] for n in obs_names], 2) for i in (0, 1))
        return result

    # ---- the policy contract --------------------------------------------------------------------------------------

    def readout_context(self, obs: Mapping[str, Any], *, all_timesteps: bool = False) -> HeadContext:
        """The readout tokens as the head's context: ``[B, R, D]`` of the last timestep, or ``[B * T, R, D]``."""
        tokens, mask = self.transformer_outputs(obs)["readout_action"]
        if all_timesteps:
            b, t = tokens.shape[:2]
            return HeadContext(tokens=tokens.reshape(b * t, *tokens.shape[2:]), mask=mask.reshape(b * t, -1))
        return HeadContext(tokens=tokens[:, -1], mask=mask[:, -1])

    def context(self, obs: Mapping[str, Any]) -> HeadContext:
        return self.readout_context(obs)

    def loss(self, obs: Mapping[str, Any], actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
        """Head loss on normalized actions: ``[B, H, A]`` (the last timestep's chunk) or ``[B, T, H, A]`` (a
        chunk per window timestep, as Octo trains; padded timesteps are masked out)."""
        actions = jnp.asarray(actions)
        if actions.ndim == 3:
            return self.head.loss(self.context(obs), actions, action_mask=action_mask, rngs=rngs, train=train)
        b, t = actions.shape[:2]
        ctx = self.readout_context(obs, all_timesteps=True)
        step_pad = jnp.asarray(obs.get("timestep_pad_mask", jnp.ones((b, t), bool)), bool)
        mask = jnp.broadcast_to(step_pad[:, :, None, None], actions.shape)
        if action_mask is not None:
            mask = mask & jnp.broadcast_to(jnp.asarray(action_mask, bool), actions.shape)
        flat = lambda x: x.reshape(b * t, *x.shape[2:])  # noqa: E731
        return self.head.loss(ctx, flat(actions), action_mask=flat(mask), rngs=rngs, train=train)

    def sample(self, obs: Mapping[str, Any], *, rngs: jax.Array | None = None, num_steps: int | None = None,
               **head_kwargs) -> jax.Array:
        """Normalized actions ``[B, H, A]`` for the last timestep of the window."""
        return self.head.sample(self.context(obs), rngs=rngs, num_steps=num_steps, **head_kwargs)


# ---- config -> sizes -------------------------------------------------------------------------------------------------

def _plain(value: Any) -> dict:
    if value is None:
        return {}
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


CAMERA_KEYS = ("image_size", "features", "num_features", "patch_size", "goal")
OCTO_KEYS = ("width", "depth", "mlp_dim", "num_heads", "max_horizon", "cameras", "stem", "proprio", "language",
             "language_dim", "t5", "num_readouts", "repeat_task_tokens", "use_correct_attention")


def sizes_from_model(model: Mapping[str, Any], spec: PolicySpec) -> OctoSizes:
    """:class:`OctoSizes` of ``model.octo`` (keys of ``experiments/configs/octo.py``) for ``spec``.

    ``cameras``: ``{camera: {image_size, features, num_features, patch_size, goal}}``; empty means every camera
    of the spec at ``spec.image_size`` with the ``stem`` settings. ``proprio``: tokenize ``spec.state_dim`` state
    dims. ``language``: ``"t5"`` (``t5``: :class:`T5Config` fields; ``spec.max_text_len`` tokens), ``"embeddings"``
    (``language_dim`` wide, ``spec.max_text_len`` tokens) or ``"none"``.
    """
    if "octo" not in model:
        raise ValueError("model.preset='octo' needs model.octo (width, depth, cameras, ...); start from "
                         "experiments/configs/octo.py")
    c = _plain(model["octo"])
    unknown = sorted(set(c) - set(OCTO_KEYS))
    if unknown:
        raise ValueError(f"unknown model.octo setting(s) {unknown}; known: {sorted(OCTO_KEYS)}")
    stem = _plain(c.get("stem"))
    given = {k: _plain(v) for k, v in _plain(c.get("cameras")).items()}
    names = list(given) or list(spec.cameras)
    cameras = []
    for name in names:
        settings = {**stem, **given.get(name, {})}
        bad = sorted(set(settings) - set(CAMERA_KEYS))
        if bad:
            raise ValueError(f"unknown model.octo camera setting(s) {bad} for {name!r}; known: {list(CAMERA_KEYS)}")
        settings.setdefault("image_size", spec.image_size)
        if "features" in settings:
            settings["features"] = tuple(int(f) for f in settings["features"])
        cameras.append(CameraSizes(name=name, **settings))
    language = str(c.get("language", "t5"))
    t5 = T5Config(**_plain(c["t5"])) if language == "t5" and c.get("t5") else None
    language_dim = t5.d_model if t5 is not None else int(c.get("language_dim", 768))
    return OctoSizes(cameras=tuple(cameras), width=int(c.get("width", 384)), depth=int(c.get("depth", 12)),
                     mlp_dim=int(c.get("mlp_dim", 1536)), num_heads=int(c.get("num_heads", 6)),
                     max_horizon=int(c.get("max_horizon", 10)),
                     proprio_dim=spec.state_dim if c.get("proprio", False) else 0, language=language,
                     language_dim=language_dim, language_tokens=spec.max_text_len, t5=t5,
                     num_readouts=int(c.get("num_readouts", 1)),
                     repeat_task_tokens=bool(c.get("repeat_task_tokens", True)),
                     use_correct_attention=bool(c.get("use_correct_attention", True)))


@register("octo")
def build_octo(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> OctoPolicy:
    """The preset builder (``model.preset='octo'``); ``model.head`` swaps the action head (``head_kwargs`` over
    ``head_defaults[head]`` over Octo's own head settings)."""
    head_name = model.get("head", "diffusion") or "diffusion"
    head_kwargs = {**_plain(_plain(model.get("head_defaults")).get(head_name)), **_plain(model.get("head_kwargs"))}
    sizes = sizes_from_model(model, spec)
    if sizes.t5 is not None and text_vocab_size > sizes.t5.vocab_size:
        raise ValueError(f"the tokenizer has {text_vocab_size} ids but model.octo.t5.vocab_size is "
                         f"{sizes.t5.vocab_size}; use the T5 tokenizer or raise the vocabulary")
    return OctoPolicy(spec, sizes, head_name=head_name, head_kwargs=head_kwargs, rngs=rngs)


__all__ = ["OctoPolicy", "OctoSizes", "CameraSizes", "build_octo", "sizes_from_model", "HEAD_DEFAULTS"]
