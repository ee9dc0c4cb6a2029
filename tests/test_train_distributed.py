"""Two processes joined by jax.distributed on loopback train to the same losses as one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_train_state import _run
from xla_flags import xla_flags

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = str(_free_port())
    env = dict(os.environ, XLA_FLAGS=xla_flags())  # one CPU device per process
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent)])
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), port, str(i),
                               str(tmp_path / f"losses{i}.npy")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    single = _run(None)[0]
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"losses{i}.npy"), single, atol=1e-5)
