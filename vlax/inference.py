"""Run a trained policy: load it from its checkpoint and map raw observations to actions.

Everything the policy was trained with comes from the checkpoint (policy spec, normalization, tokenizer, prompt
template), and raw observations go through the one :class:`~vlax.observation.ObservationPipeline`::

    runner = PolicyRunner.from_checkpoint("runs/flow")
    actions = runner.infer({"images": {"corner2": frame}, "state": state, "prompt": "push the puck to the goal"})
    # actions: [H, A] in the dataset's units (or [B, H, A] for batched inputs with a list of B prompts)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vlax.build import build_policy
from vlax.checkpoint import Checkpointer, checkpoints_dir
from vlax.observation import ObservationPipeline
from vlax.policy import VLA


class PolicyRunner:
    """A policy with its observation pipeline; sampling is jitted once per input shape."""

    def __init__(self, model: VLA, pipeline: ObservationPipeline, config: Any = None, *, seed: int = 0,
                 num_steps: int | None = None):
        self.pipeline, self.config = pipeline, config
        self._graphdef, self._state = nnx.split(model)
        self._key = jax.random.key(seed)
        self._calls = 0
        graphdef = self._graphdef

        @jax.jit
        def sample(state, obs, key, kwargs):
            return nnx.merge(graphdef, state).sample(obs, rngs=key, num_steps=num_steps, **kwargs)

        self._sample = sample
        # a policy with a slow plan step (Helix's S2): sample(..., plan=...) is its fast step
        self.plan_every = int(getattr(model, "plan_every", 0) or 0) if hasattr(model, "plan") else 0
        self._plan = jax.jit(lambda state, obs: nnx.merge(graphdef, state).plan(obs)) if self.plan_every else None

    @property
    def spec(self):
        return self.pipeline.spec

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def artifact(self):
        return self.pipeline.artifact

    @classmethod
    def from_checkpoint(cls, path: Any, *, step: int | None = None, use_ema: bool = True, seed: int = 0,
                        num_steps: int | None = None, **pipeline_options: Any) -> "PolicyRunner":
        """Load from a training workdir (or its ``checkpoints`` directory); the EMA weights when the run kept
        them. ``pipeline_options`` go to the :class:`ObservationPipeline` (``dataset=``, ``resize_backend=``)."""
        ckpt = Checkpointer(checkpoints_dir(path))
        try:
            step = ckpt.latest_step if step is None else step
            if step is None:
                raise FileNotFoundError(f"no checkpoint under {path}")
            config = ml_collections.ConfigDict(ckpt.read_json(step, "config"))
            pipeline = ObservationPipeline.from_checkpoint_items(ckpt, step, **pipeline_options)
            vocab = pipeline.tokenizer.vocab_size
            model = nnx.eval_shape(lambda: build_policy(config.model, pipeline.spec, vocab, nnx.Rngs(0)))
            raw = ckpt.restore_raw(step)
        finally:
            ckpt.close()
        params = raw["ema"] if use_ema and raw.get("ema") is not None else raw["params"]
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, _merge_pure(nnx.to_pure_dict(state), params, raw.get("rest") or {}))
        nnx.update(model, state)
        return cls(model, pipeline, config, seed=seed, num_steps=num_steps)

    def model(self) -> VLA:
        """The policy module (a fresh merge of the runner's weights)."""
        return nnx.merge(self._graphdef, self._state)

    def metadata(self) -> dict:
        """What the policy needs and returns (see :meth:`ObservationPipeline.metadata`)."""
        return self.pipeline.metadata()

    def sample_normalized(self, inputs: dict, rng: jax.Array, **sample_kwargs: Any) -> jax.Array:
        """Normalized actions ``[B, H, A]`` from model inputs (:meth:`ObservationPipeline.model_inputs`); jitted.
        ``sample_kwargs`` (arrays) go to the head's ``sample``."""
        return self._sample(self._state, inputs, rng, sample_kwargs)

    @property
    def plans(self) -> bool:
        """Whether the policy has a separate slow plan step (see :mod:`vlax.dual_rate`)."""
        return self._plan is not None

    def plan_normalized(self, inputs: dict) -> Any:
        """The policy's plan for model inputs (jitted); pass it on as ``sample_normalized(..., plan=plan)``."""
        if self._plan is None:
            raise ValueError("this policy has no plan step; sample_normalized runs it whole")
        return self._plan(self._state, inputs)

    def dual_rate(self, *, plan_every: int | None = None, asynchronous: bool = False) -> Any:
        """A :class:`vlax.dual_rate.DualRateExecutor` over this policy's plan and act steps (normalized actions
        ``[B, H, A]`` per act step); ``plan_every`` defaults to the policy's own."""
        from vlax.dual_rate import DualRateExecutor

        if self._plan is None:
            raise ValueError("this policy has no plan step to run at a lower rate")
        return DualRateExecutor(self.plan_normalized,
                                lambda inputs, plan, key: self.sample_normalized(inputs, key, plan=plan),
                                plan_every=plan_every or self.plan_every, asynchronous=asynchronous)

    def next_key(self) -> jax.Array:
        """A fresh key per call: ``fold_in(key(seed), call index)``."""
        key = jax.random.fold_in(self._key, self._calls)
        self._calls += 1
        return key

    def infer(self, raw: Mapping[str, Any], *, rng: jax.Array | None = None, **sample_kwargs: Any) -> np.ndarray:
        """Actions in the dataset's units: ``[H, A]`` for one observation (images ``[h, w, 3]``, state ``[S]``,
        prompt a string) or ``[B, H, A]`` for a batch (images ``[B, h, w, 3]``, state ``[B, S]``, B prompts)."""
        single = isinstance(raw.get("prompt"), (str, bytes))
        if single:
            raw = {"images": {k: np.asarray(v)[None] for k, v in raw["images"].items()},
                   "state": np.asarray(raw.get("state", np.zeros(0, np.float32)))[None], "prompt": [raw["prompt"]]}
        inputs = self.pipeline.model_inputs(raw)
        normalized = self.sample_normalized(inputs, self.next_key() if rng is None else rng, **sample_kwargs)
        actions = self.pipeline.actions(normalized)
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
