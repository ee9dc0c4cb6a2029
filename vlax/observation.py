"""The one path between the world and a policy: raw observations -> model inputs, model outputs -> actions.

Training (the data pipeline's batches), open-loop metrics, closed-loop evaluation and serving all build model
inputs through an :class:`ObservationPipeline`, so they cannot drift apart::

    pipeline = ObservationPipeline.from_checkpoint("runs/my_arm")
    inputs = pipeline.model_inputs({"images": {"top": frames}, "state": state, "prompt": ["pick up the cube"]})
    actions = pipeline.actions(policy.sample(inputs, rngs=key))     # [B, H, A] in the dataset's units

A raw observation (batched) is ``{"images": {camera: uint8 [B, h, w, 3]} (any size), "state": [B, S_data],
"prompt": B strings}``. Frames are resized with the training pipeline's own resize, the state is normalized with
the dataset's artifact and zero-padded to the policy's state dim, and the prompt is formatted with the policy's
template and tokenized with its tokenizer. The training data pipeline applies the same normalization (the same
float64 arithmetic in TensorFlow) and tokenizes with :meth:`ObservationPipeline.tokenize`, so one observation
gives bit-identical inputs on both paths (tested).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from vlax.data.normalization import NormalizationArtifact
from vlax.data.resize import check_resize_mode, padded_extent
from vlax.policy import PolicySpec
from vlax.prompts import get_prompt, tokenize_prompts
from vlax.tokenizers import Tokenizer, tokenizer_from_json

# How frames are resized: "tf" is the training pipeline's own op (bit-identical); "jax" the same antialiased
# bilinear kernel in JAX for processes that cannot import TensorFlow (it crashes beside Mesa EGL rendering),
# equal up to float rounding (at most 1 grey level).
RESIZE_BACKENDS = ("tf", "jax")


def resize_frames(frames: np.ndarray, size: tuple[int, int], backend: str = "tf",
                  mode: str = "stretch") -> np.ndarray:
    """``uint8 [B, h, w, 3]`` -> ``uint8 [B, H, W, 3]``, as the training pipeline resizes decoded frames
    (``mode``: ``"stretch"`` or ``"pad"``, see :mod:`vlax.data.resize`)."""
    frames = np.asarray(frames)
    check_resize_mode(mode)
    if frames.shape[1:3] == tuple(size):
        return frames.astype(np.uint8)
    if backend == "tf":
        from vlax.data.frame_transforms import decode_and_resize_image

        return np.asarray(decode_and_resize_image(frames.astype(np.uint8), size, mode))
    if backend == "jax":
        return np.asarray(_jax_resize(tuple(int(s) for s in size), frames.shape[1:3], mode)(frames))
    raise ValueError(f"resize backend {backend!r}; known: {list(RESIZE_BACKENDS)}")


@functools.lru_cache(maxsize=None)
def _jax_resize(size: tuple[int, int], frame_size: tuple[int, int], mode: str):
    import jax
    import jax.numpy as jnp

    inner = padded_extent(*frame_size, size) if mode == "pad" else size

    @jax.jit
    def resize(frames):
        shape = (frames.shape[0], *inner, frames.shape[-1])
        resized = jax.image.resize(frames.astype(jnp.float32), shape, method="bilinear", antialias=mode != "pad")
        resized = jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
        pads = ((0, 0), (size[0] - inner[0], 0), (size[1] - inner[1], 0), (0, 0))
        return jnp.pad(resized, pads)

    return resize


def _pad_last(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """Zero-pad the last axis to ``dim``; refuse to silently drop real dimensions."""
    if x.shape[-1] > dim:
        raise ValueError(f"{name} has {x.shape[-1]} dims but the policy takes {dim}; raise model.{name}_dim or "
                         "select fewer keys")
    if x.shape[-1] == dim:
        return x
    return np.concatenate([x, np.zeros((*x.shape[:-1], dim - x.shape[-1]), x.dtype)], axis=-1)


@dataclasses.dataclass
class ObservationPipeline:
    """Raw observation -> model inputs and normalized model outputs -> actions, for one policy.

    Attributes:
      spec: the policy's shapes and wiring (cameras, image size, state/action dims, horizon, text length).
      tokenizer: the policy's tokenizer.
      artifacts: normalization per training data source (dataset name -> artifact); raw inputs and returned
        actions use ``artifacts[dataset]``.
      prompt: the prompt template (a name of :mod:`vlax.prompts`, e.g. ``"pi0"``, or a string with
        ``{instruction}``).
      dataset: which source's units this pipeline speaks (default: the first source).
      resize_backend: ``"tf"`` (the training pipeline's op) or ``"jax"`` (see :data:`RESIZE_BACKENDS`).
    """

    spec: PolicySpec
    tokenizer: Tokenizer
    artifacts: Mapping[str, NormalizationArtifact]
    prompt: str = "plain"
    dataset: str | None = None
    resize_backend: str = "tf"

    def __post_init__(self):
        if not self.artifacts:
            raise ValueError("an ObservationPipeline needs the normalization artifact of at least one data source")
        self.artifacts = dict(self.artifacts)
        if self.dataset is None:
            self.dataset = next(iter(self.artifacts))
        if self.dataset not in self.artifacts:
            raise KeyError(f"dataset {self.dataset!r} has no normalization here; known: {sorted(self.artifacts)}")
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(f"resize_backend={self.resize_backend!r}; known: {list(RESIZE_BACKENDS)}")
        get_prompt(self.prompt)  # an unknown template is an error now, not at the first observation

    @property
    def artifact(self) -> NormalizationArtifact:
        return self.artifacts[self.dataset]

    def with_options(self, **changes: Any) -> "ObservationPipeline":
        """A copy with other options (e.g. ``dataset=`` or ``resize_backend="jax"``)."""
        return dataclasses.replace(self, **changes)

    # ---- the pieces, shared by every path -------------------------------------------------------------------------

    def tokenize(self, instructions: Sequence[str | bytes],
                 states: np.ndarray | None = None,
                 state_dims: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Prompt-formatted, tokenized, right-padded ``ids [B, L] int32`` and ``mask [B, L] bool``; ``states``
        (normalized ``[B, S]``) for templates that format the state (π0.5), of which only the first
        ``state_dims`` per example (default: the dataset's state dim) are real."""
        if states is not None and state_dims is None and "state" in self.artifact.keys:
            state_dims = [self.artifact.dim("state")] * len(states)
        return tokenize_prompts(self.tokenizer, self.prompt, instructions, self.spec.max_text_len, states,
                                state_dims)

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        """Raw ``[B, S_data]`` -> normalized, zero-padded ``float32 [B, S]``."""
        state = np.asarray(state, np.float32)
        if "state" in self.artifact.keys:
            state = self.artifact.normalize("state", state)
        elif state.shape[-1]:
            raise ValueError(f"the policy was trained without state, but the observation has {state.shape[-1]} "
                             "state values; send an empty state")
        return _pad_last(state, self.spec.state_dim, "state").astype(np.float32)

    def actions(self, normalized: Any) -> np.ndarray:
        """Normalized ``[..., H, A]`` (padded dims allowed) -> ``float32 [..., H, A_data]`` in the dataset's units."""
        return self.artifact.unnormalize("action", np.asarray(normalized, np.float32)).astype(np.float32)

    # ---- raw observations (inference, evaluation, serving) --------------------------------------------------------

    def model_inputs(self, raw: Mapping[str, Any]) -> dict:
        """Model inputs from a batched raw observation (see the module docstring)."""
        images = raw.get("images")
        if not isinstance(images, Mapping):
            raise KeyError(f"raw observation needs 'images': {{camera: uint8 [B, h, w, 3]}}; it has {sorted(raw)}")
        missing = [c for c in self.spec.cameras if c not in images]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}; it has {sorted(images)}; the policy takes "
                           f"{list(self.spec.cameras)}")
        prompts = raw.get("prompt")
        if prompts is None or isinstance(prompts, (str, bytes)):
            raise TypeError("raw observation needs 'prompt': a list of B instruction strings")
        size = (self.spec.image_size, self.spec.image_size)
        out_images = {}
        history = self.spec.obs_history
        shape = "[B, h, w, 3]" if history == 1 else f"[B, {history}, h, w, 3] (obs_history={history}, oldest first)"
        for camera in self.spec.cameras:
            frames = np.asarray(images[camera])
            if frames.ndim != (4 if history == 1 else 5) or frames.shape[-1] != 3 or frames.dtype != np.uint8 \
                    or (history > 1 and frames.shape[1] != history):
                raise ValueError(f"camera {camera!r}: frames must be uint8 {shape}, got {frames.dtype} "
                                 f"{list(frames.shape)}")
            if history == 1:
                out_images[camera] = resize_frames(frames, size, self.resize_backend, self.spec.image_resize)
            else:
                flat = resize_frames(frames.reshape(-1, *frames.shape[2:]), size, self.resize_backend,
                                     self.spec.image_resize)
                out_images[camera] = flat.reshape(*frames.shape[:2], *flat.shape[1:])
        empty = (len(prompts), 0) if history == 1 else (len(prompts), history, 0)
        state = np.asarray(raw.get("state", np.zeros(empty, np.float32)), np.float32)
        if state.ndim != (2 if history == 1 else 3) or (history > 1 and state.shape[1] != history):
            want = "[B, S]" if history == 1 else f"[B, {history}, S]"
            raise ValueError(f"state must be {want}, got shape {list(state.shape)}")
        if not np.all(np.isfinite(state)):
            raise ValueError("state has non-finite values (NaN or inf)")
        state = self.normalize_state(state)
        ids, mask = self.tokenize(list(prompts), state if history == 1 else state[:, -1])
        return {"images": out_images, "state": state, "text_ids": ids, "text_mask": mask}

    # ---- data-pipeline batches (training, open-loop metrics) -----------------------------------------------------

    def from_batch(self, batch: Mapping[str, Any]) -> dict:
        """``{"obs": model inputs, "actions": [B, H, A], "action_mask": [B, H, A]}`` from a pipeline batch
        (``vlax.data`` schema; images already resized and state already normalized by the pipeline)."""
        observation = batch["observation"]
        images = {}
        for camera in self.spec.cameras:
            key = f"image_{camera}"
            if key not in observation:
                raise KeyError(f"batch has no {key!r}; it has {sorted(k for k in observation if k.startswith('image_'))}")
            img = np.asarray(observation[key])
            images[camera] = self._window(img, 5)
        state = self._window(np.asarray(observation["state"], np.float32), 3)
        task = batch["task"]
        if "text_ids" in task:  # tokenized by the pipeline with this object's tokenize
            ids, mask = np.asarray(task["text_ids"], np.int32), np.asarray(task["text_mask"], bool)
        else:
            ids, mask = self.tokenize(list(task["language_instruction"]), state if state.ndim == 2 else state[:, -1])
        obs = {"images": images, "state": _pad_last(state, self.spec.state_dim, "state"), "text_ids": ids,
               "text_mask": mask}
        history = self.spec.obs_history
        if history > 1 and "timestep_pad_mask" in observation:  # False: a window step before the episode start
            obs["timestep_pad_mask"] = self._window(np.asarray(observation["timestep_pad_mask"], bool), 2)
        actions = np.asarray(batch["action"], np.float32)
        action_mask = np.asarray(batch["action_mask"], bool)
        if actions.ndim == 4:  # [B, W, H, A]
            # One observation: the actions that follow it. A history of T: the actions from its oldest step, as
            # Diffusion Policy trains (the chunk's index T - 1 is the current step), or from each of its T steps.
            if history > 1 and self.spec.action_chunks == "every_step":
                actions, action_mask = actions[:, -history:], action_mask[:, -history:]
            else:
                step = -1 if history == 1 else -history
                actions, action_mask = actions[:, step], action_mask[:, step]
        elif history > 1 and self.spec.action_chunks == "every_step":
            raise ValueError(f"the policy trains a chunk per window step (action_chunks='every_step') but the batch's "
                             f"actions {list(actions.shape)} have no window axis")
        if actions.shape[-2] < self.spec.horizon:
            raise ValueError(f"batch has an action horizon of {actions.shape[-2]}, the policy predicts "
                             f"{self.spec.horizon}")
        actions = _pad_last(actions[..., :self.spec.horizon, :], self.spec.action_dim, "action")
        action_mask = _pad_last(action_mask[..., :self.spec.horizon, :], self.spec.action_dim, "action")
        return {"obs": obs, "actions": actions, "action_mask": action_mask}

    def _window(self, x: np.ndarray, windowed_ndim: int) -> np.ndarray:
        """A pipeline window ``[B, W, ...]`` -> the last step (one observation) or the last ``obs_history`` steps."""
        if x.ndim != windowed_ndim:
            if self.spec.obs_history > 1:
                raise ValueError(f"the policy sees {self.spec.obs_history} observation steps but the batch has no "
                                 f"window axis (shape {list(x.shape)}); set data.obs_history={self.spec.obs_history}")
            return x
        if self.spec.obs_history == 1:
            return x[:, -1]
        if x.shape[1] < self.spec.obs_history:
            raise ValueError(f"the batch window has {x.shape[1]} steps, the policy sees {self.spec.obs_history}; "
                             f"set data.obs_history={self.spec.obs_history}")
        return x[:, -self.spec.obs_history:]

    # ---- description, saving, loading -----------------------------------------------------------------------------

    def metadata(self) -> dict:
        """What a client needs to know: cameras and image sizes, state/action dims, horizon, normalization."""
        artifact = self.artifact
        return {
            "cameras": list(self.spec.cameras),
            "image_size": [self.spec.image_size, self.spec.image_size],
            "state_dim": artifact.dim("state") if "state" in artifact.keys else 0,
            "action_dim": artifact.dim("action"),
            "action_horizon": self.spec.horizon,
            "max_text_len": self.spec.max_text_len,
            "dataset": self.dataset,
            "datasets": sorted(self.artifacts),
            "normalization_hash": artifact.artifact_hash,
        }

    def to_json(self) -> dict:
        """The ``policy`` checkpoint item (the tokenizer and artifacts are items of their own)."""
        return {"spec": {**dataclasses.asdict(self.spec), "cameras": list(self.spec.cameras)},
                "prompt": self.prompt, "dataset": self.dataset}

    @classmethod
    def from_json(cls, policy: Mapping[str, Any], tokenizer: Mapping[str, Any], normalization: Mapping[str, Any],
                  **options: Any) -> "ObservationPipeline":
        spec = dict(policy["spec"])
        spec["cameras"] = tuple(spec["cameras"])
        artifacts = read_artifacts(normalization)
        return cls(PolicySpec(**spec), tokenizer_from_json(dict(tokenizer)), artifacts,
                   prompt=policy.get("prompt", "plain"),
                   dataset=options.pop("dataset", None) or policy.get("dataset"), **options)

    @classmethod
    def from_checkpoint(cls, path: Any, *, step: int | None = None, **options: Any) -> "ObservationPipeline":
        """The pipeline a checkpoint (a training workdir or its ``checkpoints`` directory) was trained with."""
        from vlax.checkpoint import Checkpointer, checkpoints_dir

        ckpt = Checkpointer(checkpoints_dir(path))
        try:
            step = ckpt.latest_step if step is None else step
            if step is None:
                raise FileNotFoundError(f"no checkpoint under {path}")
            return cls.from_checkpoint_items(ckpt, step, **options)
        finally:
            ckpt.close()

    @classmethod
    def from_checkpoint_items(cls, ckpt: Any, step: int, **options: Any) -> "ObservationPipeline":
        policy = ckpt.read_json(step, "policy")
        if policy is None:  # checkpoints written before the policy item: derive it from the config
            from vlax.build import policy_spec

            spec = policy_spec(ckpt.read_json(step, "config"))
            policy = {"spec": {**dataclasses.asdict(spec), "cameras": list(spec.cameras)}}
        return cls.from_json(policy, ckpt.read_json(step, "tokenizer"), ckpt.read_json(step, "normalization"),
                             **options)


def read_artifacts(normalization: Mapping[str, Any]) -> dict[str, NormalizationArtifact]:
    """The ``normalization`` checkpoint item: ``{dataset name: artifact dict}`` (or one artifact dict)."""
    if "type" in normalization and "stats" in normalization:  # a single artifact
        artifact = NormalizationArtifact.from_dict(dict(normalization))
        return {artifact.dataset_name or "dataset": artifact}
    return {name: NormalizationArtifact.from_dict(dict(a)) for name, a in normalization.items()}
