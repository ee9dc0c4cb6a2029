"""Import of Octo's saved models (``OctoModel.save_pretrained``: ``rail-berkeley/octo-small-1.5`` / ``-base-1.5``).

A checkpoint directory holds ``config.json`` (the training config; ``model`` is a tree of module specs),
``example_batch.msgpack`` (the batch the model was initialised with: it fixes image sizes, the window, the language
input), ``dataset_statistics.json`` and ``<step>/default/checkpoint``: Orbax's aggregated single msgpack file with
every parameter (read with ``flax.serialization.msgpack_restore``: msgpack, no pickle). Parameter names::

    octo_transformer/observation_tokenizers_<cam>/SmallStem16_0/{StdConv_i, GroupNorm_i, embedding}
    octo_transformer/obs_<cam | proprio>_{projection, pos_embedding}, task_language_{projection, pos_embedding},
        readout_action_pos_embedding, task_tokenizers_language/hf_model/... (T5, HF-Flax names)
    octo_transformer/BlockTransformer_0/Transformer_0/encoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_0,
        LayerNorm_1, MlpBlock_0/Dense_{0,1}}, .../encoder_norm
    heads_action/diffusion_model/{time_preprocess, cond_encoder/Dense_{0,1}, reverse_network/{Dense_0,
        MLPResNetBlock_i, Dense_1}}  (DiffusionActionHead)   heads_action/{map_head, mean_proj}  (L1ActionHead)

Flax attention kernels ``(D, heads, head_dim)`` / ``(heads, head_dim, D)`` are flattened to vlax's ``Dense``.
Actions are un-normalized with the ``normal`` (mean / std, masked dims left as they are) statistics of one
dataset key (:func:`action_normalization`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx, serialization, traverse_util

from vlax.data.normalization import NormalizationArtifact
from vlax.encoders.t5 import T5_BASE, T5Config
from vlax.policy import PolicySpec
from vlax.presets.octo import CameraSizes, OctoPolicy, OctoSizes
from vlax.weights.common import CheckpointError, assign_params, rename_tensors, stack_numbered
from vlax.weights.t5 import convert_t5_tensors, flax_names_to_torch

STATISTICS_NAME = "dataset_statistics.json"
EXAMPLE_BATCH_NAME = "example_batch.msgpack"
STEMS = {"SmallStem16": 16, "SmallStem32": 32}
T5_ENCODERS = {"t5-base": T5_BASE}
_T = "octo_transformer/"
_TF = _T + r"BlockTransformer_0/Transformer_0/"
_ATTN = r"MultiHeadDotProductAttention_0/"


def _heads_first(w: np.ndarray) -> np.ndarray:
    """Flax MHA ``query|key|value`` kernel ``(D, H, Dh)`` -> ``(D, H * Dh)``; bias ``(H, Dh)`` -> ``(H * Dh)``."""
    return w.reshape(w.shape[0], -1) if w.ndim == 3 else w.reshape(-1)


def _out_kernel(w: np.ndarray) -> np.ndarray:
    """Flax MHA ``out`` kernel ``(H, Dh, D)`` -> ``(H * Dh, D)``."""
    return w.reshape(-1, w.shape[-1])


def _drop_batch(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[1:])


def _attention_rules(src: str, dst: str) -> list:
    rules, leaf = [], "\\" + str(re.compile(src).groups + 1)  # the (kernel|bias) group after src's own
    for flax_name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        rules += [(src + flax_name + r"/(kernel|bias)", dst + ours + "." + leaf, _heads_first)]
    return rules + [(src + r"out/kernel", dst + "o_proj.kernel", _out_kernel), (src + r"out/bias", dst + "o_proj.bias",
                                                                                None)]


RULES = [
    (_T + r"observation_tokenizers_(\w+?)/SmallStem\d+_0/StdConv_(\d+)/(kernel|bias)",
     r"image_tokenizers.\1.convs.\2.\3", None),
    (_T + r"observation_tokenizers_(\w+?)/SmallStem\d+_0/GroupNorm_(\d+)/(scale|bias)",
     r"image_tokenizers.\1.norms.\2.\3", None),
    (_T + r"observation_tokenizers_(\w+?)/SmallStem\d+_0/embedding/(kernel|bias)",
     r"image_tokenizers.\1.embedding.\2", None),
    (_T + r"obs_(\w+?)_projection/(kernel|bias)", r"obs_projections.\1.\2", None),
    (_T + r"obs_(\w+?)_pos_embedding", r"obs_pos_embeddings.\1", _drop_batch),
    (_T + r"task_language_projection/(kernel|bias)", r"language_projection.\1", None),
    (_T + r"task_language_pos_embedding", "language_pos_embedding", _drop_batch),
    (_T + r"readout_action_pos_embedding", "readout_pos_embedding", _drop_batch),
    (_TF + r"encoderblock_(\d+)/LayerNorm_0/(scale|bias)", r"transformer.layers.\1.norm1.\2", None),
    (_TF + r"encoderblock_(\d+)/LayerNorm_1/(scale|bias)", r"transformer.layers.\1.norm2.\2", None),
    *_attention_rules(_TF + r"encoderblock_(\d+)/" + _ATTN, r"transformer.layers.\1.attn."),
    (_TF + r"encoderblock_(\d+)/MlpBlock_0/Dense_0/(kernel|bias)", r"transformer.layers.\1.mlp.fc1.\2", None),
    (_TF + r"encoderblock_(\d+)/MlpBlock_0/Dense_1/(kernel|bias)", r"transformer.layers.\1.mlp.fc2.\2", None),
    (_TF + r"encoder_norm/(scale|bias)", r"transformer.final_norm.\1", None),
    # DiffusionActionHead's ScoreActor (per-block names, stacked below)
    (r"heads_action/diffusion_model/time_preprocess/kernel", "head.denoiser.time_features.kernel", None),
    (r"heads_action/diffusion_model/cond_encoder/Dense_0/(kernel|bias)", r"head.denoiser.time_mlp_in.\1", None),
    (r"heads_action/diffusion_model/cond_encoder/Dense_1/(kernel|bias)", r"head.denoiser.time_mlp_out.\1", None),
    (r"heads_action/diffusion_model/reverse_network/Dense_0/(kernel|bias)", r"head.denoiser.input_proj.\1", None),
    (r"heads_action/diffusion_model/reverse_network/Dense_1/(kernel|bias)", r"head.denoiser.output_proj.\1", None),
    (r"heads_action/diffusion_model/reverse_network/MLPResNetBlock_\*/LayerNorm_0/(scale|bias)",
     r"head.denoiser.blocks.norm.\1", None),
    (r"heads_action/diffusion_model/reverse_network/MLPResNetBlock_\*/Dense_0/(kernel|bias)",
     r"head.denoiser.blocks.dense1.\1", None),
    (r"heads_action/diffusion_model/reverse_network/MLPResNetBlock_\*/Dense_1/(kernel|bias)",
     r"head.denoiser.blocks.dense2.\1", None),
    # MAP pooling (L1ActionHead, or a DiffusionActionHead with use_map) and the L1 head's projection
    (r"heads_action/map_head/probe", "head.pool.probe", _drop_batch),
    *_attention_rules(r"heads_action/map_head/" + _ATTN, "head.pool.attn."),
    (r"heads_action/map_head/LayerNorm_0/(scale|bias)", r"head.pool.norm.\1", None),
    (r"heads_action/map_head/MlpBlock_0/Dense_0/(kernel|bias)", r"head.pool.mlp.fc1.\1", None),
    (r"heads_action/map_head/MlpBlock_0/Dense_1/(kernel|bias)", r"head.pool.mlp.fc2.\1", None),
    (r"heads_action/mean_proj/(kernel|bias)", r"head.mean_proj.\1", None),
]
_T5_PREFIX = _T + "task_tokenizers_language/hf_model/"


# ---- files ----------------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: an Octo checkpoint directory (OctoModel.save_pretrained) holds "
                              f"config.json, {EXAMPLE_BATCH_NAME}, {STATISTICS_NAME} and <step>/default/checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); download the checkpoint again") from None


def read_msgpack(path: Path) -> dict[str, np.ndarray]:
    """A flax msgpack file as ``{"a/b/c": array}`` (``flax.serialization.msgpack_restore``: no code runs)."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types for a damaged file
        raise CheckpointError(f"{path} is not a readable flax msgpack file ({type(e).__name__}: {e}); download "
                              "it again (an interrupted copy leaves a truncated file)") from None
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def checkpoint_file(path: str | Path, step: int | None = None) -> Path:
    """``<path>/<step>/default/checkpoint`` (the single numeric step directory unless ``step`` is given)."""
    path = Path(path)
    steps = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()) if path.is_dir() else []
    if step is None:
        if len(steps) != 1:
            raise CheckpointError(f"{path}: expected one numeric step directory holding default/checkpoint, found "
                                  f"{steps or 'none'}; pass step= one of them")
        step = steps[0]
    file = path / str(step) / "default" / "checkpoint"
    if not file.is_file():
        raise CheckpointError(f"{file} not found: Octo checkpoints saved with aggregation keep every array in this "
                              "one msgpack file (a checkpoint written without it is not supported)")
    return file


# ---- config -> sizes ------------------------------------------------------------------------------------------------

def _kwargs(spec: Mapping[str, Any], what: str, names: tuple[str, ...]) -> dict:
    if not isinstance(spec, Mapping) or spec.get("name") not in names:
        got = spec.get("name") if isinstance(spec, Mapping) else spec
        raise CheckpointError(f"config.json: {what} is {got!r}; the octo preset supports {list(names)}")
    return dict(spec.get("kwargs") or {})


def _camera(key: str) -> str:
    if not key.startswith("image_"):
        raise CheckpointError(f"config.json: image tokenizer key {key!r}; the octo preset reads 'image_<camera>'")
    return key[len("image_"):]


def octo_layout(path: str | Path) -> tuple[OctoSizes, PolicySpec, str, dict]:
    """``(sizes, spec, head name, head kwargs)`` of an Octo checkpoint's ``config.json`` + example batch."""
    path = Path(path)
    config = _read_json(path / "config.json")
    model = dict(config.get("model") or {})
    batch = read_msgpack(path / EXAMPLE_BATCH_NAME)
    cameras, proprio_dim, state_dim = [], 0, 0
    for name, tok in sorted(dict(model.get("observation_tokenizers") or {}).items()):
        if tok.get("name") == "LowdimObsTokenizer":
            kw = dict(tok.get("kwargs") or {})
            if kw.get("discretize", False):
                raise CheckpointError(f"config.json: observation tokenizer {name!r} discretizes proprio; the octo "
                                      "preset supports the continuous LowdimObsTokenizer")
            if name != "proprio" or list(kw.get("obs_keys") or []) != ["proprio"]:
                raise CheckpointError(f"config.json: LowdimObsTokenizer {name!r} on {kw.get('obs_keys')}; the octo "
                                      "preset supports one named 'proprio' on obs_keys ['proprio']")
            proprio_dim = state_dim = int(batch["observation/proprio"].shape[-1])
            continue
        kw = _kwargs(tok, f"observation tokenizer {name!r}", ("ImageTokenizer",))
        if kw.get("use_token_learner") or kw.get("task_film_keys"):
            raise CheckpointError(f"config.json: image tokenizer {name!r} uses a token learner or FiLM; not "
                                  "supported by the octo preset")
        keys = list(kw.get("obs_stack_keys") or [])
        if len(keys) != 1:
            raise CheckpointError(f"config.json: image tokenizer {name!r} stacks {keys}; the octo preset takes one "
                                  "camera per tokenizer")
        if _camera(keys[0]) != name:
            raise CheckpointError(f"config.json: image tokenizer {name!r} reads {keys[0]!r}; the octo preset names "
                                  "each tokenizer after its camera")
        enc = dict(kw["encoder"])
        stem = _kwargs(enc, f"image encoder of {name!r}", tuple(STEMS))
        image = batch[f"observation/{keys[0]}"]
        cameras.append(CameraSizes(name=name, image_size=int(image.shape[2]),
                                   features=tuple(int(f) for f in stem.get("features", (32, 96, 192, 384))),
                                   num_features=int(stem.get("num_features", 512)), patch_size=STEMS[enc["name"]],
                                   goal=bool(kw.get("task_stack_keys"))))
    tasks = dict(model.get("task_tokenizers") or {})
    unknown = sorted(set(tasks) - {"language"})
    if unknown:
        raise CheckpointError(f"config.json: task tokenizers {unknown}; the octo preset supports 'language' only")
    language, t5, dim, tokens = "none", None, 0, 0
    if tasks:
        kw = _kwargs(tasks["language"], "task tokenizer 'language'", ("LanguageTokenizer",))
        encoder = kw.get("encoder")
        if encoder is None:
            language = "embeddings"
            emb = batch["task/language_instruction"]
            dim, tokens = int(emb.shape[-1]), int(emb.shape[1] if emb.ndim == 3 else 1)
        elif encoder in T5_ENCODERS:
            language, t5 = "t5", T5_ENCODERS[encoder]
            dim, tokens = t5.d_model, int(batch["task/language_instruction/input_ids"].shape[1])
        else:
            raise CheckpointError(f"config.json: language encoder {encoder!r}; supported: {sorted(T5_ENCODERS)}")
    readouts = dict(model.get("readouts") or {})
    if set(readouts) != {"action"}:
        raise CheckpointError(f"config.json: readouts {sorted(readouts)}; the octo preset supports ['action']")
    tf = dict(model.get("transformer_kwargs") or {})
    sizes = OctoSizes(cameras=tuple(cameras), width=int(model["token_embedding_size"]), depth=int(tf["num_layers"]),
                      mlp_dim=int(tf["mlp_dim"]), num_heads=int(tf["num_attention_heads"]),
                      max_horizon=int(model.get("max_horizon", 10)), proprio_dim=proprio_dim, language=language,
                      language_dim=dim, language_tokens=tokens, t5=t5, num_readouts=int(readouts["action"]),
                      repeat_task_tokens=bool(model.get("repeat_task_tokens", False)),
                      use_correct_attention=bool(model.get("use_correct_attention", False)))
    head_name, head_kwargs, horizon, action_dim = _head(dict(dict(model.get("heads") or {}).get("action") or {}))
    window = int(config.get("window_size") or batch["observation/timestep_pad_mask"].shape[1])
    spec = PolicySpec(cameras=tuple(c.name for c in cameras) or ("none",),
                      image_size=cameras[0].image_size if cameras else 0, state_dim=state_dim,
                      action_dim=action_dim, horizon=horizon, max_text_len=tokens, state_input="none",
                      obs_history=window, action_chunks="every_step")
    return sizes, spec, head_name, head_kwargs


def _head(spec: Mapping[str, Any]) -> tuple[str, dict, int, int]:
    kw = _kwargs(spec, "heads.action", ("DiffusionActionHead", "L1ActionHead", "MSEActionHead"))
    if kw.get("readout_key", "readout_action") != "readout_action":
        raise CheckpointError(f"config.json: the action head reads {kw['readout_key']!r}; supported: readout_action")
    horizon, action_dim = int(kw.get("action_horizon", 1)), int(kw.get("action_dim", 7))
    if spec["name"] == "DiffusionActionHead":
        return "diffusion", dict(
            num_train_timesteps=int(kw.get("diffusion_steps", 20)), clip_sample_range=float(kw.get("max_action", 5.0)),
            pool="map" if kw.get("use_map", False) else "mean", num_heads=8,
            denoiser_kwargs=dict(hidden_dim=int(kw.get("hidden_dim", 256)), num_blocks=int(kw.get("num_blocks", 3)),
                                 time_dim=int(kw.get("time_dim", 32)), dropout=float(kw.get("dropout_rate", 0.0)),
                                 use_layer_norm=bool(kw.get("use_layer_norm", True)))), horizon, action_dim
    if not kw.get("use_map", True):
        raise CheckpointError("config.json: an L1/MSE action head without MAP pooling; the octo preset's l1_map "
                              "head imports the MAP form (use_map=True, Octo's default)")
    loss = "l1" if spec["name"] == "L1ActionHead" else "mse"
    return "l1_map", dict(pool="map", max_action=float(kw.get("max_action", 5.0)), loss=loss), horizon, action_dim


# ---- parameters -----------------------------------------------------------------------------------------------------

def convert_octo_params(params: Mapping[str, np.ndarray], sizes: OctoSizes
                        ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Octo's ``{"octo_transformer/...": array}`` -> ``({vlax dotted path: array}, {path: checkpoint name})``."""
    t5 = {k[len(_T5_PREFIX):]: v for k, v in params.items() if k.startswith(_T5_PREFIX)}
    rest = {k: v for k, v in params.items() if not k.startswith(_T5_PREFIX)}
    block = "heads_action/diffusion_model/reverse_network/MLPResNetBlock_"
    dotted = {(k.replace(block, "block.") if k.startswith(block) else k): v for k, v in rest.items()}
    stacked = stack_numbered({re.sub(r"^block\.(\d+)/", r"block.\1.", k): v for k, v in dotted.items()}, "block.",
                             out_prefix=block + "*/")
    flat, sources = rename_tensors(stacked, RULES)
    if t5:
        if sizes.t5 is None:
            raise CheckpointError("the checkpoint holds a T5 language encoder (task_tokenizers_language/hf_model) "
                                  "but its config.json names none")
        t5_flat, t5_sources = convert_t5_tensors(flax_names_to_torch(t5), sizes.t5)
        flat.update({"t5." + k: v for k, v in t5_flat.items()})
        sources.update({"t5." + k: _T5_PREFIX + v for k, v in t5_sources.items()})
    return flat, sources


def load_octo(path: str | Path, *, step: int | None = None, dtype=None) -> OctoPolicy:
    """An :class:`vlax.presets.octo.OctoPolicy` holding a local Octo checkpoint directory.

    Missing, unexpected and wrongly shaped parameters are all named in one :class:`CheckpointError`.
    """
    sizes, spec, head_name, head_kwargs = octo_layout(path)
    params = read_msgpack(checkpoint_file(path, step))
    flat, sources = convert_octo_params(params, sizes)
    model = nnx.eval_shape(lambda: OctoPolicy(spec, sizes, head_name=head_name, head_kwargs=head_kwargs,
                                              rngs=nnx.Rngs(0)))
    return assign_params(model, flat, sources=sources, dtype=dtype)


# ---- statistics -----------------------------------------------------------------------------------------------------

def dataset_statistics(path: str | Path) -> dict:
    """``dataset_statistics.json`` of a checkpoint; a clear error when it is missing."""
    file = Path(path) / STATISTICS_NAME
    if not file.is_file():
        raise CheckpointError(f"{file} not found: un-normalizing Octo's actions needs the statistics of the data the "
                              f"model was trained (or fine-tuned) on; copy {STATISTICS_NAME} from the original "
                              "checkpoint (or the fine-tuning run) into this directory")
    return _read_json(file)


def _select(stats: dict, dataset: str | None, path: Path) -> tuple[str, dict]:
    if "action" in stats:  # flat statistics of one dataset (Octo's fine-tuning writes these)
        if dataset is not None:
            raise ValueError(f"{path / STATISTICS_NAME} holds the statistics of one dataset (no dataset keys); "
                             f"pass dataset=None instead of {dataset!r}")
        return "", stats
    keys = sorted(k for k, v in stats.items() if isinstance(v, Mapping) and "action" in v)
    if dataset is None:
        if len(keys) != 1:
            raise ValueError(f"{path / STATISTICS_NAME} has statistics of several datasets {keys}: pass dataset= "
                             "one of them")
        dataset = keys[0]
    if dataset not in keys:
        raise ValueError(f"dataset={dataset!r} is not in {path / STATISTICS_NAME}; known keys: {keys}")
    return dataset, stats[dataset]


def action_normalization(path: str | Path, dataset: str | None = None) -> NormalizationArtifact:
    """The ``normal`` (mean / std) normalization of the actions (and proprio as ``state``, when recorded) under
    ``dataset`` (``None``: the only one); dims whose ``mask`` is False (the gripper) stay as they are."""
    path = Path(path)
    name, entry = _select(dataset_statistics(path), dataset, path)
    keys, masks, padded, stats = [], {}, {}, {}
    for ours, theirs in (("action", "action"), ("state", "proprio")):
        if theirs not in entry:
            continue
        s = dict(entry[theirs])
        dim = len(s["mean"])
        full = {k: [float(x) for x in s.get(src, s["mean"])] for k, src in
                (("mean", "mean"), ("std", "std"), ("min", "min"), ("max", "max"), ("q01", "p01"), ("q99", "p99"))}
        keys.append(ours)
        masks[ours] = tuple(bool(m) for m in s.get("mask", [True] * dim))
        padded[ours], stats[ours] = dim, full
    return NormalizationArtifact(type="normal", keys=tuple(keys), masks=masks, padded_dims=padded, stats=stats,
                                 dataset_hash=f"octo:{name or path.name}", dataset_name=name)


__all__ = ["load_octo", "octo_layout", "convert_octo_params", "read_msgpack", "checkpoint_file",
           "dataset_statistics", "action_normalization", "RULES"]
