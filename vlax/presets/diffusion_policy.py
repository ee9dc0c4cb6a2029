"""Diffusion Policy (Chi et al. 2023), as LeRobot's ``DiffusionPolicy`` builds it.

Per camera a ResNet-18 with GroupNorm (:mod:`vlax.encoders.resnet`, one shared by every camera or one each),
an optional crop (random when training, centred otherwise), spatial-softmax keypoints, then ``Dense -> ReLU``.
The global condition is, for each of the ``obs_history`` observation steps (oldest first),
``[state, camera 1 feature, camera 2 feature, ...]``, all steps concatenated: ``[B, T * (S + n_cams * 2K)]``.
The head (``diffusion_unet`` by default: the FiLM 1-D U-Net over the whole horizon) receives it as a single
context token, so ``model.head`` swaps in any head that reads ``HeadContext.tokens``.

Observation (from :class:`vlax.observation.ObservationPipeline`): ``images {camera: uint8 [B, T, h, w, 3]}``
(``[B, h, w, 3]`` when ``T = 1``) and the normalized ``state [B, T, S]`` (``[B, S]``). Pixels go to [0, 1] and
through the per-camera MEAN_STD statistics inside the preset (``model.pixel_stats``), as LeRobot's normalizer does.

The chunk covers ``horizon`` steps from the oldest observation step; the step executed first is index
``obs_history - 1`` (:meth:`DiffusionPolicy.executed`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.encoders.resnet import ResNet
from vlax.heads import HEADS, get_head
from vlax.nn import ContextSpec, Dense, HeadContext
from vlax.nn.head_base import split_rngs
from vlax.nn.spatial_softmax import SpatialSoftmax
from vlax.policy import PolicySpec
from vlax.presets import register

PIXEL_EPS = 1e-8  # LeRobot's normalizer: (x - mean) / (std + eps)


def crop_offsets(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """torchvision's ``center_crop`` offsets ``(top, left)``."""
    return int(round((size[0] - crop[0]) / 2.0)), int(round((size[1] - crop[1]) / 2.0))


class RgbEncoder(nnx.Module):
    """Normalized images ``[N, h, w, 3]`` -> features ``[N, 2 * num_keypoints]`` (crop, ResNet, keypoints, ReLU)."""

    def __init__(self, image_size: tuple[int, int], *, crop_shape: tuple[int, int] | None, crop_is_random: bool,
                 num_keypoints: int, resnet: Mapping[str, Any], rngs: nnx.Rngs):
        self.crop_shape = tuple(crop_shape) if crop_shape else None
        self.crop_is_random = crop_is_random
        if self.crop_shape and any(c > s for c, s in zip(self.crop_shape, image_size)):
            raise ValueError(f"crop_shape {self.crop_shape} is larger than the images {tuple(image_size)}")
        self.backbone = ResNet(norm="group", rngs=rngs, **dict(resnet))
        h, w = self.crop_shape or tuple(image_size)
        # The feature-map size of ResNet's five stride-2 stages (torch: floor((n + 2p - k) / s) + 1 each).
        for _ in range(5):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        self.pool = SpatialSoftmax(h, w, self.backbone.out_channels, num_keypoints=num_keypoints, rngs=rngs)
        self.out = Dense(2 * num_keypoints, 2 * num_keypoints, rngs=rngs)

    def _crop(self, x: jax.Array, train: bool, key: jax.Array | None) -> jax.Array:
        if self.crop_shape is None:
            return x
        ch, cw = self.crop_shape
        if train and self.crop_is_random:
            if key is None:
                raise ValueError("a random crop at training time needs an rng key")
            kh, kw = jax.random.split(key)
            n = x.shape[0]
            tops = jax.random.randint(kh, (n,), 0, x.shape[1] - ch + 1)
            lefts = jax.random.randint(kw, (n,), 0, x.shape[2] - cw + 1)
            return jax.vmap(lambda im, t, l: jax.lax.dynamic_slice(im, (t, l, 0), (ch, cw, im.shape[-1])))(
                x, tops, lefts)
        top, left = crop_offsets(x.shape[1:3], self.crop_shape)
        return x[:, top:top + ch, left:left + cw]

    def __call__(self, x: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        keypoints = self.pool(self.backbone(self._crop(x, train, key)))  # [N, K, 2]
        return jax.nn.relu(self.out(keypoints.reshape(keypoints.shape[0], -1)))


class DiffusionPolicy(nnx.Module):
    """Observation encoder (per-camera :class:`RgbEncoder` + state over the history) and an action head."""

    backbone = None

    def __init__(self, spec: PolicySpec, *, head: nnx.Module, encoder: Mapping[str, Any], n_action_steps: int,
                 pixel_stats: Mapping[str, tuple[Sequence[float], Sequence[float]] | None] | None = None,
                 rngs: nnx.Rngs):
        self.spec = spec
        self.head = head
        self.n_action_steps = int(n_action_steps)
        if self.n_action_steps + spec.obs_history - 1 > spec.horizon:
            raise ValueError(f"n_action_steps={n_action_steps} from index obs_history-1={spec.obs_history - 1} "
                             f"runs past the horizon {spec.horizon}; lower n_action_steps or raise the horizon")
        encoder = dict(encoder)
        separate = bool(encoder.pop("separate_per_camera", False))
        size = (spec.image_size, spec.image_size)
        make = lambda: RgbEncoder(size, rngs=rngs, **encoder)  # noqa: E731
        self.rgb_encoder = nnx.List([make() for _ in spec.cameras]) if separate else make()
        self.separate = separate
        stats = dict(pixel_stats or {})
        unknown = sorted(set(stats) - set(spec.cameras))
        if unknown:
            raise ValueError(f"pixel_stats name cameras {unknown} the policy does not have ({list(spec.cameras)})")
        # Constants of the checkpoint, not trained: kept as plain tuples so the optimizer never sees them.
        self.pixel_stats = {c: None if stats.get(c) is None else (tuple(map(float, stats[c][0])),
                                                                  tuple(map(float, stats[c][1])))
                            for c in spec.cameras}
        if tuple(head.action_shape) != (spec.horizon, spec.action_dim):
            raise ValueError(f"head predicts {tuple(head.action_shape)} (horizon, action_dim) but the policy spec "
                             f"says ({spec.horizon}, {spec.action_dim})")

    @staticmethod
    def condition_dim(spec: PolicySpec, num_keypoints: int) -> int:
        return spec.obs_history * (spec.state_dim + len(spec.cameras) * 2 * num_keypoints)

    # ---- observation -> global condition ---------------------------------------------------------------------------

    def _history(self, x: jax.Array, frame_ndim: int, name: str) -> jax.Array:
        """``[B, T, ...]`` (or ``[B, ...]`` when the history is 1) -> ``[B, T, ...]``."""
        x = jnp.asarray(x)
        if x.ndim == frame_ndim + 1 and self.spec.obs_history == 1:
            x = x[:, None]
        if x.ndim != frame_ndim + 2 or x.shape[1] != self.spec.obs_history:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; the policy sees {self.spec.obs_history} "
                             "observation steps: [B, T, ...] oldest first")
        return x

    def normalize_images(self, images: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """uint8 ``{camera: [B, T, h, w, 3]}`` -> float32 in [0, 1], then ``(x - mean) / (std + 1e-8)`` per camera."""
        missing = [c for c in self.spec.cameras if c not in images]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}; it has {sorted(images)}")
        out = {}
        for camera in self.spec.cameras:
            x = self._history(images[camera], 3, f"camera {camera!r}")
            x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
            stats = self.pixel_stats[camera]
            if stats is not None:
                x = (x - jnp.asarray(stats[0], jnp.float32)) / (jnp.asarray(stats[1], jnp.float32) + PIXEL_EPS)
            out[camera] = x
        return out

    def global_condition(self, images: Mapping[str, jax.Array], state: jax.Array, *, train: bool = False,
                         key: jax.Array | None = None) -> jax.Array:
        """Normalized ``images {camera: [B, T, h, w, 3]}`` and ``state [B, T, S]`` -> ``[B, T * (S + n_cams * F)]``."""
        state = self._history(state, 1, "state").astype(jnp.float32)
        if state.shape[-1] != self.spec.state_dim:
            raise ValueError(f"state has {state.shape[-1]} dims; the policy takes {self.spec.state_dim}")
        b, t = state.shape[:2]
        frames = [self._history(images[c], 3, f"camera {c!r}") for c in self.spec.cameras]
        keys = [None] * len(frames) if key is None else list(jax.random.split(key, len(frames)))
        if self.separate:
            feats = [enc(f.reshape(b * t, *f.shape[2:]), train=train, key=k).reshape(b, t, -1)
                     for enc, f, k in zip(self.rgb_encoder, frames, keys)]
        else:  # one encoder over every camera and step at once, as LeRobot batches them
            stacked = jnp.stack(frames, axis=2)  # [B, T, n, h, w, 3]
            flat = self.rgb_encoder(stacked.reshape(-1, *stacked.shape[3:]), train=train, key=keys[0])
            feats = [flat.reshape(b, t, -1)]
        return jnp.concatenate([state, *feats], axis=-1).reshape(b, -1)

    def context(self, obs: Mapping[str, Any], *, train: bool = False, key: jax.Array | None = None) -> HeadContext:
        cond = self.global_condition(self.normalize_images(obs["images"]), obs["state"], train=train, key=key)
        return HeadContext(tokens=cond[:, None, :], mask=jnp.ones((cond.shape[0], 1), bool))

    # ---- the policy contract -------------------------------------------------------------------------------------

    def loss(self, obs: Mapping[str, Any], actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: Any, train: bool = True) -> tuple[jax.Array, dict]:
        """Head loss on normalized ``actions [B, H, A]`` (the chunk from the oldest observation step)."""
        key = split_rngs(rngs)[0]
        crop_key, head_key = jax.random.split(key)
        return self.head.loss(self.context(obs, train=train, key=crop_key), actions, action_mask=action_mask,
                              rngs=head_key, train=train)

    def sample(self, obs: Mapping[str, Any], *, rngs: Any, num_steps: int | None = None, **kwargs) -> jax.Array:
        """Normalized actions ``[B, H, A]``; ``kwargs`` go to the head's sampler (e.g. ``noise`` for diffusion)."""
        return self.head.sample(self.context(obs), rngs=rngs, num_steps=num_steps, **kwargs)

    def executed(self, chunk: jax.Array) -> jax.Array:
        """The ``n_action_steps`` actions run from a chunk ``[B, H, A]``: ``[B, n_action_steps, A]`` from index
        ``obs_history - 1`` (the current step)."""
        start = self.spec.obs_history - 1
        return chunk[:, start:start + self.n_action_steps]


# ---- the builder ---------------------------------------------------------------------------------------------------
HEAD_FROM_UNET = ("down_dims", "kernel_size", "n_groups", "step_embed_dim", "film_scale")


@register("diffusion_policy")
def build(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> DiffusionPolicy:
    """``model.diffusion_policy``: ``encoder`` (``crop_shape``, ``crop_is_random``, ``num_keypoints``,
    ``separate_per_camera``, ``resnet`` kwargs), ``n_action_steps``, ``pixel_stats`` ({camera: (mean, std)});
    ``model.head`` / ``head_kwargs`` / ``head_defaults`` as for every policy. ``text_vocab_size`` is unused
    (Diffusion Policy reads no language)."""
    del text_vocab_size
    options = dict(model.get("diffusion_policy", {}))
    encoder = {"crop_shape": None, "crop_is_random": True, "num_keypoints": 32, "separate_per_camera": False,
               "resnet": {"depth": 18}, **dict(options.get("encoder", {}))}
    encoder["resnet"] = dict(encoder["resnet"])
    head_name = model["head"]
    if head_name not in HEADS:
        raise ValueError(f"unknown action head {head_name!r} (model.head); known: {sorted(HEADS)}")
    head_kwargs = {**dict(dict(model.get("head_defaults", {})).get(head_name, {})),
                   **dict(model.get("head_kwargs", {}))}
    if "denoiser_kwargs" in head_kwargs:
        head_kwargs["denoiser_kwargs"] = dict(head_kwargs["denoiser_kwargs"])
    width = DiffusionPolicy.condition_dim(spec, int(encoder["num_keypoints"]))
    head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon, context=ContextSpec(width=width),
                    rngs=rngs, **head_kwargs)
    pixel_stats = options.get("pixel_stats")
    return DiffusionPolicy(spec, head=head, encoder=encoder, n_action_steps=int(options.get("n_action_steps", 8)),
                           pixel_stats=dict(pixel_stats) if pixel_stats else None, rngs=rngs)


__all__ = ["DiffusionPolicy", "RgbEncoder", "build", "crop_offsets"]
