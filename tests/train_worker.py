"""``experiments.train`` with a test-only in-memory data source kind, ``test_arrays``.

    python tests/train_worker.py --config=experiments/configs/metaworld.py:tiny \\
        --config.data.sources[0].kind=test_arrays --config.data.sources[0].path="frames=4&shard=1" ...

Run as a script it is the real trainer (its flags, ``jax.distributed`` set-up and ``main``) with one more source
kind registered; imported, it gives the tests the same source. The source's ``path`` holds its options:
``frames`` (per trajectory, default 8), ``trajectories`` (default 6), ``poison`` (this trajectory's first action is
NaN; the statistics see the clean value, as a corrupt record the statistics pass did not meet) and ``shard``
(1: host i reads trajectories i, i + count, ...; 0: every host reads all). Trajectories come in a fixed order
from a checkpointable ``from_tensor_slices`` dataset, so with ``data.shuffle_buffer=1`` batch k is predictable.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlax.data import source_config  # noqa: E402
from vlax.data.sources import InMemorySource  # noqa: E402

OPENED: list[str] = []  # paths of the sources opened in this process (a check must run before any data is read)


def array_trajectories(frames: int = 8, trajectories: int = 6, poison: int | None = None) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for k in range(trajectories):
        action = rng.uniform(-1, 1, (frames, 4)).astype(np.float32)
        if k == poison:
            action[0, 0] = np.nan
        out.append({"action": action, "state": rng.uniform(-1, 1, (frames, 4)).astype(np.float32),
                    "images": {"corner2": rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8)},
                    "language_instruction": "reach the goal"})
    return out


class ArraySource(InMemorySource):
    """Trajectories ``[frames, 4]`` actions / states and 32 px ``corner2`` images, read in order."""

    def __init__(self, name: str, *, frames: int = 8, trajectories: int = 6, poison: int | None = None,
                 shard: bool = False):
        super().__init__(name, array_trajectories(frames, trajectories, poison))
        self._clean = array_trajectories(frames, trajectories)
        self._shard = shard
        self.image_keys = {"corner2": "image_corner2"}

    def instructions(self) -> list[str]:
        return ["reach the goal"]

    def numeric_trajectories(self):
        for t in self._clean:
            yield {"action": t["action"], "state": t["state"]}

    def trajectories(self, process_index=None, process_count=None, seed=0, shuffle=True, repeat=False):
        import tensorflow as tf

        from vlax.data.sources import resolve_process

        index, count = resolve_process(process_index, process_count)
        mine = [self._standard(t) for t in (self._trajs[index::count] if self._shard else self._trajs)]
        ds = tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda *xs: np.stack(xs), *mine))
        return ds.repeat() if repeat else ds


def open_array_source(entry: dict) -> ArraySource:
    OPENED.append(entry["path"])
    options = dict(parse_qsl(entry["path"]))
    unknown = set(options) - {"frames", "trajectories", "poison", "shard"}
    if unknown:
        raise ValueError(f"test_arrays path {entry['path']!r}: unknown options {sorted(unknown)}")
    poison = options.get("poison")
    return ArraySource(entry["name"] or "arrays", frames=int(options.get("frames", 8)),
                       trajectories=int(options.get("trajectories", 6)),
                       poison=None if poison is None else int(poison), shard=options.get("shard") == "1")


KIND = ("test_arrays", f"{__name__}:open_array_source")


if __name__ == "__main__":
    from absl import app, flags

    source_config.SOURCE_KINDS[KIND[0]] = KIND[1]
    from experiments import train

    flags.mark_flag_as_required("config")
    app.run(train.main)
