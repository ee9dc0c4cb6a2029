"""Tiny policy checkpoints for the serving tests (no training): a freshly initialised model, a word tokenizer and
a normalization artifact, written the way the trainer writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from train_helpers import tiny_config
from vlax.build import build_policy, policy_spec
from vlax.checkpoint import Checkpointer
from vlax.data.normalization import NormalizationArtifact
from vlax.observation import ObservationPipeline
from vlax.tokenizers import WordTokenizer

PROMPTS = ("open the drawer", "close the window", "slow")
CAMERA, SIDE, STATE_DIM, ACTION_DIM = "corner2", 32, 4, 4


def artifact() -> NormalizationArtifact:
    def stats(lo, hi, dim):
        return {"mean": [0.0] * dim, "std": [1.0] * dim, "min": [lo] * dim, "max": [hi] * dim, "q01": [lo] * dim,
                "q99": [hi] * dim, "count": 10, "num_trajectories": 1}

    return NormalizationArtifact(type="bounds", keys=("action", "state"),
                                 masks={"action": (True,) * ACTION_DIM, "state": (True,) * STATE_DIM},
                                 padded_dims={"action": ACTION_DIM, "state": STATE_DIM},
                                 stats={"action": stats(-2.0, 2.0, ACTION_DIM), "state": stats(-1.0, 1.0, STATE_DIM)},
                                 dataset_hash="serve-test", dataset_name="serve_test")


def make_checkpoint(workdir: Path, head: str = "flow") -> Path:
    """A loadable checkpoint of an untrained tiny policy under ``workdir``."""
    c = tiny_config(workdir, workdir / "no_data")
    c.model.head = head
    spec = policy_spec(c)
    tokenizer = WordTokenizer.build(PROMPTS)
    model = build_policy(c.model, spec, tokenizer.vocab_size, nnx.Rngs(0))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"params": nnx.to_pure_dict(params)}
    rest = nnx.to_pure_dict(rest)
    if rest:
        state["rest"] = rest
    art = artifact()
    pipeline = ObservationPipeline(spec, tokenizer, {art.dataset_name: art})
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(1, state, force=True, config=json.loads(c.to_json_best_effort()), normalization=art.to_dict(),
              tokenizer=tokenizer.to_json(), policy=pipeline.to_json())
    ckpt.wait()
    ckpt.close()
    return workdir


def observation(seed: int = 0, prompt: str = "open the drawer", side: int = SIDE) -> dict:
    """An openpi-style request (LIBERO layout)."""
    rs = np.random.RandomState(seed)
    return {"observation/image": rs.randint(0, 256, (side, side, 3)).astype(np.uint8),
            "observation/state": rs.uniform(-0.5, 0.5, STATE_DIM).astype(np.float32), "prompt": prompt}


def raw(obs: dict) -> dict:
    """The same observation as PolicyRunner.infer takes it."""
    return {"images": {CAMERA: obs["observation/image"]}, "state": obs["observation/state"], "prompt": obs["prompt"]}
