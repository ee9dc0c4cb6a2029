"""Fit a FAST action tokenizer on a LeRobot dataset's normalized action chunks and write it as one json file.

    python -m experiments.fit_fast_tokenizer --dataset=tests/fixtures/lerobot_ds --horizon=8 \\
        --out=/tmp/fast.json [--vocab_size=1024 --scale=10 --normalization=bounds]

Every window of ``horizon`` consecutive actions inside an episode is one chunk; actions are normalized with the
dataset's own statistics (``bounds``: q01/q99 -> [-1, 1], π0-FAST's choice). Prints the compression: mean FAST
tokens per chunk against the ``horizon * action_dim`` numbers of the chunk. A config uses the file with
``c.model.head = "fast"`` and ``c.model.head_kwargs.tokenizer = "/tmp/fast.json"`` (same ``horizon``).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from vlax.action_tokens import FastTokenizer
from vlax.data.lerobot_v3 import LeRobotSource
from vlax.data.normalization import NORMALIZATION_TYPES, NormalizationArtifact, compute_statistics


def lerobot_action_chunks(path: str, horizon: int, normalization: str = "bounds") -> np.ndarray:
    """Normalized action chunks ``[N, horizon, A]``: every full window of every episode of the dataset at ``path``."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if normalization not in NORMALIZATION_TYPES:
        raise ValueError(f"unknown normalization {normalization!r}; use one of {NORMALIZATION_TYPES}")
    source = LeRobotSource(path, image_keys={}, state_key=None)  # actions only: no video is decoded
    actions = [np.asarray(source.load_episode(i)["action"], np.float64) for i in range(len(source.episodes))]
    stats = compute_statistics({"action": actions})
    dim = len(stats["action"]["mean"])
    artifact = NormalizationArtifact(type=normalization, keys=("action",), masks={"action": (True,) * dim},
                                     padded_dims={"action": dim}, stats=stats, dataset_hash="",
                                     dataset_name=source.name)
    chunks = [artifact.normalize("action", a[s:s + horizon]) for a in actions for s in range(len(a) - horizon + 1)]
    if not chunks:
        longest = max((len(a) for a in actions), default=0)
        raise ValueError(f"no episode of {path} has {horizon} steps (the longest has {longest}); lower --horizon")
    return np.stack(chunks)


def compression(tokenizer: FastTokenizer, chunks: np.ndarray) -> dict[str, float]:
    """Mean / max FAST tokens per chunk and the ratio ``H * A / mean tokens``."""
    lengths = np.array([len(ids) for ids in tokenizer.encode(chunks)], np.float64)
    numbers = chunks.shape[1] * chunks.shape[2]
    return {"chunks": int(len(chunks)), "numbers_per_chunk": numbers, "mean_tokens": float(lengths.mean()),
            "max_tokens": int(lengths.max()), "compression_ratio": float(numbers / lengths.mean()),
            "vocab_size": tokenizer.vocab_size}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="LeRobot v3 dataset directory")
    parser.add_argument("--horizon", type=int, required=True, help="action chunk length H")
    parser.add_argument("--out", required=True, help="tokenizer json file to write")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--normalization", default="bounds", choices=NORMALIZATION_TYPES)
    args = parser.parse_args(argv)
    chunks = lerobot_action_chunks(args.dataset, args.horizon, args.normalization)
    tokenizer = FastTokenizer.fit(chunks, vocab_size=args.vocab_size, scale=args.scale)
    tokenizer.save(args.out)
    report = compression(tokenizer, chunks)
    print(json.dumps({**report, "out": args.out}))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
