"""Flamingo's language model: a frozen decoder LM with gated cross-attention dense blocks inserted between its
layers (Alayrac et al. 2022, section 2.2 / figure 4; OpenFlamingo; RoboFlamingo).

Each inserted block lets the text attend to visual tokens (``media``, e.g. perceiver-resampler latents) through
two residual branches scaled by ``tanh`` of a learned scalar gate, both gates initialised to zero::

    y = y + tanh(alpha_xattn) * Attn(q=LayerNorm(y), kv=media)
    y = y + tanh(alpha_dense) * FFW(y)          FFW = Dense(4D, no bias) . GELU . Dense(D, no bias) . LayerNorm

so a freshly built :class:`FlamingoLM` computes exactly its plain language model. A block sits before decoder
layer ``i`` whenever ``(i + 1) % cross_attn_every == 0`` (OpenFlamingo's placement: before layers n-1, 2n-1, ...).
The decoder is vlax's :class:`vlax.backbones.Transformer` unchanged (its stacked layers are run in groups of
``cross_attn_every``), so its weights import as for any Llama-style model.

Every text token attends to every valid media token: one image per sequence, placed ahead of the text, which is
how RoboFlamingo feeds each frame (``<image>`` first, then the instruction). There is no KV-cache decoding: the
policy reads hidden states, it does not generate text.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.backbones.transformer import Transformer, TransformerOutput
from vlax.nn import Attention, DecoderBlock, LayerNorm, Mlp, make_attn_mask, param, positions_from_mask, stack_layers
from vlax.nn.scan import remat_policy


class GatedCrossAttentionBlock(nnx.Module):
    """Tanh-gated cross-attention then tanh-gated feed-forward, ``x [B, T, D]`` attending to ``media [B, M, Dv]``.

    Names follow OpenFlamingo's ``GatedCrossAttentionBlock``: ``attn`` (``norm``, q from the text, k/v from the
    media), ``attn_gate``, ``ff_norm`` + ``ff``, ``ff_gate``.
    """

    def __init__(self, width: int, media_width: int, *, num_heads: int = 8, head_dim: int = 64, ff_mult: int = 4,
                 norm_eps: float = 1e-5, rngs: nnx.Rngs):
        self.norm = LayerNorm(width, eps=norm_eps, rngs=rngs)
        self.attn = Attention(width, num_heads, head_dim=head_dim, kv_features=media_width, use_bias=False,
                              rngs=rngs)
        self.attn_gate = param(rngs, nnx.initializers.zeros, (1,), (None,))
        self.ff_norm = LayerNorm(width, eps=norm_eps, rngs=rngs)
        self.ff = Mlp(width, width * ff_mult, act="gelu", use_bias=False, rngs=rngs)
        self.ff_gate = param(rngs, nnx.initializers.zeros, (1,), (None,))

    def __call__(self, x: jax.Array, media: jax.Array, media_mask: jax.Array | None = None) -> jax.Array:
        """``x [B, T, D]``, ``media [B, M, Dv]``, ``media_mask [B, M]`` (valid media tokens) -> ``[B, T, D]``."""
        mask = None if media_mask is None else jnp.broadcast_to(
            jnp.asarray(media_mask, bool)[:, None, :], (x.shape[0], x.shape[1], media.shape[1]))
        h, _ = self.attn(self.norm(x), kv_input=media.astype(x.dtype), mask=mask)
        x = x + jnp.tanh(self.attn_gate[...]).astype(x.dtype) * h.astype(x.dtype)
        return x + jnp.tanh(self.ff_gate[...]).astype(x.dtype) * self.ff(self.ff_norm(x)).astype(x.dtype)


class FlamingoLM(nnx.Module):
    """A :class:`Transformer` (``lm``) with a :class:`GatedCrossAttentionBlock` every ``cross_attn_every`` layers.

    Parameters: ``lm.*`` (the decoder, as vlax's Transformer names them) and ``gated_cross_attn_layers`` (one
    stacked block per group, ``[depth // cross_attn_every, ...]``).

    Example::

        lm = FlamingoLM(Transformer(get_config("llama2_7b")), media_width=1024, cross_attn_every=4, rngs=rngs)
        out = lm(tokens, media)     # tokens [B, T] int, media [B, M, 1024] -> out.hidden [B, T, 4096]
    """

    def __init__(self, lm: Transformer, media_width: int, *, cross_attn_every: int = 1, num_heads: int = 8,
                 head_dim: int = 64, ff_mult: int = 4, rngs: nnx.Rngs):
        depth = lm.config.depth
        if cross_attn_every < 1 or depth % cross_attn_every:
            raise ValueError(f"cross_attn_every={cross_attn_every} must be >= 1 and divide the LM's {depth} layers")
        self.lm = lm
        self.media_width = int(media_width)
        self.cross_attn_every = int(cross_attn_every)
        width = lm.config.width
        self.gated_cross_attn_layers = stack_layers(
            lambda r: GatedCrossAttentionBlock(width, media_width, num_heads=num_heads, head_dim=head_dim,
                                               ff_mult=ff_mult, rngs=r), depth // cross_attn_every, rngs)

    @property
    def config(self):
        return self.lm.config

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return self.lm.embed_tokens(ids)

    def __call__(self, tokens: jax.Array | None = None, media: jax.Array | None = None, *,
                 embeds: jax.Array | None = None, input_mask: jax.Array | None = None,
                 media_mask: jax.Array | None = None, return_logits: bool = False) -> TransformerOutput:
        """Causal forward over ``embeds [B, P, D]`` then ``tokens [B, T]`` (as :class:`Transformer`), the
        inserted blocks attending to ``media [B, M, media_width]``. Returns ``hidden [B, N, D]`` after the final
        norm (and ``logits`` when asked)."""
        if media is None or media.ndim != 3 or media.shape[-1] != self.media_width:
            got = None if media is None else tuple(media.shape)
            raise ValueError(f"media must be [B, M, {self.media_width}] (the visual tokens), got {got}")
        lm, n = self.lm, self.cross_attn_every
        x = lm._inputs(tokens, embeds)
        batch, length = x.shape[:2]
        if media.shape[0] != batch:
            raise ValueError(f"media batch {media.shape[0]} != text batch {batch}")
        input_mask = jnp.ones((batch, length), bool) if input_mask is None else jnp.asarray(input_mask, bool)
        if input_mask.shape != (batch, length):
            raise ValueError(f"input_mask must be [{batch}, {length}], got {tuple(input_mask.shape)}")
        mask = make_attn_mask(input_mask, jnp.ones((length,), jnp.int32))
        positions = positions_from_mask(input_mask)
        layer_def, layer_state = nnx.split(lm.layers)
        xattn_def, xattn_state = nnx.split(self.gated_cross_attn_layers)
        groups = lm.config.depth // n
        layer_state = jax.tree.map(lambda a: a.reshape(groups, n, *a.shape[1:]), layer_state)

        def group(h, states):
            decoder_states, xattn = states
            for j in range(n):
                if j == n - 1:  # the block sits before the group's last decoder layer
                    h = nnx.merge(xattn_def, xattn)(h, media, media_mask)
                layer: DecoderBlock = nnx.merge(layer_def, jax.tree.map(lambda a: a[j], decoder_states))
                h, _ = layer(h, mask=mask, positions=positions)
            return h, None

        if lm.config.remat != "none":
            group = jax.checkpoint(group, policy=remat_policy(lm.config.remat), prevent_cse=False)
        h, _ = jax.lax.scan(group, x, (layer_state, xattn_state))
        hidden = lm.norm(h)
        return TransformerOutput(hidden=hidden, logits=lm.logits(hidden) if return_logits else None)


__all__ = ["FlamingoLM", "GatedCrossAttentionBlock"]
