"""Run a trained policy: load it from its checkpoint and map raw observations to actions.

Everything the policy was trained with comes from the checkpoint (policy spec, normalization, tokenizer, prompt
template), and raw observations go through the one :class:`~vlax.observation.ObservationPipeline`::

    runner = PolicyRunner.from_checkpoint("runs/flow")
    actions = runner.infer({"images": {"corner2": frame}, "state": state, "prompt": "push the puck to the goal"})
    # actions: [H, A] in the dataset's units (or [B, H, A] for batched inputs with a list of B prompts); fewer
    # than H for a policy whose executed() hook keeps part of the chunk (below)

A policy that sees an observation history (``PolicySpec.obs_history = T > 1``) acts step by step through a
session, which keeps the last T steps (an episode's start padded with its first step, see
:mod:`vlax.observation_history`)::

    session = runner.session()
    session.reset()                                   # at every episode start
    actions = session.infer({"images": {"corner2": frame}, "state": state, "prompt": "push the puck"})

``infer`` also takes whole windows (images ``[B, T, h, w, 3]``, state ``[B, T, S]``, oldest first). The returned
actions are the ones the policy executes from now on: a policy with an ``executed(chunk)`` hook (Diffusion Policy:
``n_action_steps`` from index ``T - 1``; RoboFlamingo: from index ``T - 1``) gets it applied; ``sample_normalized``
keeps the whole predicted chunk ``[B, H, A]``.
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
from vlax.observation_history import PAD_MASK_KEY, ObservationHistory, reads_timestep_pad_mask
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
        # The policy's own choice of which chunk actions run (Diffusion Policy, RoboFlamingo: from index T - 1).
        # It reads only static attributes (spec, n_action_steps), so the module given here serves every call.
        hook = getattr(model, "executed", None)
        self._executed = hook if callable(hook) else None
        self.reads_pad_mask = reads_timestep_pad_mask(model)
        horizon = int(pipeline.spec.horizon)
        probe = np.arange(horizon)[None, :, None]
        steps = np.asarray(self.executed(probe))
        if steps.ndim != 3 or steps.shape[0] != 1 or steps.shape[1] < 1:
            raise ValueError(f"the policy's executed() hook maps a chunk [1, {horizon}, 1] to {list(steps.shape)}; "
                             "it must return [B, n, A] with n >= 1")
        # Which chunk indices run (for metadata, queues and the ensembler): the hook applied to 0 .. H - 1.
        self.executed_steps = tuple(int(i) for i in steps[0, :, 0])

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

    @property
    def executed_horizon(self) -> int:
        """Actions returned per call (``H`` unless the policy's ``executed`` hook keeps fewer)."""
        return len(self.executed_steps)

    def executed(self, chunk: Any) -> Any:
        """The actions of a predicted chunk ``[B, H, A]`` that the policy executes from the current step,
        ``[B, n, A]``: its ``executed`` hook when it has one, else the whole chunk."""
        return chunk if self._executed is None else self._executed(chunk)

    def session(self, *, pad_mask: bool | None = None) -> "PolicySession":
        """Step-by-step inference with the policy's observation history (see :class:`PolicySession`).

        ``pad_mask``: put the history's ``timestep_pad_mask [B, T]`` into the model inputs (Octo's padding of an
        episode's first steps); default: when the policy declares ``reads_timestep_pad_mask``.
        """
        return PolicySession(self, pad_mask=pad_mask)

    def next_key(self) -> jax.Array:
        """A fresh key per call: ``fold_in(key(seed), call index)``."""
        key = jax.random.fold_in(self._key, self._calls)
        self._calls += 1
        return key

    def infer(self, raw: Mapping[str, Any], *, rng: jax.Array | None = None, **sample_kwargs: Any) -> np.ndarray:
        """Actions in the dataset's units: ``[n, A]`` for one observation (images ``[h, w, 3]``, state ``[S]``,
        prompt a string) or ``[B, n, A]`` for a batch (images ``[B, h, w, 3]``, state ``[B, S]``, B prompts);
        ``n`` is :attr:`executed_horizon` (``H`` unless the policy's ``executed`` hook keeps fewer).

        A policy with ``obs_history = T > 1`` takes windows here (images ``[T, h, w, 3]`` / ``[B, T, h, w, 3]``,
        state ``[T, S]`` / ``[B, T, S]``, oldest first); one step at a time goes through :meth:`session`."""
        single, raw = self._batched(raw)
        self._check_window(raw)
        inputs = self.pipeline.model_inputs(raw)
        return self._act(inputs, single, rng, sample_kwargs)

    def _batched(self, raw: Mapping[str, Any], steps: int | None = None) -> tuple[bool, Mapping[str, Any]]:
        """``(single, raw with a batch axis)``: one observation (a prompt string) gains a batch of one."""
        single = isinstance(raw.get("prompt"), (str, bytes))
        if single:
            history = self.spec.obs_history if steps is None else steps
            empty = np.zeros((0,) if history == 1 else (history, 0), np.float32)
            raw = {"images": {k: np.asarray(v)[None] for k, v in raw["images"].items()},
                   "state": np.asarray(raw.get("state", empty))[None], "prompt": [raw["prompt"]]}
        return single, raw

    def _check_window(self, raw: Mapping[str, Any]) -> None:
        """One clear error when a history policy is handed a single observation step instead of a window."""
        history = self.spec.obs_history
        images = raw.get("images")
        if history == 1 or not isinstance(images, Mapping):
            return
        for camera in self.spec.cameras:
            frames = images.get(camera)
            if frames is not None and np.ndim(frames) == 4:
                raise ValueError(
                    f"this policy sees obs_history={history} observation steps, but camera {camera!r} holds one step "
                    f"{list(np.shape(frames))}; act step by step with runner.session() (it keeps the last {history} "
                    f"steps and pads an episode's start with its first), or pass windows: images "
                    f"[B, {history}, h, w, 3] and state [B, {history}, S], oldest first")

    def _act(self, inputs: dict, single: bool, rng: jax.Array | None, sample_kwargs: dict) -> np.ndarray:
        normalized = self.sample_normalized(inputs, self.next_key() if rng is None else rng, **sample_kwargs)
        actions = self.pipeline.actions(self.executed(normalized))
        return actions[0] if single else actions


class PolicySession:
    """One episode at a time of a :class:`PolicyRunner`: each call brings one observation step, the session keeps
    the policy's window of the last ``obs_history`` steps (:class:`vlax.observation_history.ObservationHistory`).

    Call :meth:`reset` at every episode start. A step is a raw observation as :meth:`PolicyRunner.infer` takes one
    with a history of 1: images ``[h, w, 3]``, state ``[S]``, a prompt string (or a batch: ``[B, h, w, 3]``,
    ``[B, S]``, B prompts, one episode per row). With ``obs_history = 1`` a session is exactly ``runner.infer``.
    """

    def __init__(self, runner: PolicyRunner, *, pad_mask: bool | None = None):
        self.runner = runner
        self.history = ObservationHistory(runner.spec.obs_history)
        self.pad_mask = runner.reads_pad_mask if pad_mask is None else bool(pad_mask)

    def reset(self) -> None:
        """A new episode: the next step fills the window with copies of itself."""
        self.history.reset()

    def observe(self, raw_step: Mapping[str, Any]) -> None:
        """Record a step without acting on it (the control steps between policy calls)."""
        self.history.push(self._step(raw_step)[1])

    def model_inputs(self, raw_step: Mapping[str, Any]) -> dict:
        """Record a step and return the model inputs of the window ending with it (batched)."""
        return self._inputs(raw_step)[1]

    def infer(self, raw_step: Mapping[str, Any], *, rng: jax.Array | None = None,
              **sample_kwargs: Any) -> np.ndarray:
        """Record a step and act on the window ending with it: ``[n, A]`` (``[B, n, A]`` for a batched step), as
        :meth:`PolicyRunner.infer`."""
        single, inputs = self._inputs(raw_step)
        return self.runner._act(inputs, single, rng, sample_kwargs)

    def _step(self, raw_step: Mapping[str, Any]) -> tuple[bool, Mapping[str, Any]]:
        single, step = self.runner._batched(raw_step, steps=1)
        if self.history.steps > 1:
            for camera, frames in step["images"].items():
                if np.ndim(frames) != 4:
                    raise ValueError(f"camera {camera!r}: a session takes one observation step, an image [h, w, 3] "
                                     f"(or [B, h, w, 3] with B prompts), got shape {list(np.shape(frames))}")
        return single, step

    def _inputs(self, raw_step: Mapping[str, Any]) -> tuple[bool, dict]:
        single, step = self._step(raw_step)
        before = self.history.snapshot()
        try:
            inputs = self.runner.pipeline.model_inputs(self.history.push(step))
        except Exception:
            self.history.restore(before)  # a rejected observation does not enter the window
            raise
        if self.pad_mask:
            inputs[PAD_MASK_KEY] = self.history.pad_mask()
        return single, inputs


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
