"""Import openpi checkpoints: the orbax ``params/`` tree into :class:`vlax.presets.pi0.Pi0Policy`, and
``assets/<asset_id>/norm_stats.json`` into a :class:`vlax.data.normalization.NormalizationArtifact`.

openpi's released ``checkpoints/<name>/params`` is an orbax PyTree checkpoint (OCDBT) of ``{"params": tree}``:

* ``PaliGemma/img/...``: big_vision's SigLIP (``embedding``, ``pos_embedding``, ``Transformer/encoderblock/...``
  stacked over layers, ``encoder_norm``) and ``head``, the projection to the LM width;
* ``PaliGemma/llm/...``: Gemma with its layers stacked, attention as einsum weights (``q_einsum [L, N, D, H]`` +
  ``kv_einsum [L, 2, K, D, H]``, or ``qkv_einsum [L, 3, N, D, H]`` when K = N; ``attn_vec_einsum [L, N, H, D]``),
  the MLP as ``gating_einsum [L, 2, D, F]`` + ``linear [L, F, D]``; the action expert's weights are the same
  names with the suffix ``_1``;
* the flow head's projections: ``action_in_proj``, ``action_out_proj`` and ``state_proj`` +
  ``action_time_mlp_{in,out}`` (π0) or ``time_mlp_{in,out}`` (π0.5);
* in fine-tuned checkpoints, LoRA adapters beside the einsum weights (folded into them on import).

The variant is read from the keys: π0, π0.5, or π0-FAST (PaliGemma alone, loaded with the ``fast`` head, which
decodes FAST tokens through Gemma's tied LM head; its tokenizer comes from ``model.head_kwargs.tokenizer``, for
openpi's models a local copy of the ``physical-intelligence/fast`` processor directory). A π0-FAST checkpoint is
set up for openpi's token layout (``model.fast_layout='openpi'``: FAST ids below PaliGemma's last 128 ids,
``Action: ... |`` around them) whenever PaliGemma's text tokenizer is configured (``model.tokenizer``: its
``tokenizer.model``); without one it falls back, with a warning, to vlax's own layout, which only fits policies
vlax trained and exported itself.

Example::

    policy, sizes = load_openpi("checkpoints/pi05_libero/params", model)      # model: a config's model section
    norm = load_norm_stats("checkpoints/pi05_libero/assets/physical-intelligence/libero/norm_stats.json")
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from vlax.data.normalization import NormalizationArtifact
from vlax.weights.common import CheckpointError, assign_params, param_shapes
from vlax.weights.openpi_lora import fold_lora

VARIANTS = ("pi0", "pi05", "pi0_fast")


# ---- reading the orbax tree ---------------------------------------------------------------------------------------
def is_openpi_params(path: str | Path) -> bool:
    """True when ``path`` is an orbax checkpoint directory (``_METADATA`` or ``_CHECKPOINT_METADATA`` inside)."""
    p = Path(path)
    return p.is_dir() and ((p / "_METADATA").is_file() or (p / "_CHECKPOINT_METADATA").is_file())


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def read_params(path: str | Path) -> dict[str, np.ndarray]:
    """``{"PaliGemma/llm/...": array}`` of an openpi ``params/`` directory, as host numpy arrays (fp32 or bf16
    as stored). Anything that is not an orbax checkpoint with a top-level ``params`` item is one clear error."""
    import orbax.checkpoint as ocp  # imported here: only this importer needs orbax

    path = Path(path).absolute()
    if not is_openpi_params(path):
        raise CheckpointError(f"{path} is not an openpi params directory: expected an orbax checkpoint (a "
                              "_METADATA file inside), i.e. checkpoints/<config>/<step>/params; a LeRobot policy "
                              "directory (config.json + model.safetensors) is read by vlax.weights.lerobot_policy")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        meta = getattr(meta, "item_metadata", meta)  # a StepMetadata in orbax >= 0.11.22
        tree = dict(meta.tree if hasattr(meta, "tree") else meta)
        if "params" not in tree:
            raise CheckpointError(f"{path} holds an orbax tree with top-level keys {sorted(tree)}; openpi writes "
                                  "{'params': ...}")
        item = {"params": tree["params"]}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
    return {k: np.asarray(v) for k, v in _flatten(restored["params"]).items()}


def detect_variant(keys: set[str] | list[str]) -> str:
    """``"pi0"``, ``"pi05"`` or ``"pi0_fast"`` from the key paths; anything else is a :class:`CheckpointError`."""
    keys = set(keys)
    has_expert = any(k.startswith("PaliGemma/llm/layers/attn/") and k.split("/")[4].endswith("_1") for k in keys
                     if k.count("/") >= 4)
    if "time_mlp_in/kernel" in keys and has_expert:
        return "pi05"
    if "action_time_mlp_in/kernel" in keys and "state_proj/kernel" in keys and has_expert:
        return "pi0"
    if "PaliGemma/llm/embedder/input_embedding" in keys and "action_in_proj/kernel" not in keys and not has_expert:
        return "pi0_fast"
    raise CheckpointError("these params are none of openpi's π0 (state_proj + action_time_mlp_in + expert '_1' "
                          "weights), π0.5 (time_mlp_in + expert) or π0-FAST (PaliGemma only); first keys: "
                          f"{sorted(keys)[:8]}")


# ---- key map -------------------------------------------------------------------------------------------------------
def _heads_last(w: np.ndarray, axis_in: int) -> np.ndarray:
    """Einsum weight ``[L, N, D, H]`` (heads before the input dim) -> dense kernel ``[L, D, N * H]``."""
    w = np.moveaxis(w, axis_in, 1)
    return w.reshape(w.shape[0], w.shape[1], -1)


def _llm_tensors(flat: Mapping[str, np.ndarray], suffix: str, target: str, *, unit_offset: bool,
                 sources: dict[str, str]) -> dict[str, np.ndarray]:
    """The Gemma stack (``suffix=''``) or the action expert (``'_1'``) in vlax names under ``target``."""
    base = "PaliGemma/llm/layers/"
    out: dict[str, np.ndarray] = {}

    def put(name: str, value: np.ndarray, source: str) -> None:
        out[f"{target}.{name}"] = value
        sources[f"{target}.{name}"] = source

    attn = base + f"attn/"
    if attn + f"qkv_einsum{suffix}/w" in flat:
        w = flat[attn + f"qkv_einsum{suffix}/w"]  # [L, 3, N, D, H]
        for i, proj in enumerate("qkv"):
            put(f"self_attn.{proj}_proj.kernel", _heads_last(w[:, i], 2), attn + f"qkv_einsum{suffix}/w")
    else:
        put("self_attn.q_proj.kernel", _heads_last(flat[attn + f"q_einsum{suffix}/w"], 2), attn + f"q_einsum{suffix}/w")
        kv = flat[attn + f"kv_einsum{suffix}/w"]  # [L, 2, K, D, H]
        put("self_attn.k_proj.kernel", _heads_last(kv[:, 0], 2), attn + f"kv_einsum{suffix}/w")
        put("self_attn.v_proj.kernel", _heads_last(kv[:, 1], 2), attn + f"kv_einsum{suffix}/w")
    o = flat[attn + f"attn_vec_einsum{suffix}/w"]  # [L, N, H, D]
    put("self_attn.o_proj.kernel", o.reshape(o.shape[0], -1, o.shape[-1]), attn + f"attn_vec_einsum{suffix}/w")
    gating = flat[base + f"mlp{suffix}/gating_einsum"]  # [L, 2, D, F]
    put("mlp.gate_proj.kernel", gating[:, 0], base + f"mlp{suffix}/gating_einsum")
    put("mlp.up_proj.kernel", gating[:, 1], base + f"mlp{suffix}/gating_einsum")
    put("mlp.down_proj.kernel", flat[base + f"mlp{suffix}/linear"], base + f"mlp{suffix}/linear")
    for theirs, ours in (("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm")):
        _norm(flat, base + theirs + suffix, f"{target}.{ours}", unit_offset, out, sources)
    return out


def _norm(flat: Mapping[str, np.ndarray], name: str, target: str, unit_offset: bool, out: dict, sources: dict
          ) -> None:
    """Gemma RMSNorm ``scale`` (used as ``1 + scale``) or adaRMS ``Dense_0`` (kernel, bias) -> vlax norm."""
    if f"{name}/scale" in flat:
        w = flat[f"{name}/scale"]
        # the expert's plain RMSNorm multiplies by its scale; openpi's Gemma norm by 1 + scale
        out[f"{target}.scale"] = w if unit_offset else (w.astype(np.float32) + 1.0).astype(w.dtype)
        sources[f"{target}.scale"] = f"{name}/scale"
    else:
        for leaf in ("kernel", "bias"):
            out[f"{target}.modulation.{leaf}"] = flat[f"{name}/Dense_0/{leaf}"]
            sources[f"{target}.modulation.{leaf}"] = f"{name}/Dense_0/{leaf}"


def _vision_tensors(flat: Mapping[str, np.ndarray], sources: dict[str, str]) -> dict[str, np.ndarray]:
    img, blk = "PaliGemma/img/", "PaliGemma/img/Transformer/encoderblock/"
    out: dict[str, np.ndarray] = {}

    def put(name: str, value: np.ndarray, source: str) -> None:
        out[name] = value
        sources[name] = source

    put("vision.embeddings.patch_embedding.kernel", flat[img + "embedding/kernel"], img + "embedding/kernel")
    put("vision.embeddings.patch_embedding.bias", flat[img + "embedding/bias"], img + "embedding/bias")
    pos = flat[img + "pos_embedding"]
    put("vision.embeddings.position_embedding", pos.reshape(pos.shape[-2:]), img + "pos_embedding")
    for theirs, ours in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        for leaf in ("scale", "bias"):
            put(f"vision.encoder.layers.{ours}.{leaf}", flat[blk + f"{theirs}/{leaf}"], blk + f"{theirs}/{leaf}")
    for theirs, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        for leaf in ("kernel", "bias"):
            src = blk + f"MlpBlock_0/{theirs}/{leaf}"
            put(f"vision.encoder.layers.mlp.{ours}.{leaf}", flat[src], src)
    mha = blk + "MultiHeadDotProductAttention_0/"
    for theirs, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        k, b = flat[mha + f"{theirs}/kernel"], flat[mha + f"{theirs}/bias"]  # [L, D, N, H], [L, N, H]
        put(f"vision.encoder.layers.self_attn.{ours}.kernel", k.reshape(*k.shape[:2], -1), mha + f"{theirs}/kernel")
        put(f"vision.encoder.layers.self_attn.{ours}.bias", b.reshape(b.shape[0], -1), mha + f"{theirs}/bias")
    k = flat[mha + "out/kernel"]  # [L, N, H, D]
    put("vision.encoder.layers.self_attn.o_proj.kernel", k.reshape(k.shape[0], -1, k.shape[-1]), mha + "out/kernel")
    put("vision.encoder.layers.self_attn.o_proj.bias", flat[mha + "out/bias"], mha + "out/bias")
    for leaf in ("scale", "bias"):
        src = "PaliGemma/img/Transformer/encoder_norm/" + leaf
        put(f"vision.post_layernorm.{leaf}", flat[src], src)
    for leaf in ("kernel", "bias"):
        put(f"img_proj.{leaf}", flat[img + f"head/{leaf}"], img + f"head/{leaf}")
    return out


HEAD_PROJECTIONS = ("action_in_proj", "action_out_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out",
                    "time_mlp_in", "time_mlp_out")


def convert_params(flat: Mapping[str, np.ndarray], *, lora_scale: float = 1.0
                   ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """openpi key paths -> ``({vlax path: array}, {vlax path: openpi path})`` for :class:`Pi0Policy`.

    LoRA adapters of fine-tuned checkpoints are folded into their base weights (:mod:`vlax.weights.openpi_lora`;
    ``lora_scale``: the attention adapters' alpha / rank, 1.0 in openpi's LoRA variants). Every openpi key must be
    used; one left over is named in a :class:`CheckpointError`.
    """
    flat, folded = fold_lora(flat, attention_scale=lora_scale)
    variant = detect_variant(flat)
    sources: dict[str, str] = {}
    out = _vision_tensors(flat, sources)
    out["backbone.embed_tokens.embedding"] = flat["PaliGemma/llm/embedder/input_embedding"]
    sources["backbone.embed_tokens.embedding"] = "PaliGemma/llm/embedder/input_embedding"
    _norm(flat, "PaliGemma/llm/final_norm", "backbone.norm", True, out, sources)
    out.update(_llm_tensors(flat, "", "backbone.layers", unit_offset=True, sources=sources))
    if variant != "pi0_fast":  # π0-FAST is PaliGemma alone: its head decodes through Gemma's tied LM head
        out.update(_llm_tensors(flat, "_1", "head.expert.layers", unit_offset=False, sources=sources))
        _norm(flat, "PaliGemma/llm/final_norm_1", "head.expert.norm", False, out, sources)
    for name in HEAD_PROJECTIONS:
        for leaf in ("kernel", "bias"):
            if f"{name}/{leaf}" in flat:
                out[f"head.{name}.{leaf}"] = flat[f"{name}/{leaf}"]
                sources[f"head.{name}.{leaf}"] = f"{name}/{leaf}"
    unused = sorted(set(flat) - set(sources.values()))
    if unused:
        raise CheckpointError(f"openpi params not understood by this importer: {unused}")
    for name, source in sources.items():
        if source in folded:
            sources[name] = f"{source} + {' @ '.join(folded[source])}"
    return out, sources


def model_config(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The ``model.pi0`` entries (vocabulary, SigLIP sizes, π0 or π0.5) this checkpoint implies; the Gemma
    variants are recognised from their shapes."""
    from vlax.presets.pi0 import GEMMA_VARIANTS

    variant = detect_variant(flat)

    def gemma(suffix: str) -> str:
        o = flat[f"PaliGemma/llm/layers/attn/attn_vec_einsum{suffix}/w"]  # [L, N, H, D]
        mlp = flat[f"PaliGemma/llm/layers/mlp{suffix}/linear"]  # [L, F, D]
        found = (o.shape[-1], o.shape[0], mlp.shape[1], o.shape[1])
        for name, sizes in GEMMA_VARIANTS.items():
            if sizes[:4] == found and sizes[5] == o.shape[2]:
                return name
        raise CheckpointError(f"Gemma{suffix or ''} of width, depth, mlp, heads = {found} is no known variant; "
                              f"known: {GEMMA_VARIANTS}")

    q = flat["PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"]  # [L, D, N, H]
    mlp = flat["PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"]
    patch = flat["PaliGemma/img/embedding/kernel"].shape[0]
    grid = int(math.isqrt(flat["PaliGemma/img/pos_embedding"].shape[-2]))
    vision = dict(variant=f"So400m/{patch}", width=int(q.shape[1]), depth=int(q.shape[0]), mlp_dim=int(mlp.shape[-1]),
                  num_heads=int(q.shape[2]), image_size=grid * patch)
    vocab = int(flat["PaliGemma/llm/embedder/input_embedding"].shape[0])
    if variant == "pi0_fast":
        # no action expert: the preset's expert sizes are unused by the FAST head, set to the LM's own
        return dict(paligemma_variant=gemma(""), action_expert_variant=gemma(""), vision=vision, vocab_size=vocab,
                    pi05=False)
    return dict(paligemma_variant=gemma(""), action_expert_variant=gemma("_1"), vision=vision, vocab_size=vocab,
                pi05=variant == "pi05")


def load_openpi(path: str | Path, model: Mapping[str, Any], spec, *, dtype=None, shardings: Any = None,
                rngs: nnx.Rngs | None = None, lora_scale: float = 1.0):
    """A :class:`vlax.presets.pi0.Pi0Policy` holding the openpi ``params/`` at ``path``.

    ``model``: the config's ``model`` section; its ``pi0`` entries are filled in from the checkpoint (explicit ones
    must agree). ``spec``: the :class:`vlax.policy.PolicySpec`. The policy is built abstractly
    (``nnx.eval_shape``) and every parameter is written once from the checkpoint, cast to ``dtype`` when given.
    ``shardings`` (``{vlax path: jax.sharding.Sharding}``) places each array on its sharding as it is converted.
    Missing and unexpected keys are all named in one :class:`CheckpointError`. LoRA adapters are folded into
    the base weights (``lora_scale``: see :func:`convert_params`).
    """
    from vlax.presets.pi0 import Pi0Policy, sizes_from_model

    flat = read_params(path)
    tensors, sources = convert_params(flat, lora_scale=lora_scale)
    found = model_config(flat)
    head_name, head_kwargs = model.get("head") or None, {}
    if detect_variant(flat) == "pi0_fast":
        head_name = head_name or "fast"
        if head_name != "fast":
            raise CheckpointError(f"{path} is a π0-FAST checkpoint (no action expert); model.head={head_name!r} "
                                  "needs one: use model.head='fast'")
        head_kwargs = _fast_head_kwargs(model, spec, path)
    given = dict(dict(model).get("pi0", {}))
    conflicts = {k: (given[k], v) for k, v in found.items() if k in given and k != "vision" and given[k] != v}
    if conflicts:
        raise CheckpointError(f"model.pi0 disagrees with the checkpoint at {path} on (config, checkpoint) = "
                              f"{conflicts}; drop those entries to take the checkpoint's")
    model = {**dict(model), "pi0": {**found, **{k: v for k, v in given.items() if k not in found}}}
    sizes = sizes_from_model(model)
    abstract = nnx.eval_shape(lambda: Pi0Policy(spec, sizes, head_name=head_name, head_kwargs=head_kwargs,
                                                rngs=rngs or nnx.Rngs(0)))
    if shardings is not None:
        from vlax.train.finetune import place_array

        shapes = param_shapes(abstract)
        tensors = {k: place_array(v, shardings[k], dtype or shapes[k].dtype, name=k, shape=shapes[k].shape)
                   if k in shardings and k in shapes else v for k, v in tensors.items()}
    return assign_params(abstract, tensors, dtype=dtype, sources=sources), sizes


def _fast_head_kwargs(model: Mapping[str, Any], spec, path: str | Path) -> dict[str, Any]:
    """The ``fast`` head's kwargs for a π0-FAST checkpoint: openpi's layout unless the config says otherwise or
    no PaliGemma tokenizer is configured (then vlax's, warned about)."""
    from vlax.presets.pi0 import fast_head_kwargs, fast_layout, fast_text_tokenizer

    kwargs = {**dict(dict(model.get("head_defaults", {})).get("fast", {})), **dict(model.get("head_kwargs", {}))}
    if kwargs.get("tokenizer") is None:
        return fast_head_kwargs(model, spec, kwargs)  # the error naming model.head_kwargs.tokenizer
    if model.get("fast_layout") or kwargs.get("layout"):
        layout = fast_layout(model)
    elif fast_text_tokenizer(model, kwargs.get("text_tokenizer")) is not None:
        layout = "openpi"
    else:
        warnings.warn(f"the π0-FAST checkpoint at {path} is loaded with vlax's own FAST layout because no PaliGemma "
                      "tokenizer is configured; openpi's π0-FAST checkpoints decode only with "
                      "model.tokenizer=<PaliGemma tokenizer.model> (model.fast_layout='openpi' then follows)",
                      stacklevel=3)
        layout = "vlax"
    return fast_head_kwargs(model, spec, kwargs, layout=layout)


# ---- normalization -----------------------------------------------------------------------------------------------
# openpi's key -> vlax's
NORM_KEYS = {"actions": "action", "state": "state"}


def load_norm_stats(path: str | Path, *, kind: str = "normal", padded_dims: Mapping[str, int] | None = None,
                    masks: Mapping[str, Any] | None = None) -> NormalizationArtifact:
    """openpi's ``norm_stats.json`` (``{"norm_stats": {"actions": {mean, std, q01, q99}, "state": ...}}``) as a
    :class:`NormalizationArtifact`.

    ``kind``: ``"normal"`` (openpi's mean/std, π0) or ``"bounds"`` (its q01/q99 quantiles, π0.5's default).
    ``min``/``max`` are not recorded by openpi and are stored as NaN. A file without ``actions`` is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; openpi keeps it at <checkpoint>/assets/<asset_id>/"
                              "norm_stats.json")
    with open(path) as f:
        data = json.load(f)
    stats = data.get("norm_stats", data) if isinstance(data, dict) else None
    if not isinstance(stats, dict) or "actions" not in stats:
        have = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise CheckpointError(f"{path} has no 'actions' statistics (it has {have}); openpi writes "
                              "{'norm_stats': {'actions': {...}, 'state': {...}}} with compute_norm_stats")
    need = ("mean", "std") if kind == "normal" else ("q01", "q99")
    out: dict[str, dict[str, Any]] = {}
    for theirs, ours in NORM_KEYS.items():
        if theirs not in stats:
            continue
        s = stats[theirs]
        lacking = [n for n in need if s.get(n) is None]
        if lacking:
            raise CheckpointError(f"{path}: '{theirs}' lacks {lacking}, which normalization type {kind!r} needs")
        dim = len(s["mean"] if s.get("mean") is not None else s[need[0]])
        nan = [float("nan")] * dim
        out[ours] = {n: [float(x) for x in s[n]] if s.get(n) is not None else nan
                     for n in ("mean", "std", "q01", "q99")}
        out[ours].update(min=nan, max=nan)
    keys = tuple(out)
    return NormalizationArtifact(
        type=kind, keys=keys,
        masks={k: tuple(bool(b) for b in (masks or {}).get(k, [True] * len(out[k]["mean"]))) for k in keys},
        padded_dims={k: int((padded_dims or {}).get(k, len(out[k]["mean"]))) for k in keys},
        stats=out, dataset_hash=f"openpi-norm-stats-{path.parent.name}", dataset_name=path.parent.name)
