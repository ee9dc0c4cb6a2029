"""The trainer as 2 processes on one machine (jax.distributed on 127.0.0.1, one CPU device each, per-host data
shards): same losses as 1 process, SIGTERM to one host stops both at the same step and the resume is exact, and a
(simulated) SLURM job's layout reaches the trainer (the reference 2-process run is launched as one).

The data (``tests/train_worker.py``, kind ``test_arrays``) are 6 trajectories of 4 frames, sharded by trajectory
(host i reads i, i + 2, ...) and read in order with a per-host batch of 4: host 0's k-th batch is trajectory 2k-2
and host 1's is 2k-1, so every global batch of 8 equals the 1-process run's k-th batch (trajectories 2k-2, 2k-1).
The comparison with 1 process therefore checks the multi-process trainer itself (sharded init, global batch
assembly, the cross-process gradient reduction), on identical samples. All runs share one persistent XLA
compilation cache, so each topology compiles once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from train_helpers import config_flags, tiny_config
from vlax.train.metrics import read_metrics
from xla_flags import xla_flags

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = 16
# Float32 sums of the same 8 samples in another order (two partial means reduced across processes): the first
# step agrees to rounding, and over 16 AdamW steps to 1e-4 relative (measured: step 1 equal, at most 2.1e-7).
FIRST_STEP_RTOL, ALL_STEPS_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("xla_cache"))


def _flags(workdir: Path, **train) -> list[str]:
    c = tiny_config(workdir, Path("unused"), steps=STEPS, save_every=1000, **train)
    c.data.shuffle_buffer = 1
    out = [f for f in config_flags(c) if not f.startswith("--config.data.sources[0].")]
    return out + ["--config.data.sources[0].kind=test_arrays",
                  "--config.data.sources[0].path=frames=4&shard=1",
                  "--config.data.augment=False", "--config.model.tokenizer=byte",
                  "--config.train.stop_check_every=2", *[f"--config.train.{k}={v}" for k, v in train.items()]]


def _env(xla_cache: str, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(XLA_FLAGS=xla_flags(), PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **(extra or {}))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "train_worker.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two(workdir: Path, xla_cache: str, **train) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    return [_launch([*_flags(workdir, **train), f"--coordinator={coordinator}", "--num_processes=2",
                     f"--process_id={i}"], _env(xla_cache)) for i in range(2)]


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-3000:]}"
    return outs


def _losses(workdir: Path) -> dict[int, float]:
    """Loss per step (process 0 writes the metrics); a step logged again after a resume keeps its last value."""
    return {m["step"]: m["loss"] for m in read_metrics(workdir)}


def _committed(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _slurm_two(workdir: Path, xla_cache: str) -> tuple[list[subprocess.Popen], int]:
    """Two tasks of a simulated 2-node SLURM job (local rank 0 on each), launched without --coordinator flags."""
    port = _free_port()
    procs = []
    for i in range(2):
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": str(i), "SLURM_LOCALID": "0", "JAX_COORDINATOR_PORT": str(port)}
        procs.append(_launch(_flags(workdir), _env(xla_cache, slurm)))
    return procs, port


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, xla_cache) -> Path:
    """An uninterrupted 2-process run of STEPS steps, launched as a SLURM job: jax's SLURM detection finds the
    coordinator from the node list, and the trainer runs as process SLURM_PROCID of SLURM_NTASKS (the SIGTERM
    test's runs take the explicit --coordinator / --num_processes / --process_id flags instead)."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    procs, port = _slurm_two(workdir, xla_cache)
    outs = _finish(procs)
    for i, out in enumerate(outs):
        assert f"multi-process run: process {i} of 2 (slurm), coordinator 127.0.0.1:{port}" in out, out[-3000:]
        assert f"joined as process {i} of 2 with 1 local device(s)" in out, out[-3000:]
    return workdir


def test_two_processes_train_like_one(tmp_path, xla_cache, two_process_run):
    (out,) = _finish([_launch(_flags(tmp_path / "one"), _env(xla_cache))])
    assert "multi-process run" not in out
    one, two = _losses(tmp_path / "one"), _losses(two_process_run)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    worst = max(abs(two[s] - one[s]) / abs(one[s]) for s in one)
    print(f"2 vs 1 process: step 1 loss {two[1]!r} vs {one[1]!r}; largest relative difference {worst:.2e}")
    np.testing.assert_allclose(two[1], one[1], rtol=FIRST_STEP_RTOL)
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=ALL_STEPS_RTOL)


def test_sigterm_to_one_host_stops_both_at_one_step_and_resume_is_exact(tmp_path, xla_cache, two_process_run):
    workdir = tmp_path / "run"
    procs = _two(workdir, xla_cache)
    deadline = time.time() + 600
    while not _losses(workdir) and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)  # the host that does not write metrics or lead the save
    outs = _finish(procs)
    stops = [next((line for line in out.splitlines() if line.startswith("stopping at step")), out[-2000:])
             for out in outs]
    assert stops[1].endswith("(SIGTERM); checkpoint saved"), stops[1]
    assert stops[0].endswith("(a signal on another host); checkpoint saved"), stops[0]
    stopped = int(stops[1].split()[3])
    assert stops[0].split()[3] == str(stopped) and stopped < STEPS, stops
    assert _committed(workdir) == [stopped]
    for host in (0, 1):
        assert (workdir / "data_iterators" / f"step_{stopped}" / f"host_{host}" / "iterator.index").exists()

    outs = _finish(_two(workdir, xla_cache))
    assert all(f"resumed from step {stopped}" in out for out in outs)
    got, expected = _losses(workdir), _losses(two_process_run)
    after = list(range(stopped + 1, STEPS + 1))
    assert [got[s] for s in after] == [expected[s] for s in after]  # bit-identical: same topology, same data
