"""L1-regression MLP head (OpenVLA-OFT's parallel decoding): a whole chunk from the LLM's action-slot states.

OpenVLA-OFT appends ``horizon * action_dim`` empty action slots to the LLM input, lets them attend to the prompt
and to each other in one forward pass, and regresses every action value from the slots' last hidden states:

    ctx.tokens[:, -H*A:]  [B, H*A, D] -> [B, H, A*D] -> MLP-ResNet -> [B, H, A]        loss: masked mean |a - a*|

The head reads the *last* ``H * A`` context positions, which is where a preset puts its action slots
(``vlax.presets.openvla`` with ``model.head='l1_mlp'``). The MLP-ResNet follows OFT's ``MLPResNet``:
LayerNorm -> Dense -> ReLU, ``num_blocks`` residual blocks (LayerNorm -> Dense -> ReLU), LayerNorm -> Dense.
Sampling is deterministic (one pass, no noise).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn import ContextSpec, Dense, HeadContext, LayerNorm
from vlax.nn.head_base import ActionHead, RngLike, masked_mean


class MLPResNetBlock(nnx.Module):
    """``x + relu(dense(layer_norm(x)))``, ``[..., D] -> [..., D]``."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(width, rngs=rngs)
        self.dense = Dense(width, width, axes=("mlp", "mlp"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.nn.relu(self.dense(self.norm(x)))


class L1MLPHead(ActionHead):
    """Parallel L1 regression of ``[B, H, A]`` from the last ``H * A`` context tokens (see the module docstring).

    Args:
      action_dim, horizon: actions are ``[B, horizon, action_dim]``.
      context: :class:`vlax.nn.ContextSpec` (``width`` D of the context tokens).
      hidden_dim: MLP width (OFT: the LLM width); ``None`` uses ``context.width``.
      num_blocks: residual blocks (OFT: 2).
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, hidden_dim: int | None = None,
                 num_blocks: int = 2, rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        width = self.context.width
        hidden = int(hidden_dim or width)
        self.input_norm = LayerNorm(width * self.action_dim, rngs=rngs)
        self.fc1 = Dense(width * self.action_dim, hidden, axes=("embed", "mlp"), rngs=rngs)
        self.blocks = nnx.List([MLPResNetBlock(hidden, rngs=rngs) for _ in range(int(num_blocks))])
        self.output_norm = LayerNorm(hidden, rngs=rngs)
        self.fc2 = Dense(hidden, self.action_dim, axes=("mlp", None), rngs=rngs)

    @property
    def num_slots(self) -> int:
        return self.horizon * self.action_dim

    def predict(self, ctx: HeadContext) -> jax.Array:
        """Actions ``[B, H, A]`` from the last ``H * A`` context tokens ``[B, H*A, D]``."""
        self.check_context(ctx)
        if ctx.tokens.shape[1] < self.num_slots:
            raise ValueError(f"the context has {ctx.tokens.shape[1]} tokens but the l1_mlp head reads the last "
                             f"horizon * action_dim = {self.num_slots}; append that many action slots to the "
                             "sequence (model.preset='openvla' does with model.head='l1_mlp')")
        slots = ctx.tokens[:, -self.num_slots:]
        x = einops.rearrange(slots, "b (h a) d -> b h (a d)", h=self.horizon, a=self.action_dim)
        x = jax.nn.relu(self.fc1(self.input_norm(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc2(self.output_norm(x)).astype(jnp.float32)

    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike | None = None, train: bool = True, lm=None) -> tuple[jax.Array, dict]:
        """Masked mean absolute error; metrics ``l1``."""
        actions, mask = self.prepare_actions(actions, action_mask)
        err = jnp.abs(self.predict(ctx) - actions.astype(jnp.float32))
        loss = masked_mean(err, mask)
        return loss, {"l1": loss}

    def sample(self, ctx: HeadContext, *, rngs: RngLike | None = None, num_steps: int | None = None,
               lm=None) -> jax.Array:
        """Actions ``[B, H, A]`` in one pass."""
        return self.predict(ctx)
