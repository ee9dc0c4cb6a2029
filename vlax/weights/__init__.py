"""Checkpoint import: local Hugging Face directories (``config.json`` + ``*.safetensors``) into vlax modules.

``load_pretrained(path)`` reads ``config.json``'s ``architectures`` and hands the directory to the matching
loader; each loader module (``vlax.weights.llama``, ``.gemma``, ``.siglip``, ``.dinov2``) is imported only when
its architecture is asked for. Only safetensors are read; pickle files are refused.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from vlax.weights.common import CheckpointError, check_architecture, read_config

# architecture in config.json -> module holding its loader
LOADERS: dict[str, str] = {
    "LlamaForCausalLM": "vlax.weights.llama",
    "GemmaForCausalLM": "vlax.weights.gemma",
    "SiglipVisionModel": "vlax.weights.siglip",
    "SiglipModel": "vlax.weights.siglip",
    "PaliGemmaForConditionalGeneration": "vlax.weights.siglip",
    "Dinov2Model": "vlax.weights.dinov2",
    "Dinov2WithRegistersModel": "vlax.weights.dinov2",
    # model_type, for config.json files without an "architectures" entry
    "llama": "vlax.weights.llama",
    "gemma": "vlax.weights.gemma",
    "siglip_vision_model": "vlax.weights.siglip",
    "dinov2": "vlax.weights.dinov2",
    "dinov2_with_registers": "vlax.weights.dinov2",
}


def supported_architectures() -> list[str]:
    """Architectures :func:`load_pretrained` accepts."""
    return sorted(LOADERS)


def load_pretrained(path: str | Path, **kwargs: Any):
    """The vlax module for a local HF checkpoint directory, picked by ``config.json``'s ``architectures``.

    ``kwargs`` go to the architecture's loader (e.g. ``dtype=jnp.bfloat16``). Loaders are found in their
    module as ``load_<stem>`` (``load_llama``, ``load_siglip``, ...) or ``load``.
    """
    architecture = check_architecture(read_config(path), LOADERS)
    module_name = LOADERS[architecture]
    module = importlib.import_module(module_name)
    stem = module_name.rsplit(".", 1)[-1]
    loader = getattr(module, f"load_{stem}", None) or getattr(module, "load", None)
    if loader is None:
        raise CheckpointError(f"{module_name} has no load_{stem}() or load() for {architecture}")
    return loader(path, **kwargs)


__all__ = ["CheckpointError", "LOADERS", "load_pretrained", "supported_architectures"]
