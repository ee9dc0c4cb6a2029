"""Serving overhead: loopback websocket round trips vs in-process sampling, and throughput with concurrent clients.

    python -m benchmarks.bench_serve [--requests=200] [--head=flow] [--seconds=10]

The policy is the tiny Meta-World config (64 px conv stem, 4-layer width-128 backbone, H = 8), freshly
initialised (speed does not depend on training). The server runs in its own process (``experiments.serve``), as
it would beside a robot; clients send openpi-style LIBERO requests (one 64 x 64 uint8 image, 4 state values, a
prompt). Reported:

* in-process: ``PolicyRunner.infer`` on the same observation (input pipeline + jitted sampling + unnormalization);
* round trip: ``vlax.serve.Client.infer`` and openpi-client's ``WebsocketClientPolicy.infer`` over loopback;
  the server's overhead as a ratio and in ms (p50 minus p50);
* throughput: requests/s with 1, 4 and 8 clients at once (each its own connection, lockstep), without and with
  micro-batching (``--max_batch=8``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


def tiny_checkpoint(workdir: Path, head: str) -> Path:
    """An untrained tiny policy saved the way the trainer saves one."""
    from flax import nnx

    from experiments.configs.metaworld import get_config
    from vlax.build import build_policy, policy_spec
    from vlax.checkpoint import Checkpointer
    from vlax.data.normalization import NormalizationArtifact
    from vlax.observation import ObservationPipeline
    from vlax.tokenizers import WordTokenizer

    c = get_config("tiny")
    c.model.head = head
    spec = policy_spec(c)
    tokenizer = WordTokenizer.build(["open the drawer"])
    model = build_policy(c.model, spec, tokenizer.vocab_size, nnx.Rngs(0))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"params": nnx.to_pure_dict(params)}
    if nnx.to_pure_dict(rest):
        state["rest"] = nnx.to_pure_dict(rest)
    stats = lambda d: {k: [v] * d for k, v in dict(mean=0.0, std=1.0, min=-1.0, max=1.0, q01=-1.0,  # noqa: E731
                                                   q99=1.0).items()} | {"count": 1, "num_trajectories": 1}
    art = NormalizationArtifact(type="bounds", keys=("action", "state"), masks={"action": (True,) * 4,
                                "state": (True,) * 4}, padded_dims={"action": 4, "state": 4},
                                stats={"action": stats(4), "state": stats(4)}, dataset_hash="bench",
                                dataset_name="bench")
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(1, state, force=True, config=json.loads(c.to_json_best_effort()), normalization=art.to_dict(),
              tokenizer=tokenizer.to_json(), policy=ObservationPipeline(spec, tokenizer, {"bench": art}).to_json())
    ckpt.wait()
    ckpt.close()
    return workdir


def request(seed: int = 0) -> dict:
    rs = np.random.RandomState(seed)
    return {"observation/image": rs.randint(0, 256, (64, 64, 3)).astype(np.uint8),
            "observation/state": rs.uniform(-0.5, 0.5, 4).astype(np.float32), "prompt": "open the drawer"}


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def time_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, checkpoint: Path, *extra: str):
        self.port = free_port()
        cmd = [sys.executable, "-m", "experiments.serve", f"--checkpoint={checkpoint}", f"--port={self.port}",
               "--resize_backend=jax", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: {' '.join(cmd)}")
                time.sleep(0.5)
        raise TimeoutError("server did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def throughput(port: int, clients: int, seconds: float) -> float:
    from vlax.serve import Client

    conns = [Client(port=port) for _ in range(clients)]
    for c in conns:
        c.infer(request())
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def loop(i):
        obs = request(i)
        while time.perf_counter() < stop:
            conns[i].infer(obs)
            counts[i] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    elapsed = time.perf_counter() - started
    [c.close() for c in conns]
    return sum(counts) / elapsed


def main(head: str, requests: int, seconds: float) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from vlax.inference import PolicyRunner
    from vlax.serve import Client

    results: dict = {"head": head, "requests": requests, "date": time.strftime("%Y-%m-%d"),
                     "cpu": os.cpu_count(), "load": os.getloadavg()[0]}
    workdir = tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench_serve_")), head)
    runner = PolicyRunner.from_checkpoint(workdir, resize_backend="jax")
    obs = request()
    raw = {"images": {"corner2": obs["observation/image"]}, "state": obs["observation/state"],
           "prompt": obs["prompt"]}
    runner.infer(raw)
    server = ServerProcess(workdir)
    try:
        vlax_client = Client(port=server.port)
        openpi_client = WebsocketClientPolicy("127.0.0.1", server.port)
        for c in (vlax_client, openpi_client):
            c.infer(obs)
        # Alternating rounds so that all three see the same load on a shared machine.
        inproc, vlax_rt, openpi_rt = [], [], []
        for _ in range(max(1, requests // 20)):
            inproc += time_calls(lambda: runner.infer(raw), 20)
            vlax_rt += time_calls(lambda: vlax_client.infer(obs), 20)
            openpi_rt += time_calls(lambda: openpi_client.infer(obs), 20)
        for name, ms in (("in_process", inproc), ("vlax_client", vlax_rt), ("openpi_client", openpi_rt)):
            results[name] = dict(zip(("p50_ms", "p99_ms"), percentiles(ms)))
        base = results["in_process"]["p50_ms"]
        for name in ("vlax_client", "openpi_client"):
            results[name]["ratio_p50"] = results[name]["p50_ms"] / base
            results[name]["overhead_ms_p50"] = results[name]["p50_ms"] - base
        vlax_client.close()
        results["throughput"] = {str(n): throughput(server.port, n, seconds) for n in (1, 4, 8)}
    finally:
        server.close()
    batched = ServerProcess(workdir, "--max_batch=8", "--batch_window_ms=2")
    try:
        results["throughput_batched"] = {str(n): throughput(batched.port, n, seconds) for n in (1, 4, 8)}
    finally:
        batched.close()
    return results


def markdown(r: dict) -> str:
    rows = ["| path | p50 ms | p99 ms | p50 / in-process | overhead p50 |", "|---|---|---|---|---|"]
    for name in ("in_process", "vlax_client", "openpi_client"):
        x = r[name]
        extra = "1.00x | -" if name == "in_process" else f"{x['ratio_p50']:.2f}x | +{x['overhead_ms_p50']:.2f} ms"
        rows.append(f"| {name} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {extra} |")
    rows += ["", "| clients | req/s (max_batch 1) | req/s (max_batch 8) |", "|---|---|---|"]
    for n in ("1", "4", "8"):
        rows.append(f"| {n} | {r['throughput'][n]:.1f} | {r['throughput_batched'][n]:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head", default="flow")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    res = main(args.head, args.requests, args.seconds)
    print(json.dumps(res, indent=1))
    print(markdown(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
