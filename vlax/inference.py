"""Run a trained policy: load it from its checkpoint and map raw observations + instructions to actions.

Everything the policy was trained with comes from the checkpoint (config, normalization artifact, tokenizer), so
nothing is re-typed at inference time::

    runner = PolicyRunner.from_checkpoint("runs/flow")
    actions = runner.sample_actions({"image_corner2": frame, "state": state}, "push the puck to the goal")
    # actions: [H, A] un-normalized (or [B, H, A] for batched inputs)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vlax.build import build_policy, policy_spec
from vlax.policy import VLA, PolicySpec
from vlax.tokenizers import Tokenizer, encode_batch, tokenizer_from_json
from vlax.checkpoint import Checkpointer


class PolicyRunner:
    """A policy with its normalization and tokenizer; :meth:`sample_actions` is jitted once per batch shape."""

    def __init__(self, model: VLA, spec: PolicySpec, tokenizer: Tokenizer, artifact, config: Any, *,
                 seed: int = 0, num_steps: int | None = None):
        self.spec, self.tokenizer, self.artifact, self.config = spec, tokenizer, artifact, config
        self._graphdef, self._state = nnx.split(model)
        self._key = jax.random.key(seed)
        self._calls = 0
        graphdef = self._graphdef

        @jax.jit
        def sample(state, obs, key):
            return nnx.merge(graphdef, state).sample(obs, rngs=key, num_steps=num_steps)

        self._sample = sample

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, step: int | None = None, use_ema: bool = True,
                        seed: int = 0, num_steps: int | None = None) -> "PolicyRunner":
        """Load from a training workdir (or its ``checkpoints`` directory); the EMA weights when the run kept them."""
        from vlax.data.normalization import NormalizationArtifact

        path = Path(path)
        ckpt = Checkpointer(path / "checkpoints" if (path / "checkpoints").exists() else path)
        step = ckpt.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {path}")
        config = ml_collections.ConfigDict(ckpt.read_json(step, "config"))
        tokenizer = tokenizer_from_json(ckpt.read_json(step, "tokenizer"))
        artifact = NormalizationArtifact.from_dict(ckpt.read_json(step, "normalization"))
        spec = policy_spec(config)
        model = nnx.eval_shape(lambda: build_policy(config.model, spec, tokenizer.vocab_size, nnx.Rngs(0)))
        raw = ckpt.restore_raw(step)
        ckpt.close()
        params = raw["ema"] if use_ema and raw.get("ema") is not None else raw["params"]
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, _merge_pure(nnx.to_pure_dict(state), params, raw.get("rest") or {}))
        nnx.update(model, state)
        return cls(model, spec, tokenizer, artifact, config, seed=seed, num_steps=num_steps)

    def model(self) -> VLA:
        """The policy module (a fresh merge of the runner's weights)."""
        return nnx.merge(self._graphdef, self._state)

    def sample_normalized(self, inputs: dict, rng: jax.Array) -> jax.Array:
        """Normalized actions ``[B, H, A]`` from prepared model inputs (see :meth:`prepare`); jitted."""
        return self._sample(self._state, inputs, rng)

    def prepare(self, observation: dict, instructions: Sequence[str]) -> dict:
        """Model inputs from raw frames (any size, resized like the training pipeline) and raw state."""
        images = {}
        for camera in self.spec.cameras:
            frames = np.asarray(observation[f"image_{camera}"])
            size = (self.spec.image_size, self.spec.image_size)
            if frames.shape[1:3] != size:
                # Imported only when needed: TensorFlow cannot share a process with EGL rendering.
                from vlax.data.frame_transforms import decode_and_resize_image

                frames = np.stack([decode_and_resize_image(f, size).numpy() for f in frames])
            images[camera] = frames.astype(np.uint8)
        state = self.artifact.normalize("state", np.asarray(observation["state"], np.float32))
        if state.shape[-1] < self.spec.state_dim:
            state = np.pad(state, ((0, 0), (0, self.spec.state_dim - state.shape[-1])))
        ids, mask = encode_batch(self.tokenizer, list(instructions), self.spec.max_text_len)
        return {"images": images, "state": state.astype(np.float32), "text_ids": ids, "text_mask": mask}

    def sample_actions(self, observation: dict, instruction: str | Sequence[str], *,
                       rng: jax.Array | None = None) -> np.ndarray:
        """Un-normalized actions ``[B, H, A]`` for batched inputs (``image_<camera>`` ``[B, h, w, 3]``, ``state``
        ``[B, S]``, ``B`` instructions), or ``[H, A]`` for one unbatched observation and one instruction."""
        single = isinstance(instruction, str)
        if single:
            observation = {k: np.asarray(v)[None] for k, v in observation.items()}
            instruction = [instruction]
        obs = self.prepare(observation, instruction)
        if rng is None:
            rng = jax.random.fold_in(self._key, self._calls)
            self._calls += 1
        actions = np.asarray(self.sample_normalized(obs, rng))
        actions = self.artifact.unnormalize("action", actions)
        return actions[0] if single else actions


def _merge_pure(target: dict, params: dict, rest: dict) -> dict:
    """Fill ``target`` (the model's pure state) from the checkpoint's params and non-param variables."""

    def fill(t, *sources):
        if isinstance(t, dict):
            return {k: fill(v, *[_get(s, k) for s in sources]) for k, v in t.items()}
        for s in sources:
            if not isinstance(s, dict):
                return jnp.asarray(s, dtype=getattr(t, "dtype", None))
        raise KeyError("checkpoint lacks a variable the model has; was it saved by a different version?")

    return fill(target, params, rest)


def _get(source: Any, key: Any) -> Any:
    """``source[key]``, where a checkpoint spells list indices as strings."""
    if not isinstance(source, dict):
        return {}
    return source.get(key, source.get(str(key), {}))
