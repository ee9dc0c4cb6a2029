"""Attention implementations side by side: agreement with the einsum reference and speed.

    python -m benchmarks.bench_attention

On CPU it compares the einsum and XLA paths; on a GPU it adds cuDNN (bf16), whose output must agree with the
einsum reference to bf16 precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_name, time_fn
from vlax.nn import dot_product_attention, make_attn_mask


def main() -> None:
    gpu = jax.default_backend() == "gpu"
    b, t, heads, kv, dh = (8, 1024, 16, 4, 128) if gpu else (2, 256, 8, 2, 64)
    print(f"device {device_name()}  B={b} T={t} heads={heads} kv_heads={kv} head_dim={dh}")
    impls = ["einsum", "xla"] + (["cudnn"] if gpu else [])
    dtypes = [jnp.float32, jnp.bfloat16]
    for mask_kind in ("causal", "prefix"):
        ar = jnp.ones(t) if mask_kind == "causal" else jnp.concatenate([jnp.zeros(t // 2), jnp.ones(t - t // 2)])
        mask = make_attn_mask(jnp.ones((b, t), bool), ar)
        for dtype in dtypes:
            ks = jax.random.split(jax.random.key(0), 3)
            q = jax.random.normal(ks[0], (b, t, heads, dh), dtype)
            k = jax.random.normal(ks[1], (b, t, kv, dh), dtype)
            v = jax.random.normal(ks[2], (b, t, kv, dh), dtype)
            ref = None
            base_time = None
            for impl in impls:
                if impl == "cudnn" and dtype == jnp.float32:
                    continue  # cuDNN's fused attention takes bf16/fp16 only
                fn = jax.jit(lambda q, k, v, m, impl=impl: dot_product_attention(q, k, v, m, implementation=impl))
                try:
                    out = fn(q, k, v, mask)
                except Exception as e:  # report, keep benchmarking the others
                    print(f"  {mask_kind:6s} {jnp.dtype(dtype).name:8s} {impl:6s} unavailable: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]}")
                    continue
                sec = time_fn(fn, q, k, v, mask)
                out = np.asarray(out.astype(jnp.float32))
                if ref is None:
                    ref, base_time = out, sec
                err = float(np.abs(out - ref).max())
                print(f"  {mask_kind:6s} {jnp.dtype(dtype).name:8s} {impl:6s} {sec * 1e3:8.2f} ms  "
                      f"speed-up vs einsum {base_time / sec:5.2f}x  max|diff| vs einsum {err:.2e}")


if __name__ == "__main__":
    main()
