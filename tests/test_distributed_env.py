"""Multi-process layout from the environment: explicit settings, SLURM through jax's cluster detection, the
coordinator's bind address; and two local processes joined under a simulated SLURM job on loopback."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vlax.train import distributed
from xla_flags import xla_flags

HERE = Path(__file__).resolve().parent
_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "CLOUD_TPU_", "VLAX_COORDINATOR", "VLAX_NUM_PROCESSES", "VLAX_PROCESS_ID",
             "VLAX_CLUSTER", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_SERVICE_HOST")


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES)}


@pytest.fixture
def env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(_PREFIXES):
            monkeypatch.delenv(key)
    return monkeypatch


def _slurm(env, procid=1, ntasks=2, nodes="node[003-004],gpu7", job=1234):
    for key, value in dict(SLURM_JOB_ID=job, SLURM_NTASKS=ntasks, SLURM_PROCID=procid, SLURM_LOCALID=procid,
                           SLURM_STEP_NODELIST=nodes, SLURM_STEP_NUM_NODES=2).items():
        env.setenv(key, str(value))


def test_single_machine_has_no_layout(env):
    assert distributed.detect_layout() is None
    env.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # in every pod, single-process jobs too: not auto-detected
    assert distributed.detect_layout() is None
    _slurm(env, procid=0, ntasks=1)  # a one-task SLURM job: nothing to join, no device restriction
    assert distributed.detect_layout() is None


def test_slurm_layout_through_jax_detection(env):
    _slurm(env)
    layout = distributed.detect_layout()
    port = str(1234 % 4096 + 65535 - 4096 + 1)  # jax's port for SLURM job 1234
    assert layout == distributed.ProcessLayout("slurm", 1, 2, f"node003:{port}", f"node003:{port}", (1,))
    assert layout.describe() == (f"process 1 of 2 (slurm), coordinator node003:{port} (process 0 binds "
                                 f"node003:{port}), devices [1]")
    env.setenv("JAX_COORDINATOR_PORT", "23456")
    env.setenv("JAX_LOCAL_DEVICE_IDS", "0,1,2,3")  # one process per node, 4 devices each
    layout = distributed.detect_layout()
    assert layout.coordinator == "node003:23456" and layout.local_device_ids == (0, 1, 2, 3)
    env.setenv("VLAX_CLUSTER", "none")
    assert distributed.detect_layout() is None


def test_bind_address_defaults_to_the_coordinator_host(env):
    _slurm(env)
    env.setenv("JAX_COORDINATOR_PORT", "23456")
    assert distributed.detect_layout().bind_address == "node003:23456"
    assert distributed.detect_layout(coordinator_bind_address="all").bind_address == "[::]:23456"
    env.setenv("VLAX_COORDINATOR_BIND", "10.1.2.3")
    assert distributed.detect_layout().bind_address == "10.1.2.3:23456"
    env.delenv("VLAX_COORDINATOR_BIND")
    env.setenv("JAX_COORDINATOR_BIND_ADDRESS", "[::]:23456")  # jax's own variable: left for jax to read
    assert distributed.detect_layout().bind_address is None
    env.delenv("JAX_COORDINATOR_BIND_ADDRESS")
    explicit = distributed.detect_layout("127.0.0.1:5000", 2, 0)  # arguments beat the detected cluster
    assert (explicit.source, explicit.bind_address, explicit.process_id) == ("arguments", "127.0.0.1:5000", 0)
    env.setenv("VLAX_COORDINATOR", "[::1]:5001")
    env.setenv("VLAX_NUM_PROCESSES", "2")
    env.setenv("VLAX_PROCESS_ID", "1")
    assert distributed.detect_layout().bind_address == "[::1]:5001"


def test_bad_settings_are_named(env):
    with pytest.raises(ValueError, match="unknown cluster 'slurn'.*slurm"):
        distributed.detect_layout(cluster="slurn")
    with pytest.raises(ValueError, match="cluster 'slurm' was asked for but its environment is not present"):
        distributed.detect_layout(cluster="slurm")
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: process 0 says so before jax starts anything.
    with pytest.raises(ValueError, match=r"cannot bind the coordinator address '192.0.2.1:5002'.*"
                                         r"VLAX_COORDINATOR_BIND=all"):
        distributed.initialize("192.0.2.1:5002", 2, 0)


_WORKER = """
import json, os
import jax
import numpy as np
from jax.experimental import multihost_utils
from vlax.train import distributed

layout = distributed.detect_layout()
assert distributed.initialize()
ids = multihost_utils.process_allgather(np.int32(jax.process_index())).tolist()  # a real cross-process exchange
listening = []
if jax.process_index() == 0:
    port = int(os.environ["JAX_COORDINATOR_PORT"])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in open(table).read().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN on the coordinator port
                listening.append(local.rsplit(":", 1)[0])
print("RESULT", json.dumps({"layout": layout.describe(), "index": jax.process_index(),
                            "count": jax.process_count(), "ids": ids, "listening": listening}))
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the listening sockets from /proc (Linux)")
def test_two_processes_join_under_simulated_slurm(tmp_path):
    port = _free_port()
    base = _clean_env()
    base.update(XLA_FLAGS=xla_flags(),  # one CPU device per process
                PYTHONPATH=str(HERE.parent), JAX_PLATFORMS="cpu", JAX_COORDINATOR_PORT=str(port),
                SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_NUM_NODES="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], env={**base, "SLURM_PROCID": str(i),
                              "SLURM_LOCALID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=str(tmp_path)) for i in range(2)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:]))
    for i, r in enumerate(results):
        assert (r["index"], r["count"], r["ids"]) == (i, 2, [0, 1])
        assert r["layout"].startswith(f"process {i} of 2 (slurm), coordinator 127.0.0.1:{port} (process 0 binds "
                                      f"127.0.0.1:{port})")
    # Process 0 listens on 127.0.0.1 only (as IPv4, or IPv4-mapped IPv6 as gRPC binds it), not on every interface
    # (0.0.0.0 / ::, all zeros).
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    assert results[0]["listening"] and set(results[0]["listening"]) <= loopback, results[0]["listening"]
