"""RoboFlamingo's policy head: a recurrent network over per-frame features, regressing the arm's pose delta and
classifying the gripper (Li et al. 2024, "Vision-Language Foundation Models as Effective Robot Imitators").

The context tokens are read as a time series, oldest first: ``ctx.tokens [B, T, D]`` holds one feature per
observation frame (RoboFlamingo max-pools the language model's hidden states of each frame). Then::

    features [B, T, D] -> 4-layer LSTM (hidden 1024, dropout 0.1 between layers)     temporal="lstm" (default)
                       or Dense(D/2) . ReLU . Dense(hidden) per frame                temporal="mlp"  (RoboFlamingo's fc)
                       or [Dense(hidden)] + learned positions -> causal GPT-2        temporal="gpt"  (its GPTDecoder)
                       -> pose tower:    Dense 1024 . 512 . 256 (ReLU) -> k * (A - G) values, tanh
                       -> gripper tower: the same -> k * G logits (sigmoid)

``A - G`` pose dimensions (6-DoF delta) and the last ``G = gripper_dims`` (one open/close value). The pose is
trained with a Huber loss, the gripper with binary cross-entropy against ``action > 0`` weighted by
``gripper_weight`` (RoboFlamingo: 0.01); sampled grippers are ``+1`` / ``-1`` (probability above / below 0.5).
``gripper_dims=0`` regresses every dimension.

Which frame predicts what (``supervise``):

* ``"every_frame"`` (RoboFlamingo's training): frame ``t`` predicts ``k = H - T + 1`` actions from chunk index
  ``t``, so the chunk ``[B, H, A]`` starts at the oldest frame, as the data pipeline windows a history, and every
  frame is supervised. The sampled chunk is each frame's first action, then the newest frame's ``k``; the step to
  execute now is index ``T - 1``.
* ``"last_frame"``: the newest real token predicts the whole chunk (``k = H``); works over any context.

Padding tokens (``ctx.mask`` false) leave the LSTM state unchanged. The GPT variant (GPT-2 blocks: pre-LN, biased
attention scaled by ``1/sqrt(head_dim)``, tanh-GELU MLP of 4x width, LayerNorm eps 1e-5, a final LayerNorm; no
dropout) hides padded frames as keys and numbers the real frames 0, 1, ... as RoboFlamingo's growing history
memory does at an episode's start; ``max_frames`` is its ``n_positions`` (the history length).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn import ContextSpec, Dense, HeadContext, MaskedEncoder, make_attn_mask, param, positions_from_mask
from vlax.nn.head_base import ActionHead, RngLike, dropout, last_valid_index, masked_mean, split_rngs

TEMPORAL = ("lstm", "mlp", "gpt")
SUPERVISE = ("every_frame", "last_frame")


class LSTMLayer(nnx.Module):
    """One LSTM layer with torch's gate order (input, forget, cell, output): ``[B, T, in] -> [B, T, H]``.

    ``input_proj`` / ``hidden_proj`` hold torch's ``weight_ih`` / ``weight_hh`` transposed, with their biases.
    """

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = int(hidden)
        self.input_proj = Dense(in_features, 4 * hidden, axes=("embed", "mlp"), rngs=rngs)
        self.hidden_proj = Dense(hidden, 4 * hidden, axes=("mlp", "mlp"), rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``x [B, T, in]``, ``mask [B, T]`` -> hidden states ``[B, T, H]`` (a padded step repeats the last)."""
        b = x.shape[0]
        xs = jnp.swapaxes(self.input_proj(x), 0, 1)  # [T, B, 4H]: the input half of every gate at once
        w = self.hidden_proj.kernel[...].astype(x.dtype)
        bias = self.hidden_proj.bias[...].astype(x.dtype)
        zeros = jnp.zeros((b, self.hidden), x.dtype)

        def step(carry, inputs):
            h, c = carry
            gates_x, valid = inputs
            i, f, g, o = jnp.split(gates_x + h @ w + bias, 4, axis=-1)
            c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
            valid = valid[:, None]
            h, c = jnp.where(valid, h_new, h), jnp.where(valid, c_new, c)
            return (h, c), h

        _, hs = jax.lax.scan(step, (zeros, zeros), (xs, jnp.swapaxes(mask, 0, 1)))
        return jnp.swapaxes(hs, 0, 1)


class MLPTower(nnx.Module):
    """``Dense -> ReLU`` through ``dims``, then ``Dense(out)``: RoboFlamingo's MLPTanhHead / MLPSigmoidHead body."""

    def __init__(self, in_features: int, dims: Sequence[int], out_features: int, *, rngs: nnx.Rngs):
        sizes = [int(in_features), *map(int, dims)]
        self.layers = nnx.List([Dense(a, b, axes=("mlp", "mlp"), rngs=rngs) for a, b in zip(sizes, sizes[1:])])
        self.out = Dense(sizes[-1], out_features, axes=("mlp", None), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.out(x)


class LSTMHead(ActionHead):
    """Recurrent (or per-frame MLP) policy head over per-frame features; see the module docstring.

    Args:
      action_dim, horizon: actions are ``[B, horizon, action_dim]``.
      context: :class:`vlax.nn.ContextSpec` (``width`` D of the per-frame features).
      hidden_dim: LSTM hidden size / GPT width (RoboFlamingo: 1024). num_layers: stacked LSTM layers (4) or GPT
        blocks (RoboFlamingo's GPT decoder: 8). gpt_heads: GPT attention heads (8). max_frames: GPT positions (12).
      dropout: between LSTM layers while training (0.1). temporal: ``"lstm"``, ``"mlp"`` or ``"gpt"``.
      tower_dims: hidden sizes of the two output towers ((1024, 512, 256)).
      gripper_dims: trailing action dims classified as a gripper (1; 0 for none).
      gripper_weight: weight of the gripper's cross-entropy (0.01). supervise: ``"every_frame"`` / ``"last_frame"``.
      steps_per_frame: actions each frame predicts with ``"every_frame"`` (RoboFlamingo's ``multi_step_action``);
        the context then has ``horizon - steps_per_frame + 1`` frames.
      pose_activation: ``"tanh"`` (RoboFlamingo: normalised pose in [-1, 1]) or ``"none"``.
      huber_delta: the Huber loss's switch point (1.0, torch's default).
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, hidden_dim: int = 1024,
                 num_layers: int = 4, dropout: float = 0.1, temporal: str = "lstm",
                 tower_dims: Sequence[int] = (1024, 512, 256), gripper_dims: int = 1, gripper_weight: float = 0.01,
                 supervise: str = "last_frame", steps_per_frame: int = 1, pose_activation: str = "tanh",
                 huber_delta: float = 1.0, gpt_heads: int = 8, max_frames: int = 12, rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        if temporal not in TEMPORAL:
            raise ValueError(f"unknown temporal model {temporal!r}; known: {list(TEMPORAL)}")
        if supervise not in SUPERVISE:
            raise ValueError(f"unknown supervise {supervise!r}; known: {list(SUPERVISE)}")
        if not 0 <= gripper_dims <= self.action_dim:
            raise ValueError(f"gripper_dims={gripper_dims} must lie in [0, action_dim={self.action_dim}]")
        if pose_activation not in ("tanh", "none"):
            raise ValueError(f"unknown pose_activation {pose_activation!r}; known: ['tanh', 'none']")
        k = self.horizon if supervise == "last_frame" else int(steps_per_frame)
        if not 1 <= k <= self.horizon:
            raise ValueError(f"steps_per_frame={steps_per_frame} must lie in [1, horizon={self.horizon}]")
        self.temporal, self.supervise, self.steps = temporal, supervise, k
        self.gripper_dims, self.gripper_weight = int(gripper_dims), float(gripper_weight)
        self.dropout_rate, self.pose_activation, self.huber_delta = float(dropout), pose_activation, float(huber_delta)
        width, hidden_dim = self.context.width, int(hidden_dim)
        rnn = frame_mlp = gpt = gpt_in = gpt_positions = None
        if temporal == "lstm":
            sizes = [width] + [hidden_dim] * int(num_layers)
            rnn = nnx.List([LSTMLayer(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
        elif temporal == "mlp":
            frame_mlp = MLPTower(width, (width // 2,), hidden_dim, rngs=rngs)
        else:
            if hidden_dim % int(gpt_heads):
                raise ValueError(f"hidden_dim={hidden_dim} is not a multiple of gpt_heads={gpt_heads}")
            gpt_in = Dense(width, hidden_dim, axes=("embed", "mlp"), rngs=rngs) if width != hidden_dim else None
            gpt_positions = param(rngs, nnx.initializers.normal(0.02), (int(max_frames), hidden_dim), (None, "mlp"))
            gpt = MaskedEncoder(hidden_dim, int(num_layers), int(gpt_heads), 4 * hidden_dim, act="gelu_tanh",
                                norm_eps=1e-5, rngs=rngs)
        self.max_frames = int(max_frames)
        self.rnn, self.frame_mlp, self.gpt = nnx.data(rnn), nnx.data(frame_mlp), nnx.data(gpt)
        self.gpt_in, self.gpt_positions = nnx.data(gpt_in), nnx.data(gpt_positions)
        pose_dims = self.action_dim - self.gripper_dims
        self.actions = MLPTower(hidden_dim, tower_dims, k * pose_dims, rngs=rngs) if pose_dims else None
        self.gripper = MLPTower(hidden_dim, tower_dims, k * self.gripper_dims, rngs=rngs) if gripper_dims else None

    # ---- forward ----------------------------------------------------------------------------------------------------

    def features(self, ctx: HeadContext, *, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        """Per-frame hidden states ``[B, T, hidden]``."""
        self.check_context(ctx)
        x, mask = ctx.tokens, jnp.asarray(ctx.mask, bool)
        if self.frame_mlp is not None:
            return self.frame_mlp(x)
        if self.gpt is not None:
            return self._gpt_features(x, mask)
        keys = [None] * len(self.rnn) if key is None else list(jax.random.split(key, len(self.rnn)))
        for i, layer in enumerate(self.rnn):
            x = layer(x, mask)
            if i < len(self.rnn) - 1:  # torch's LSTM drops out between layers, not after the last
                x = dropout(x, self.dropout_rate, keys[i], train)
        return x

    def _gpt_features(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        t = x.shape[1]
        if t > self.max_frames:
            raise ValueError(f"the GPT head has max_frames={self.max_frames} positions but got {t} frames; raise "
                             "max_frames (RoboFlamingo: the history length) or shorten data.obs_history")
        if self.gpt_in is not None:
            x = self.gpt_in(x)
        positions = jnp.maximum(positions_from_mask(mask), 0)
        x = x + self.gpt_positions[...].astype(x.dtype)[positions]
        # causal over the real frames; a padded frame attends to itself only, so its (unused) row stays finite
        attend = make_attn_mask(mask, jnp.ones(t, jnp.int32)) | jnp.eye(t, dtype=bool)[None]
        return self.gpt(x, attend)

    def _outputs(self, ctx: HeadContext, train: bool, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(pose [B, T', k, A - G], gripper logits [B, T', k, G])`` for the frames that predict."""
        h = self.features(ctx, train=train, key=key)
        b, t = h.shape[:2]
        if self.supervise == "last_frame":
            h = jnp.take_along_axis(h, last_valid_index(ctx.mask)[:, None, None], axis=1)
        elif t + self.steps - 1 != self.horizon:
            raise ValueError(f"supervise='every_frame' reads {t} frames predicting steps_per_frame={self.steps} "
                             f"actions each, so the chunk must have {t + self.steps - 1} steps; the head's horizon "
                             f"is {self.horizon} (set horizon = frames + steps_per_frame - 1)")
        n = h.shape[1]
        pose = jnp.zeros((b, n, self.steps, 0), jnp.float32)
        grip = jnp.zeros((b, n, self.steps, 0), jnp.float32)
        if self.actions is not None:
            pose = self.actions(h).astype(jnp.float32).reshape(b, n, self.steps, -1)
            pose = jnp.tanh(pose) if self.pose_activation == "tanh" else pose
        if self.gripper is not None:
            grip = self.gripper(h).astype(jnp.float32).reshape(b, n, self.steps, -1)
        return pose, grip

    def _per_frame_targets(self, x: jax.Array, n: int) -> jax.Array:
        """``[B, H, C] -> [B, n, k, C]``: the ``k`` steps each predicting frame is trained on."""
        if self.supervise == "last_frame":
            return x[:, None]
        index = jnp.arange(n)[:, None] + jnp.arange(self.steps)[None, :]
        return x[:, index]

    # ---- the contract ----------------------------------------------------------------------------------------------

    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike | None = None, train: bool = True, lm=None) -> tuple[jax.Array, dict]:
        """Huber on the pose + ``gripper_weight`` * BCE on the gripper; metrics ``pose``, ``gripper``."""
        actions, mask = self.prepare_actions(actions, action_mask)
        key = None if rngs is None else split_rngs(rngs)[1]
        pose, grip = self._outputs(ctx, train, key)
        target = self._per_frame_targets(actions.astype(jnp.float32), pose.shape[1])
        m = self._per_frame_targets(jnp.broadcast_to(mask, actions.shape), pose.shape[1])
        g = self.gripper_dims
        p_target, g_target = target[..., :self.action_dim - g], target[..., self.action_dim - g:]
        p_mask, g_mask = m[..., :self.action_dim - g], m[..., self.action_dim - g:]
        err = jnp.abs(pose - p_target)
        d = self.huber_delta
        huber = jnp.where(err < d, 0.5 * err ** 2, d * (err - 0.5 * d))
        pose_loss = masked_mean(huber, p_mask)
        labels = (g_target > 0).astype(jnp.float32)
        bce = jnp.maximum(grip, 0) - grip * labels + jnp.log1p(jnp.exp(-jnp.abs(grip)))  # stable BCE on logits
        grip_loss = masked_mean(bce, g_mask)
        return pose_loss + self.gripper_weight * grip_loss, {"pose": pose_loss, "gripper": grip_loss}

    def sample(self, ctx: HeadContext, *, rngs: RngLike | None = None, num_steps: int | None = None,
               lm=None) -> jax.Array:
        """Actions ``[B, H, A]`` in one deterministic pass (grippers as +1 / -1)."""
        pose, grip = self._outputs(ctx, False, None)
        chunk = jnp.concatenate([pose, jnp.where(grip > 0, 1.0, -1.0)], axis=-1)  # [B, n, k, A]
        if self.supervise == "last_frame":
            return chunk[:, 0]
        return jnp.concatenate([chunk[:, :-1, 0], chunk[:, -1]], axis=1)


__all__ = ["LSTMHead", "LSTMLayer", "MLPTower"]
