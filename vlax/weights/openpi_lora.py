"""Fold the LoRA adapters of openpi's fine-tuned checkpoints into their base weights.

openpi's ``gemma_2b_lora`` / ``gemma_300m_lora`` variants add, beside each einsum weight ``w``:

* attention (``q_einsum``, ``kv_einsum``, ``qkv_einsum``, ``attn_vec_einsum``): ``lora_a`` (``w`` with its last
  axis replaced by the rank) and ``lora_b`` (its second-to-last axis replaced by the rank), applied as
  ``einsum(x, a) -> einsum(., b)`` times ``alpha / rank`` (1.0 in both released variants);
* the MLP (``mlp/gating_einsum_lora_{a,b}``, ``mlp/linear_lora_{a,b}``): ``x @ a @ b`` with no scale.

Every einsum keeps the axes of ``w`` other than the two LoRA replaces, so the update is a batched matrix product
``a @ b`` over those axes, except for ``attn_vec_einsum`` (``BTNH,NHD->BTD``): its LoRA equations are
``BTNH,NHL->BTL`` then ``BTL,NLD->BTD``, so ``lora_b`` is summed over the heads before the product.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from vlax.weights.common import CheckpointError

ATTENTION = ("q_einsum", "kv_einsum", "qkv_einsum", "attn_vec_einsum")
MLP = ("gating_einsum", "linear")


def lora_keys(flat: Mapping[str, np.ndarray]) -> list[str]:
    """The LoRA adapter paths of an openpi params tree (empty for a base checkpoint)."""
    return sorted(k for k in flat if k.endswith(("/lora_a", "/lora_b", "_lora_a", "_lora_b")))


def _pairs(flat: Mapping[str, np.ndarray]) -> list[tuple[str, str, str, bool]]:
    """``(base weight, lora_a, lora_b, is attention)`` for every adapter; strays are one error."""
    pairs, used = [], set()
    for key in flat:
        name = key.rsplit("/", 2)
        if len(name) == 3 and name[1].removesuffix("_1") in ATTENTION and name[2] == "w" and \
                f"{name[0]}/{name[1]}/lora_a" in flat:
            stem = f"{name[0]}/{name[1]}"
            pairs.append((key, f"{stem}/lora_a", f"{stem}/lora_b", True))
        elif len(name) >= 2 and name[-1] in MLP and f"{key}_lora_a" in flat:
            pairs.append((key, f"{key}_lora_a", f"{key}_lora_b", False))
    for _, a, b, _ in pairs:
        used.update((a, b))
    stray = sorted(set(lora_keys(flat)) - used)
    missing = sorted(b for _, _, b, _ in pairs if b not in flat)
    if stray or missing:
        raise CheckpointError(f"LoRA adapters without their base weight or partner: stray {stray}, missing "
                              f"{missing}; openpi writes lora_a and lora_b beside each adapted einsum weight")
    return pairs


def fold_lora(flat: Mapping[str, np.ndarray], *, attention_scale: float = 1.0
              ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """``(tree with each ``w`` replaced by ``w + update``, {base key: its adapter keys})``, adapters removed.

    ``attention_scale``: the attention adapters' ``alpha / rank`` (``alpha / sqrt(rank)`` under rsLoRA); openpi's
    ``gemma_2b_lora`` (rank 16, alpha 16) and ``gemma_300m_lora`` (rank 32, alpha 32) both give 1.0. The update is
    computed in float32 and cast to the stored dtype (bfloat16 checkpoints round once, like their base weights).
    """
    out = dict(flat)
    folded: dict[str, list[str]] = {}
    for base, key_a, key_b, attention in _pairs(flat):
        w, a, b = flat[base], np.asarray(flat[key_a], np.float32), np.asarray(flat[key_b], np.float32)
        want_a = w.shape[:-1] + a.shape[-1:]
        want_b = w.shape[:-2] + (a.shape[-1],) + w.shape[-1:]
        if a.shape != want_a or b.shape != want_b:
            raise CheckpointError(f"{key_a} {a.shape} / {key_b} {b.shape} do not fit {base} {w.shape} (expected "
                                  f"{want_a} / {want_b})")
        if base.rsplit("/", 2)[1].startswith("attn_vec_einsum"):
            # [L, N, r, D] summed over the heads: the second LoRA einsum contracts N with the first's output
            b = b.sum(axis=-3, keepdims=True)
        update = np.matmul(a, b) * (attention_scale if attention else 1.0)
        out[base] = (np.asarray(w, np.float32) + update).astype(w.dtype)
        folded[base] = [key_a, key_b]
        del out[key_a], out[key_b]
    return out, folded


__all__ = ["fold_lora", "lora_keys"]
