"""The served policy: requests -> validated model inputs -> one jitted sampling call for one or several requests.

Sampling a batch of ``B`` requests runs the policy's own single-example sampling under ``jax.vmap`` with one key
per request, so a request's actions do not depend on which other requests it was batched with (up to float
reassociation); a lone unguided request goes through :meth:`PolicyRunner.sample_normalized`, exactly the
in-process path. Batch sizes are padded up to a power of two and every size (and the guided variant when
real-time chunking is on) is compiled by :meth:`ServedPolicy.warmup` before the server accepts connections.

A policy with a slow plan step (Helix's S2, :mod:`vlax.dual_rate`) is served per connection by a
:class:`PlanSession`: every request gets the act step with the connection's latest plan, and the plan step runs
every ``plan_every`` requests, by default on a background thread so that a slow plan never delays a reply.

A policy that sees an observation history (``obs_history = T > 1``) keeps one
:class:`~vlax.observation_history.ObservationHistory` per connection (:class:`Connection`): each request brings one
observation step, which :meth:`ServedPolicy.prepare` records in that connection's window and turns into model
inputs for the window ending with it, so micro-batched requests of different connections each carry their own
window. A new connection starts an empty history (its first step fills the window); the control frame
``{"__ctrl__": "episode_start"}`` (what some openpi clients' ``episode_start()`` sends; ``"reset"`` is accepted too)
resets the connection's history and plan and is answered ``{"__ack__": <name>}``; ``"episode_end"`` is acknowledged.

Replies carry the actions the policy executes from the current step (:meth:`PolicyRunner.executed`: the whole
chunk, or the policy's ``executed`` slice, e.g. Diffusion Policy's ``n_action_steps`` from index ``T - 1``).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vlax
from vlax.observation_history import PAD_MASK_KEY, ObservationHistory
from vlax.serve import keys
from vlax.serve import rtc as rtc_lib
from vlax.serve.codec import ProtocolError, unpackb
from vlax.serve.keys import RequestError

CONTROL_KEY, ACK_KEY = "__ctrl__", "__ack__"
RESET_CONTROLS = ("episode_start", "reset")  # a new episode: the connection's history and plan start afresh
CONTROLS = (*RESET_CONTROLS, "episode_end")


@dataclasses.dataclass
class Prepared:
    """One validated request: model inputs for a batch of one, its key, and its RTC guide if any."""

    inputs: dict                       # model inputs, batch of 1
    key: jax.Array
    prompt: str
    guide: tuple[np.ndarray, np.ndarray] | None = None  # normalized target [H, A], weights [H, A]


def _buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class ServedPolicy:
    """A :class:`vlax.inference.PolicyRunner` behind the request checks of :mod:`vlax.serve.keys`.

    Args:
      runner: the loaded policy (``.pipeline``, ``.model()``, ``.sample_normalized``, ``.next_key()``).
      rtc: accept real-time chunking requests (flow and diffusion heads only); compiles the guided sampler.
      delay_steps: the inference delay assumed when a request names none.
      max_guidance: the clip ``beta`` of the guidance weight.
      max_batch: the most requests sampled in one call (1: no micro-batching).
      default_prompt: used when a request has no ``prompt``.
      plan_every: requests between plan steps of a dual-rate policy (None: the policy's own period).
      plan_async: run those plan steps on a background thread (False: before the request that needs one).
    """

    def __init__(self, runner: Any, *, rtc: bool = False, delay_steps: int = 0,
                 max_guidance: float = rtc_lib.DEFAULT_MAX_GUIDANCE, max_batch: int = 1,
                 default_prompt: str | None = None, plan_every: int | None = None, plan_async: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.runner, self.pipeline = runner, runner.pipeline
        self.spec = self.pipeline.spec
        self.artifact = self.pipeline.artifact
        self.state_dim = self.artifact.dim("state") if "state" in self.artifact.keys else 0
        self.action_dim = self.artifact.dim("action")
        self.rtc, self.delay_steps, self.max_guidance = bool(rtc), int(delay_steps), float(max_guidance)
        self.max_batch, self.default_prompt = int(max_batch), default_prompt
        self.buckets = _buckets(self.max_batch)
        if plan_every is not None and plan_every < 1:
            raise ValueError(f"plan_every must be >= 1 (or None: the policy's own period), got {plan_every}")
        self.plan_every = (plan_every or runner.plan_every) if getattr(runner, "plans", False) else None
        self.plan_async = bool(plan_async)
        model = runner.model()
        self.head_name = type(model.head).__name__
        if self.rtc and "guide_actions" not in inspect.signature(model.head.sample).parameters:
            raise ValueError(f"real-time chunking needs a flow or diffusion head; this policy's head is "
                             f"{self.head_name}")
        if self.rtc:
            rtc_lib.check_schedule(self.spec.horizon, self.delay_steps, max(self.delay_steps, 1))
        self.executed_steps = tuple(getattr(runner, "executed_steps", range(self.spec.horizon)))
        if self.rtc and self.executed_steps[0] != 0:
            # The guide aligns the previous chunk's remaining actions with the start of the predicted chunk, which
            # such a policy does not execute.
            raise ValueError(f"real-time chunking needs a policy that executes its chunk from index 0; this one "
                             f"executes from index {self.executed_steps[0]} (obs_history={self.spec.obs_history}); "
                             "serve it without --rtc")
        self.pad_mask = bool(getattr(runner, "reads_pad_mask", False))
        graphdef, state = nnx.split(model)
        self._state = state
        self._batched = self._compile(graphdef, guided=False)
        self._guided = self._compile(graphdef, guided=True) if self.rtc else None
        self._key_lock = threading.Lock()

    def _compile(self, graphdef: Any, *, guided: bool):
        max_guidance = self.max_guidance

        @jax.jit
        def sample(state, inputs, keys_, target, weights):
            model = nnx.merge(graphdef, state)

            def one(inp, key, tgt, w):
                inp = jax.tree.map(lambda a: a[None], inp)
                extra = dict(guide_actions=tgt[None], guide_weights=w[None], max_guidance=max_guidance) \
                    if guided else {}
                ctx = model.context(inp)
                return model.head.sample(ctx, rngs=key, lm=model.backbone, **extra)[0]

            return jax.vmap(one)(inputs, keys_, target, weights)

        return sample

    # ---- requests --------------------------------------------------------------------------------------------------

    def metadata(self) -> dict:
        """The first frame a client receives: what the policy needs and returns."""
        meta = dict(self.runner.metadata())
        meta.update({
            "vlax_version": getattr(vlax, "__version__", "0.1.0"),
            "cameras": {c: [self.spec.image_size, self.spec.image_size, 3] for c in self.spec.cameras},
            "state_dim": self.state_dim, "action_dim": self.action_dim,
            "action_horizon": len(self.executed_steps),  # the actions of each reply
            "chunk_horizon": self.spec.horizon, "executed_from": self.executed_steps[0],
            "obs_history": self.spec.obs_history, "controls": list(CONTROLS),
            "head": self.head_name, "observation_keys": keys.key_table(self.spec.cameras),
            "rtc": self.rtc, "delay_steps": self.delay_steps, "max_batch": self.max_batch,
            "plan_every": self.plan_every,
        })
        return meta

    def next_key(self) -> jax.Array:
        with self._key_lock:
            return self.runner.next_key()

    def decode(self, message: bytes) -> Mapping[str, Any]:
        try:
            request = unpackb(message)
        except ProtocolError as e:
            raise RequestError(str(e)) from None
        if not isinstance(request, Mapping):
            raise RequestError(f"a request must be a msgpack map, got {type(request).__name__}")
        return request

    def prepare(self, request: Mapping[str, Any] | bytes, key: jax.Array | None = None,
                history: ObservationHistory | None = None) -> Prepared:
        """Validate a request (a decoded map, or the raw message) and build its model inputs.

        A policy with ``obs_history > 1`` needs the connection's ``history``: the request's observation step is
        recorded there and the inputs are the window ending with it (a rejected request leaves it unchanged)."""
        if isinstance(request, (bytes, bytearray, memoryview)):
            request = self.decode(request)
        if CONTROL_KEY in request:
            raise RequestError(f"{CONTROL_KEY!r} is a control frame, not an observation; send it on a connection "
                               "(the server answers it) or call ServedPolicy.control")
        raw = keys.parse_observation(request, cameras=self.spec.cameras, state_dim=self.state_dim,
                                     default_prompt=self.default_prompt)
        guide = None
        rtc_inputs = keys.parse_rtc(request, horizon=self.spec.horizon, action_dim=self.action_dim,
                                    default_delay=self.delay_steps)
        if rtc_inputs is not None:
            if not self.rtc:
                raise RequestError(f"{keys.PREV_ACTIONS} sent, but this server runs without real-time chunking "
                                   "(start it with --rtc)")
            guide = self._guide(*rtc_inputs)
        batched = {"images": {c: v[None] for c, v in raw["images"].items()}, "state": raw["state"][None],
                   "prompt": [raw["prompt"]]}
        if self.spec.obs_history > 1 and history is None:
            raise ValueError(f"this policy sees obs_history={self.spec.obs_history} observation steps; prepare each "
                             "request with its connection's history: prepare(request, history=connection.history) "
                             "with connection = policy.connection() per client")
        before = None if history is None else history.snapshot()
        try:
            if history is not None:
                try:
                    batched = history.push(batched)
                except ValueError as e:
                    raise ValueError(f"{e}; a client starts a new episode with the control frame "
                                     f"{{{CONTROL_KEY!r}: 'episode_start'}}") from None
            inputs = self.pipeline.model_inputs(batched)
        except (KeyError, TypeError, ValueError) as e:
            if history is not None:
                history.restore(before)
            raise RequestError(str(e).strip("'\"")) from None
        if self.pad_mask and history is not None:
            inputs[PAD_MASK_KEY] = history.pad_mask()
        return Prepared(inputs=inputs, key=self.next_key() if key is None else key, prompt=raw["prompt"],
                        guide=guide)

    def control(self, request: Mapping[str, Any], connection: "Connection | None" = None) -> dict:
        """Answer a control frame ``{"__ctrl__": name}``: ``episode_start`` / ``reset`` reset the connection's
        history and plan, ``episode_end`` is acknowledged; the reply is ``{"__ack__": name}``."""
        name = request.get(CONTROL_KEY)
        if isinstance(name, bytes):
            name = name.decode("utf-8", errors="replace")
        if not isinstance(name, str) or name not in CONTROLS:
            raise RequestError(f"unknown control {name!r}; send {CONTROL_KEY!r} as one of {list(CONTROLS)}")
        if name in RESET_CONTROLS and connection is not None:
            connection.reset()
        return {ACK_KEY: name}

    def _guide(self, remaining: np.ndarray, delay: int) -> tuple[np.ndarray, np.ndarray]:
        h, a_model = self.spec.horizon, self.spec.action_dim
        normalized = self.artifact.normalize("action", remaining)
        padded = np.zeros((normalized.shape[0], a_model), np.float32)
        padded[:, :normalized.shape[1]] = normalized
        try:
            target, weights = rtc_lib.guide_from_remaining(padded, h, delay)
        except ValueError as e:
            raise RequestError(str(e)) from None
        dims = np.zeros(a_model, np.float32)
        dims[:self.action_dim] = 1.0  # padded action dimensions are not guided
        return target, weights[:, None] * dims[None, :]

    # ---- sampling --------------------------------------------------------------------------------------------------

    def infer_many(self, batch: Sequence[Prepared]) -> list[np.ndarray]:
        """Actions ``[H, A]`` in the dataset's units for each request (guided and unguided ones may mix)."""
        out: list[np.ndarray | None] = [None] * len(batch)
        for guided in (False, True):
            idx = [i for i, p in enumerate(batch) if (p.guide is not None) == guided]
            for start in range(0, len(idx), self.max_batch):
                part = idx[start:start + self.max_batch]
                for i, actions in zip(part, self._sample([batch[i] for i in part], guided)):
                    out[i] = actions
        return out  # type: ignore[return-value]

    def _sample(self, batch: Sequence[Prepared], guided: bool) -> np.ndarray:
        n = len(batch)
        if n == 1 and not guided:
            normalized = self.runner.sample_normalized(batch[0].inputs, batch[0].key)
            return self.pipeline.actions(self._executed(normalized))
        size = next(b for b in self.buckets if b >= n)
        padded = list(batch) + [batch[-1]] * (size - n)
        inputs = jax.tree.map(lambda *xs: np.concatenate(xs, 0), *[p.inputs for p in padded])
        keys_ = jnp.stack([p.key for p in padded])
        h, a = self.spec.horizon, self.spec.action_dim
        if guided:
            target = np.stack([p.guide[0] for p in padded])
            weights = np.stack([p.guide[1] for p in padded])
            fn = self._guided
        else:
            target = np.zeros((size, h, a), np.float32)
            weights = np.zeros((size, h, a), np.float32)
            fn = self._batched
        normalized = fn(self._state, inputs, keys_, target, weights)
        return self.pipeline.actions(self._executed(np.asarray(normalized)[:n]))

    def _executed(self, normalized: Any) -> Any:
        """The chunk actions the policy executes (the runner's hook; a runner without one returns the chunk)."""
        hook = getattr(self.runner, "executed", None)
        return normalized if hook is None else hook(normalized)

    def session(self) -> "PlanSession | None":
        """A connection's dual-rate state, or None for a policy without a plan step."""
        return None if self.plan_every is None else PlanSession(self)

    def connection(self) -> "Connection":
        """The state of one client connection: its observation history and its plan (each only when needed)."""
        return Connection(self)

    def warmup(self, image_shape: tuple[int, int] | None = None) -> float:
        """Compile every batch size (and the guided sampler) on a blank observation; returns the seconds taken."""
        started = time.perf_counter()
        side = self.spec.image_size
        h, w = image_shape or (side, side)
        request = {f"observation/{c}": np.zeros((h, w, 3), np.uint8) for c in self.spec.cameras}
        request.update({"observation/state": np.zeros(self.state_dim, np.float32), "prompt": "warm up"})
        history = ObservationHistory(self.spec.obs_history) if self.spec.obs_history > 1 else None
        blank = self.prepare(request, key=jax.random.key(0), history=history)
        for size in self.buckets if self.plan_every is None else ():  # sessions serve dual-rate policies
            np.asarray(self._sample([blank] * size, False))
        if self.rtc:
            s = self.spec.horizon - max(self.delay_steps, 1)
            remaining = np.zeros((self.spec.horizon - s, self.action_dim), np.float32)
            guided = dataclasses.replace(blank, guide=self._guide(remaining, self.delay_steps))
            for size in self.buckets:
                np.asarray(self._sample([guided] * size, True))
        if self.plan_every is not None:  # the plan step and the act step given a plan
            session = PlanSession(self, asynchronous=False)
            session.infer(blank)
            session.close()
        return time.perf_counter() - started


class PlanSession:
    """One connection of a dual-rate policy: the act step for every request with the latest plan, the plan step
    every ``plan_every`` requests (see :class:`vlax.dual_rate.DualRateExecutor`)."""

    def __init__(self, policy: ServedPolicy, asynchronous: bool | None = None):
        self.policy = policy
        self.executor = policy.runner.dual_rate(
            plan_every=policy.plan_every, asynchronous=policy.plan_async if asynchronous is None else asynchronous)

    def infer(self, prepared: Prepared) -> np.ndarray:
        """Actions ``[H, A]`` in the dataset's units for one request."""
        if prepared.guide is not None:
            raise RequestError("real-time chunking is not available for a policy with a plan step; send requests "
                               "without prev_actions")
        normalized = self.executor.act(prepared.inputs, prepared.key)
        return self.policy.pipeline.actions(self.policy._executed(np.asarray(normalized)))[0]

    @property
    def stats(self) -> Any:
        return self.executor.stats

    def close(self) -> None:
        self.executor.close()


class Connection:
    """One client connection: the observation history of a policy with ``obs_history > 1`` (None otherwise) and
    the :class:`PlanSession` of a dual-rate policy (None otherwise). Requests of one connection arrive in lockstep,
    so its history records them in order."""

    def __init__(self, policy: ServedPolicy, asynchronous: bool | None = None):
        self.history = ObservationHistory(policy.spec.obs_history) if policy.spec.obs_history > 1 else None
        self.plan = None if policy.plan_every is None else PlanSession(policy, asynchronous)

    def reset(self) -> None:
        """A new episode: an empty history (the next step fills the window) and no plan."""
        if self.history is not None:
            self.history.reset()
        if self.plan is not None:
            self.plan.executor.reset()

    def close(self) -> None:
        if self.plan is not None:
            self.plan.close()
