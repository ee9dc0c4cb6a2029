"""The VLA: observation -> tokens -> backbone -> action head.

Token layout of the backbone's input (one mask primitive, ``vlax.nn.make_attn_mask``)::

    [camera 1 patches | camera 2 patches | ... | instruction tokens | state token] [readouts]
     <---------------- prefix: bidirectional (ar = 0) ------------------------->  <- ar = 1 ->

Readout tokens (optional) see the prefix and each other; the prefix never sees them. The head receives the
backbone's final hidden states of the readouts (or of the whole prefix when there are none), their mask, the
state, and, when the head declares ``cache_slots`` (π0's expert, LM decoding), the backbone's per-layer KV cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.data.resize import check_resize_mode
from vlax.heads import BinTokenizer
from vlax.nn import ContextSpec, Dense, HeadContext, param

Observation = dict[str, Any]  # {"images": {camera: uint8 [B, h, w, 3]}, "state": [B, S], "text_ids": [B, L],
#                                 "text_mask": [B, L]}


STATE_INPUTS = ("prefix", "discrete", "head", "none")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """Shapes and wiring of a policy (saved with every checkpoint).

    ``state_input``: ``"prefix"`` (a state token in the backbone's prefix, every head sees it through the
    backbone), ``"discrete"`` (π0.5: each normalized state dimension digitized into ``state_bins`` uniform bins over
    [-1, 1] and read as one vocabulary token, the bins occupying the last ids of the backbone's vocabulary as
    OpenVLA's action tokens do), ``"head"`` (``ctx.state`` for heads that embed the state themselves, as π0 does)
    or ``"none"``.
    """

    cameras: tuple[str, ...]
    image_size: int
    state_dim: int
    action_dim: int
    horizon: int
    max_text_len: int
    state_input: str = "prefix"
    num_readouts: int = 0
    state_bins: int = 256
    # Observation steps the policy sees (the current one and the obs_history - 1 before it). Above 1, images are
    # [B, T, h, w, 3] and the state [B, T, S], oldest first, episode starts padded by repeating the first frame.
    obs_history: int = 1
    # How frames of another shape reach image_size: "stretch" or "pad" (aspect kept, zeros left and top), the
    # same op in the training pipeline and at inference (vlax.data.resize).
    image_resize: str = "stretch"
    # Which actions a history window trains on: "oldest" (one chunk [B, H, A] from the window's oldest step, as
    # Diffusion Policy and RoboFlamingo train) or "every_step" ([B, T, H, A], a chunk from each window step, as Octo
    # trains one readout per step).
    action_chunks: str = "oldest"

    def __post_init__(self):
        check_resize_mode(self.image_resize)
        if self.action_chunks not in ACTION_CHUNKS:
            raise ValueError(f"action_chunks={self.action_chunks!r}; use one of {ACTION_CHUNKS}")
        if self.obs_history < 1:
            raise ValueError(f"obs_history={self.obs_history}; a policy sees at least the current observation (1)")
        if self.state_input not in STATE_INPUTS:
            raise ValueError(f"state_input={self.state_input!r}; known: {list(STATE_INPUTS)}")
        if not self.cameras:
            raise ValueError("a policy needs at least one camera")


ACTION_CHUNKS = ("oldest", "every_step")


class VLA(nnx.Module):
    """Vision encoder + language backbone + action head, wired by a :class:`PolicySpec`.

    ``encoder`` maps ``uint8 [B, h, w, 3]`` to ``[B, N, encoder_width]`` (a conv stem, or a ViT wrapped to return
    its patch tokens); ``backbone`` is a :class:`vlax.backbones.Transformer`; ``head`` any registered head built
    for ``ContextSpec.from_config(backbone.config)``.
    """

    def __init__(self, spec: PolicySpec, *, encoder: nnx.Module, encoder_width: int, backbone: nnx.Module,
                 head: nnx.Module, rngs: nnx.Rngs):
        self.spec = spec
        width = backbone.config.width
        self.encoder = encoder
        self.backbone = backbone
        self.head = head
        self.image_proj = Dense(encoder_width, width, axes=("embed", "embed"), rngs=rngs)
        self.camera_embedding = param(rngs, nnx.initializers.normal(0.02), (len(spec.cameras), width),
                                      (None, "embed"))
        self.state_proj = Dense(spec.state_dim, width, axes=(None, "embed"), rngs=rngs) \
            if spec.state_input == "prefix" else None
        self.state_tokenizer = BinTokenizer(n_bins=spec.state_bins, vocab_size=backbone.config.vocab_size) \
            if spec.state_input == "discrete" else None
        self.readouts = param(rngs, nnx.initializers.normal(0.02), (spec.num_readouts, width), (None, "embed")) \
            if spec.num_readouts else None
        if tuple(head.action_shape) != (spec.horizon, spec.action_dim):
            raise ValueError(f"head predicts {tuple(head.action_shape)} (horizon, action_dim) but the policy spec "
                             f"says ({spec.horizon}, {spec.action_dim})")

    # ---- observation -> backbone input ----------------------------------------------------------------------------

    def embed_prefix(self, obs: Observation) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(embeds [B, N, D], input_mask [B, N], ar_mask [N])`` for the layout in the module docstring."""
        images = obs["images"]
        missing = [c for c in self.spec.cameras if c not in images]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}; it has {sorted(images)}")
        parts, masks = [], []
        for i, camera in enumerate(self.spec.cameras):
            tokens = self.image_proj(self.encoder(images[camera]))
            tokens = tokens + self.camera_embedding[i].astype(tokens.dtype)
            parts.append(tokens)
            masks.append(jnp.ones(tokens.shape[:2], bool))
        batch = parts[0].shape[0]
        parts.append(self.backbone.embed_tokens(obs["text_ids"]).astype(parts[0].dtype))
        masks.append(jnp.asarray(obs["text_mask"], bool))
        if self.spec.state_input in ("prefix", "discrete"):
            state = jnp.asarray(obs["state"], parts[0].dtype)
            if state.shape[-1] != self.spec.state_dim:
                raise ValueError(f"state has shape {tuple(state.shape)}; the policy expects [B, {self.spec.state_dim}]")
            if self.state_tokenizer is not None:
                state_tokens = self.backbone.embed_tokens(self.state_tokenizer.encode(state)).astype(parts[0].dtype)
            else:
                state_tokens = self.state_proj(state)[:, None]
            parts.append(state_tokens)
            masks.append(jnp.ones(state_tokens.shape[:2], bool))
        prefix_len = sum(p.shape[1] for p in parts)
        ar = [jnp.zeros(prefix_len, jnp.int32)]
        if self.readouts is not None:
            parts.append(jnp.broadcast_to(self.readouts[...].astype(parts[0].dtype),
                                          (batch, *self.readouts.shape)))
            masks.append(jnp.ones((batch, self.spec.num_readouts), bool))
            ar.append(jnp.zeros(self.spec.num_readouts, jnp.int32).at[0].set(1))
        return jnp.concatenate(parts, 1), jnp.concatenate(masks, 1), jnp.concatenate(ar)

    def context(self, obs: Observation) -> HeadContext:
        """Run encoder + backbone once and package what the head needs."""
        embeds, mask, ar = self.embed_prefix(obs)
        slots = getattr(self.head, "cache_slots", None)
        cache_size = None if slots is None else embeds.shape[1] + int(slots)
        out = self.backbone(embeds=embeds, input_mask=mask, ar_mask=ar, cache_size=cache_size)
        tokens, token_mask = out.hidden, mask
        if self.readouts is not None:
            tokens, token_mask = tokens[:, -self.spec.num_readouts:], mask[:, -self.spec.num_readouts:]
        state = jnp.asarray(obs["state"], tokens.dtype) if self.spec.state_input == "head" else None
        return HeadContext(tokens=tokens, mask=token_mask, cache=out.cache, state=state)

    # ---- the head contract, end to end ----------------------------------------------------------------------------

    def loss(self, obs: Observation, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
        """Training loss on normalized ``actions [B, H, A]``."""
        return self.head.loss(self.context(obs), actions, action_mask=action_mask, rngs=rngs, train=train,
                              lm=self.backbone)

    def sample(self, obs: Observation, *, rngs: jax.Array, num_steps: int | None = None) -> jax.Array:
        """Normalized actions ``[B, H, A]``; the backbone runs once, sampling loops reuse its cache."""
        return self.head.sample(self.context(obs), rngs=rngs, num_steps=num_steps, lm=self.backbone)


def head_context_spec(backbone_config: Any) -> ContextSpec:
    """What a head built for this backbone is told about its context."""
    return ContextSpec.from_config(backbone_config)
