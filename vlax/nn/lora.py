"""Low-rank adapters on :class:`~vlax.nn.linear.Dense` layers, added by path regex, merged on demand.

Adapter weights are :class:`LoRAParam` (a subclass of ``nnx.Param``), so an optimizer built with
``wrt=LoRAParam`` trains only the adapters and leaves every base weight bit-identical.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn.linear import Dense


class LoRAParam(nnx.Param):
    """A trainable low-rank adapter weight."""


class LoRADense(nnx.Module):
    """``base(x) + (alpha / rank) * x @ lora_a @ lora_b``; ``lora_b`` starts at zero so the output is unchanged.

    Works on stacked (scanned) layers: adapter weights get the same leading axes as the base kernel.
    """

    def __init__(self, base: Dense, *, rank: int, alpha: float, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        kernel = base.kernel[...]
        lead, (d_in, d_out) = kernel.shape[:-2], kernel.shape[-2:]
        axes = tuple(getattr(base.kernel, "logical_axes", (None, None)))
        init_a = nnx.initializers.normal(stddev=1.0 / rank)
        self.lora_a = LoRAParam(init_a(rngs.params(), (*lead, d_in, rank), kernel.dtype), logical_axes=(axes[0], None))
        self.lora_b = LoRAParam(jnp.zeros((*lead, rank, d_out), kernel.dtype), logical_axes=(None, axes[1]))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., in] -> [..., out]``."""
        delta = jnp.dot(jnp.dot(x, self.lora_a[...].astype(x.dtype)), self.lora_b[...].astype(x.dtype))
        return self.base(x) + delta * (self.alpha / self.rank)

    def merged(self) -> Dense:
        """The base layer with the adapter folded into its kernel."""
        update = jnp.einsum("...ir,...ro->...io", self.lora_a[...], self.lora_b[...]) * (self.alpha / self.rank)
        self.base.kernel.set_value((self.base.kernel[...] + update).astype(self.base.kernel.dtype))
        return self.base


def _dense_slots(module: nnx.Module, cls):
    """``(path, parent, attribute)`` of every ``cls`` instance below ``module``."""
    for path, parent in nnx.iter_graph(module):
        if not isinstance(parent, nnx.Module):
            continue
        for name, value in list(vars(parent).items()):
            if isinstance(value, cls):
                yield "/".join(str(p) for p in (*path, name)), parent, name


def apply_lora(module: nnx.Module, *, rank: int, alpha: float, target: str, rngs: nnx.Rngs) -> list[str]:
    """Wrap every ``Dense`` whose path (``"layers/attn/q_proj"``) matches ``re.search(target)``; return the paths.

    Raises if nothing matches, listing some Dense paths to aim at.
    """
    pattern = re.compile(target)
    slots = list(_dense_slots(module, Dense))
    chosen = [(p, parent, name) for p, parent, name in slots if pattern.search(p)]
    if not chosen:
        examples = ", ".join(p for p, _, _ in slots[:8])
        raise ValueError(f"LoRA target {target!r} matches no Dense layer; some paths: {examples}")
    for _, parent, name in chosen:
        setattr(parent, name, LoRADense(getattr(parent, name), rank=rank, alpha=alpha, rngs=rngs))
    return [p for p, _, _ in chosen]


def merge_lora(module: nnx.Module) -> list[str]:
    """Fold every adapter into its base kernel in place (for inference); return the merged paths."""
    slots = list(_dense_slots(module, LoRADense))
    for _, parent, name in slots:
        setattr(parent, name, getattr(parent, name).merged())
    return [p for p, _, _ in slots]
