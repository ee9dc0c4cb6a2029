"""Published-size backbones: forward and forward+backward FLOP utilisation and cached decode latency.

    python -m benchmarks.bench_backbone_scale --configs=smollm2_360m,llama3_2_1b,gemma_2b --batch=8 --length=1024

Meant for an accelerator (on a CPU pass ``--configs=tiny``). FLOPs are counted on the jaxpr (layers scanned:
XLA's cost analysis would count one layer); the peak is a large matmul of the same dtype measured in the run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import device_name
from vlax.backbones import Transformer, get_config
from vlax.train.flops import count_flops
from vlax.train.metrics import matmul_peak, time_call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="smollm2_360m,llama3_2_1b,gemma_2b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="", help="attention_impl: xla, cudnn, einsum (default: JAX's choice)")
    p.add_argument("--remat", default="dots_no_batch")
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    peak = matmul_peak(dtype)
    print(f"device {device_name()}  {args.dtype} matmul peak {peak / 1e12:.1f} TFLOP/s  batch {args.batch} x "
          f"{args.length} tokens  attention={args.attention or 'default'}  remat={args.remat}")
    for name in args.configs.split(","):
        cfg = get_config(name, dtype=dtype, param_dtype=dtype, remat=args.remat,
                         attention_impl=args.attention or None)
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        params = sum(x.size for x in jax.tree.leaves(state))
        ids = jax.random.randint(jax.random.key(0), (args.batch, args.length), 0, cfg.vocab_size, jnp.int32)

        def forward(s, t):
            return nnx.merge(graphdef, s)(t).hidden

        def loss(s, t):
            h = nnx.merge(graphdef, s)(t).hidden
            return jnp.mean(jnp.square(h.astype(jnp.float32)))

        grad = jax.grad(loss)
        rows = []
        for what, fn in (("forward", forward), ("fwd+bwd", grad)):
            flops = count_flops(fn, state, ids)
            seconds = time_call(jax.jit(fn), state, ids, iters=5)
            rows.append(f"{what} {seconds * 1e3:7.1f} ms {flops / seconds / 1e12:6.1f} TFLOP/s "
                        f"util {flops / seconds / peak:5.1%}")
        prefill = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t[:1], cache_size=args.length + 8).cache)
        step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c).logits)
        cache = prefill(state, ids)
        decode = time_call(step, state, ids[:1, :1], cache, iters=20)
        print(f"{name:14s} {params / 1e6:7.0f}M params | " + " | ".join(rows) +
              f" | decode step (B=1, {args.length} cached) {decode * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
