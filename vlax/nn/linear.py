"""Dense and embedding layers whose parameters carry logical axis names."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn.params import default_kernel_init, param


class Dense(nnx.Module):
    """``y = x @ kernel + bias``; kernel ``[in, out]`` (the transpose of torch's ``nn.Linear.weight``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        axes: Sequence[str | None] = ("embed", "mlp"),
        kernel_init=default_kernel_init,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros, (out_features,), axes[-1:], param_dtype) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., in] -> [..., out]``."""
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Embed(nnx.Module):
    """Token embedding ``[vocab, D]``; ``attend`` reuses it as a tied output projection."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=None, param_dtype=jnp.float32,
                 embedding_init=nnx.initializers.normal(stddev=1.0), rngs: nnx.Rngs):
        self.num_embeddings, self.features, self.dtype = num_embeddings, features, dtype
        self.embedding = param(rngs, embedding_init, (num_embeddings, features), ("vocab", "embed"), param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``[...] int -> [..., D]``."""
        table = self.embedding[...]
        if self.dtype is not None:
            table = table.astype(self.dtype)
        return jnp.take(table, ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding table: ``[..., D] -> [..., vocab]``."""
        table = self.embedding[...].astype(self.dtype or x.dtype)
        return jnp.dot(x.astype(table.dtype), table.T)
