"""Train-step FLOP utilisation of the Meta-World policy configs, on synthetic batches of the configured shapes.

    python -m benchmarks.bench_train_step                 # tiny and small, every head of the ablation
    python -m benchmarks.bench_train_step --variants=small --heads=flow --batch=128 --dtype=bfloat16

Utilisation = FLOPs counted on the step's jaxpr (forward + backward + optimizer matmuls; remat recomputation
included) / step time / the measured matmul peak of the step's compute dtype on this device.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import device_name
from experiments.configs.metaworld import get_config
from vlax.build import build_policy, config_cameras
from vlax.policy import PolicySpec
from vlax.train.flops import count_flops
from vlax.train.metrics import matmul_peak, time_call
from vlax.train.optimizer import OptimizerConfig, make_optimizer
from vlax.train.state import create_train_state, jit_train_step, make_train_step


def _batch(spec: PolicySpec, batch: int, vocab: int) -> dict:
    rs = np.random.RandomState(0)
    return {
        "obs": {"images": {c: rs.randint(0, 255, (batch, spec.image_size, spec.image_size, 3), np.uint8)
                           for c in spec.cameras},
                "state": rs.randn(batch, spec.state_dim).astype(np.float32),
                "text_ids": rs.randint(3, vocab, (batch, spec.max_text_len)).astype(np.int32),
                "text_mask": np.ones((batch, spec.max_text_len), bool)},
        "actions": rs.uniform(-1, 1, (batch, spec.horizon, spec.action_dim)).astype(np.float32),
        "action_mask": np.ones((batch, spec.horizon, spec.action_dim), bool),
    }


def loss_fn(model, batch, rng):
    return model.loss(batch["obs"], batch["actions"], action_mask=batch["action_mask"], rngs=rng)


def measure(variant: str, head: str, batch: int, dtype: str | None, peaks: dict, attention: str = "",
            remat: str = "") -> dict:
    cfg = get_config(variant)
    cfg.model.head = head
    if dtype:
        cfg.model.dtype = dtype
    if attention:
        cfg.model.backbone_overrides.attention_impl = attention
        if cfg.model.encoder != "conv_stem":
            cfg.model.encoder_kwargs.attn_implementation = attention
    if remat:
        cfg.model.backbone_overrides.remat = remat
    if head.startswith("flow"):
        cfg.model.state_input = "head"
    spec = PolicySpec(cameras=config_cameras(cfg), image_size=cfg.data.image_size, state_dim=cfg.model.state_dim,
                      action_dim=cfg.model.action_dim, horizon=cfg.data.action_horizon,
                      max_text_len=cfg.model.max_text_len, state_input=cfg.model.state_input)
    vocab = 128
    policy = build_policy(cfg.model, spec, vocab, nnx.Rngs(0))
    tx = make_optimizer(OptimizerConfig(), nnx.state(policy, nnx.Param))
    graphdef, state, _ = create_train_state(policy, tx, jax.random.key(0))
    params = sum(x.size for x in jax.tree.leaves(state.params))
    pure = make_train_step(graphdef, loss_fn, tx)
    data = jax.device_put(_batch(spec, batch, vocab))
    flops = count_flops(pure, state, data)
    step = jit_train_step(pure)
    holder = {"state": state}

    def run(d):
        holder["state"], metrics = step(holder["state"], d)
        return metrics["loss"]

    seconds = time_call(run, data, warmup=2, iters=5, min_time=1.0)
    compute = cfg.model.dtype or "float32"
    if compute not in peaks:
        peaks[compute] = matmul_peak(jnp.dtype(compute))
    return dict(variant=variant, head=head, batch=batch, dtype=compute, params=params, gflop=flops / 1e9,
                step_ms=seconds * 1e3, examples_s=batch / seconds, util=flops / seconds / peaks[compute])


def main() -> None:
    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="tiny,small")
    p.add_argument("--heads", default="binned,binned_lm,chunk,flow,diffusion")
    p.add_argument("--batch", type=int, default=0, help="0: 64 for tiny; small: 128 on GPU, 4 on CPU")
    p.add_argument("--dtype", default="", help="override the config's compute dtype")
    p.add_argument("--attention", default="", help="attention implementation of encoder and backbone: xla|cudnn")
    p.add_argument("--remat", default="", help="backbone remat policy override (e.g. none, dots, full)")
    args = p.parse_args()
    peaks: dict = {}
    print(f"device {device_name()}")
    print(f"{'variant':8s} {'head':10s} {'batch':>5s} {'dtype':9s} {'params':>8s} {'GFLOP/step':>10s} "
          f"{'ms/step':>8s} {'ex/s':>8s} {'util':>6s}")
    for variant in args.variants.split(","):
        for head in args.heads.split(","):
            batch = args.batch or (64 if variant == "tiny" else (128 if gpu else 4))
            r = measure(variant, head, batch, args.dtype or None, peaks, args.attention, args.remat)
            print(f"{r['variant']:8s} {r['head']:10s} {r['batch']:5d} {r['dtype']:9s} {r['params'] / 1e6:7.1f}M "
                  f"{r['gflop']:10.1f} {r['step_ms']:8.1f} {r['examples_s']:8.1f} {r['util']:6.1%}", flush=True)
    print("peaks (measured matmul FLOP/s): " + ", ".join(f"{k} {v / 1e12:.2f} T" for k, v in peaks.items()))


if __name__ == "__main__":
    main()
