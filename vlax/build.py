"""Build a :class:`vlax.policy.VLA` from a model config (the ``model`` section of an experiment config).

Every component is looked up by name in its registry (encoders, backbones, heads), so an ablation changes one
value: ``--config.model.head=flow``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.backbones import Transformer, get_config
from vlax.encoders import ENCODERS, ViT, get_encoder
from vlax.encoders.preprocess import normalize
from vlax.heads import HEADS, get_head
from vlax.policy import VLA, PolicySpec, head_context_spec

# Pixel statistics each pretrained encoder family was trained with.
PIXEL_STATS = {"siglip": ((0.5,) * 3, (0.5,) * 3), "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
               "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}


class PatchTokens(nnx.Module):
    """A ViT as an image tokenizer: ``uint8 [B, h, w, 3]`` -> patch tokens ``[B, N, D]``, pixels normalized first."""

    def __init__(self, vit: ViT, mean, std):
        self.vit, self.mean, self.std = vit, tuple(mean), tuple(std)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.vit(normalize(images, self.mean, self.std)).tokens


def _encoder(name: str, kwargs: Mapping[str, Any], image_size: int, rngs: nnx.Rngs,
             dtype: Any = None) -> tuple[nnx.Module, int]:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    kwargs = dict(kwargs)
    if dtype is not None:  # the policy's compute dtype, unless the encoder's own kwargs choose another
        kwargs.setdefault("dtype", dtype if name == "conv_stem" else jnp.dtype(dtype).name)
    if name == "conv_stem":
        encoder = get_encoder(name, image_size=image_size, rngs=rngs, **kwargs)
        return encoder, encoder.width
    encoder = get_encoder(name, image_size=image_size, rngs=rngs, **kwargs)
    if isinstance(encoder, ViT):
        family = "dinov2" if name.startswith("dinov2") else "clip" if name.startswith("clip") else "siglip"
        return PatchTokens(encoder, *PIXEL_STATS[family]), encoder.config.width
    return encoder, getattr(encoder, "width", None) or encoder.config.width


def fast_tokenizer(model: Mapping[str, Any]) -> Any:
    """The FAST head's tokenizer: ``tokenizer`` of its head kwargs, a file path (loaded) or a fitted object."""
    from vlax.action_tokens import FastTokenizer

    kwargs = {**dict(model.get("head_defaults", {}).get("fast", {})), **dict(model.get("head_kwargs", {}))}
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        raise ValueError("model.head='fast' needs model.head_kwargs.tokenizer: the path of a FAST tokenizer file "
                         "(experiments/fit_fast_tokenizer.py writes one)")
    return FastTokenizer.load(tokenizer) if isinstance(tokenizer, str) else tokenizer


def backbone_vocab_size(model: Mapping[str, Any], text_vocab_size: int) -> int:
    """Text vocabulary plus the bins that occupy the last ids of the vocabulary, for LM-decoded binned actions
    and discretized state (both count bins from the end, so they share those ids)."""
    bins = 0
    if model["head"] == "binned_lm":
        bins = int(dict(model.get("head_kwargs", {})).get("n_bins", 256))
    if model["head"] == "fast":  # the FAST ids and their end marker
        bins = fast_tokenizer(model).vocab_size + 1
    if model.get("state_input") == "discrete":
        bins = max(bins, int(model.get("state_bins", 256)))
    return text_vocab_size + bins


def config_cameras(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The policy camera names the config's data sources map to, in order of first appearance."""
    cameras: list[str] = []
    if "sources" not in config["data"]:  # a bare spec-only config names its camera directly
        return (config["data"].get("camera", "corner2"),)
    for entry in config["data"]["sources"]:
        for camera in dict(entry.get("cameras") or {}).values():
            if camera not in cameras:
                cameras.append(camera)
    return tuple(cameras)


def policy_spec(config: Mapping[str, Any], *, cameras: tuple[str, ...] | None = None, state_dim: int | None = None,
                action_dim: int | None = None) -> PolicySpec:
    """The :class:`PolicySpec` an experiment config describes (``data`` + ``model`` sections); ``cameras`` and
    dims the data determined win over the config's (``model.state_dim`` / ``action_dim`` of 0 mean "the data's")."""
    data, model = config["data"], config["model"]
    cameras = tuple(cameras or config_cameras(config))
    return PolicySpec(cameras=cameras, image_size=int(data["image_size"]),
                      state_dim=int(state_dim if state_dim is not None else model["state_dim"]),
                      action_dim=int(action_dim if action_dim is not None else model["action_dim"]),
                      horizon=int(data["action_horizon"]), max_text_len=int(model["max_text_len"]),
                      state_input=model["state_input"], num_readouts=int(model.get("num_readouts", 0)),
                      state_bins=int(model.get("state_bins", 256)),
                      obs_history=int(data.get("obs_history", 1)),
                      image_resize=str(data.get("image_resize", "stretch")),
                      action_chunks=str(data.get("action_chunks", "oldest")))


def check_components(model: Mapping[str, Any]) -> None:
    """Unknown encoder / backbone / head names are an error before any data is read or generated."""
    from vlax.backbones.config import CONFIGS

    if model.get("preset"):
        from vlax.presets import get_preset

        get_preset(model["preset"])
        if model["head"] not in HEADS:
            raise ValueError(f"unknown action head {model['head']!r} (model.head); known: {sorted(HEADS)}")
        return  # a preset names its own encoder and backbone
    for kind, name, known in (("action head", model["head"], HEADS), ("encoder", model["encoder"], ENCODERS),
                              ("backbone", model["backbone"], CONFIGS)):
        if name not in known:
            raise ValueError(f"unknown {kind} {name!r} (model.{kind.split()[-1]}); known: {sorted(known)}")


def build_policy(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> VLA:
    """``model`` keys: ``encoder``, ``encoder_kwargs``, ``backbone`` (a named config), ``backbone_overrides``,
    ``head``, ``head_kwargs``, ``head_defaults`` (``{head name: kwargs}``, used when that head is chosen),
    ``dtype`` (compute dtype, e.g. ``"bfloat16"``; parameters stay float32), ``preset`` (a published family from
    :mod:`vlax.presets`, built by its own builder; empty for the generic VLA)."""
    if model.get("preset"):
        from vlax.presets import get_preset

        return get_preset(model["preset"])(model, spec, text_vocab_size, rngs)
    head_name = model["head"]
    if head_name not in HEADS:
        raise ValueError(f"unknown action head {head_name!r}; known: {sorted(HEADS)}")
    dtype = None if model.get("dtype") in (None, "float32") else jnp.dtype(model["dtype"])
    overrides = dict(model.get("backbone_overrides", {}))
    overrides["vocab_size"] = backbone_vocab_size(model, text_vocab_size)
    if dtype is not None:
        overrides["dtype"] = dtype
    backbone = Transformer(get_config(model["backbone"], **overrides), rngs=rngs)
    encoder, encoder_width = _encoder(model["encoder"], model.get("encoder_kwargs", {}), spec.image_size, rngs,
                                      dtype)
    # Per-head sizes a config scales to its backbone, then explicit overrides for the chosen head.
    head_kwargs = {**dict(model.get("head_defaults", {}).get(head_name, {})), **dict(model.get("head_kwargs", {}))}
    if spec.state_input == "head":
        head_kwargs.setdefault("state_dim", spec.state_dim)
    if head_name == "fast":
        head_kwargs["tokenizer"] = fast_tokenizer(model)
    head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon,
                    context=head_context_spec(backbone.config), rngs=rngs, **head_kwargs)
    return VLA(spec, encoder=encoder, encoder_width=encoder_width, backbone=backbone, head=head, rngs=rngs)
