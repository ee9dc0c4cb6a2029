"""Import of Hugging Face OpenVLA checkpoints (``OpenVLAForActionPrediction``, e.g. ``openvla/openvla-7b``).

Tensor layout (prismatic's HF conversion; the towers keep timm's names)::

    vision_backbone.featurizer.*        DINOv2-reg4 (timm): cls_token, reg_token, pos_embed (patches only),
                                        patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1.scale_factor,
                                        norm2, mlp.fc1, mlp.fc2, ls2.scale_factor}, norm
    vision_backbone.fused_featurizer.*  SigLIP (timm): pos_embed, patch_embed.proj, blocks.N.{...}, norm,
                                        attn_pool.{latent, q, kv, proj, norm, mlp.fc1, mlp.fc2}
    projector.fc1..fc3                  the fused-gelu-mlp projector
    language_model.model.* / language_model.lm_head   Llama-2 (see :mod:`vlax.weights.llama`)

Every tensor is loaded, including the 43 that never affect an output (each tower's last block and final norm,
and SigLIP's attention pool: OpenVLA reads the second-to-last block), so the parameter count is the published
one; :func:`unused_tensor_names` lists them. Also read: ``config.json`` (tower sizes, with the
``tiny_timm_overrides`` of test checkpoints), ``dataset_statistics.json`` (``unnorm_key`` -> q01/q99 + mask),
``preprocessor_config.json`` (each tower's mean/std) and ``tokenizer.json``.

OpenVLA-OFT+ (FiLM) checkpoints: OFT's ``finetune.py`` saves the whole FiLM-wrapped vision backbone to
``vision_backbone--{step}_checkpoint.pt`` (a torch pickle: convert it once with
``python -m experiments.convert_torch_checkpoint``, keeping the name, ``.safetensors`` suffix). Its names, as
OFT's module tree gives them (``FiLMedPrismaticVisionBackbone.vision_backbone`` -> ``featurizer`` (DINOv2) /
``fused_featurizer`` (SigLIP) -> ``blocks.N`` = ``FiLMedVisionTransformerBlock``, under peft's LoRA wrapping)::

    vision_backbone.{featurizer,fused_featurizer}.blocks.N.scale.{weight [D, D_llm], bias}       gamma projection
    vision_backbone.{featurizer,fused_featurizer}.blocks.N.shift.{weight, bias}                  beta projection
    vision_backbone.{featurizer,fused_featurizer}.blocks.N.block.<timm block tensor>             the original block
    ... .attn.qkv.base_layer.weight + .lora_A.default.weight [r, in] + .lora_B.default.weight [out, r]  (LoRA)
    vision_backbone.{featurizer,fused_featurizer}.<embeddings, norm, attn_pool ...>             as in model.safetensors

These names are derived from openvla-oft's code (``prismatic/models/film_vit_wrapper.py``, the save in
``vla-scripts/finetune.py``); no FiLM checkpoint has been released to check them against (the released OFT
checkpoints are LIBERO's, without FiLM). The file's towers replace model.safetensors' (OFT's own loader does
the same), with LoRA merged as ``W + (alpha / r) B A``, ``alpha = min(r, 16)`` as OFT's LoraConfig.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from vlax.data.normalization import NormalizationArtifact
from vlax.policy import PolicySpec
from vlax.presets.openvla import OpenVLAPolicy, OpenVLASizes, timm_dinov2_reg, timm_siglip, with_film
from vlax.backbones.config import TransformerConfig
from vlax.weights.common import (PICKLE_SUFFIXES, CheckpointError, assign_params, check_architecture, linear_rules,
                                 norm_rules, read_config, read_safetensors, rename_tensors, safetensors_files,
                                 stack_numbered)
from vlax.weights.llama import convert_decoder_tensors, llama_config_from_hf
from vlax.weights.siglip import conv_kernel

ARCHITECTURES = ("OpenVLAForActionPrediction", "openvla")
DINO_ID, SIGLIP_ID = "vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"
# timm's registered sizes of OpenVLA's towers (embed_dim, depth, num_heads, mlp_ratio)
TIMM_SIZES = {DINO_ID: dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
              SIGLIP_ID: dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362)}
STATISTICS_NAME = "dataset_statistics.json"


def _tower_rules(src: str, dst: str) -> list:
    blk, lay = re.escape(src) + r"blocks\.\*\.", dst + "encoder.layers."
    return [
        (re.escape(src) + r"cls_token", dst + "embeddings.cls_token", lambda w: w.reshape(w.shape[-2:])),
        (re.escape(src) + r"reg_token", dst + "embeddings.register_tokens", lambda w: w.reshape(w.shape[-2:])),
        (re.escape(src) + r"pos_embed", dst + "embeddings.position_embedding", lambda w: w.reshape(w.shape[-2:])),
        (re.escape(src) + r"patch_embed\.proj\.weight", dst + "embeddings.patch_embedding.kernel", conv_kernel),
        (re.escape(src) + r"patch_embed\.proj\.bias", dst + "embeddings.patch_embedding.bias", None),
        *norm_rules(blk + r"norm([12])", lay + r"layer_norm\1"),
        *linear_rules(blk + r"attn\.([qkv])", lay + r"self_attn.\1_proj"),  # split from qkv below
        *linear_rules(blk + r"attn\.proj", lay + "self_attn.o_proj"),
        (blk + r"ls([12])\.scale_factor", lay + r"layer_scale\1.lambda1", None),
        *linear_rules(blk + r"mlp\.(fc[12])", lay + r"mlp.\1"),
        *linear_rules(blk + r"(scale|shift)", lay + r"film.\1"),  # OpenVLA-OFT+'s FiLM (see the module docstring)
        *norm_rules(re.escape(src) + r"norm", dst + "post_layernorm"),
        (re.escape(src) + r"attn_pool\.latent", dst + "head.probe", lambda w: w.reshape(w.shape[-2:])),
        *linear_rules(re.escape(src) + r"attn_pool\.([qkv])", dst + r"head.attention.\1_proj"),
        *linear_rules(re.escape(src) + r"attn_pool\.proj", dst + "head.attention.o_proj"),
        *norm_rules(re.escape(src) + r"attn_pool\.norm", dst + "head.layernorm"),
        *linear_rules(re.escape(src) + r"attn_pool\.mlp\.(fc[12])", dst + r"head.mlp.\1"),
    ]


DINO_PREFIX, SIGLIP_PREFIX = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
RULES = [*_tower_rules(DINO_PREFIX, "vision.dino."), *_tower_rules(SIGLIP_PREFIX, "vision.siglip."),
         *linear_rules(r"projector\.(fc[123])", r"projector.\1")]


def _split_fused(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's fused ``attn.qkv [3D, D]`` (q, k, v rows) and ``attn_pool.kv [2D, D]`` -> separate projections."""
    out = {}
    for key, value in tensors.items():
        for fused, names in ((".attn.qkv.", "qkv"), (".attn_pool.kv.", "kv")):
            if fused in key:
                for name, part in zip(names, np.split(np.asarray(value), len(names), axis=0)):
                    out[key.replace(fused, fused.replace(names, name))] = part
                break
        else:
            out[key] = value
    return out


def unused_tensor_names(sizes: OpenVLASizes) -> list[str]:
    """Checkpoint tensors that never affect OpenVLA's outputs (43 for any depth): each tower's last block and
    final norm, and SigLIP's attention pool; OpenVLA reads the second-to-last block. With FiLM also the last
    blocks' scale / shift (8 more, names as in OFT's vision-backbone file)."""
    dino_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                  "attn.proj.bias", "ls1.scale_factor", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                  "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.scale_factor"]
    siglip_block = [n for n in dino_block if not n.startswith("ls")]
    pool = ["latent", "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias", "norm.weight",
            "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    last_d, last_s = sizes.dino.depth - 1, sizes.siglip.depth - 1
    return ([f"{DINO_PREFIX}blocks.{last_d}.{n}" for n in dino_block] + [f"{DINO_PREFIX}norm.{n}" for n in
            ("weight", "bias")] + [f"{SIGLIP_PREFIX}blocks.{last_s}.{n}" for n in siglip_block]
            + [f"{SIGLIP_PREFIX}norm.{n}" for n in ("weight", "bias")] + [f"{SIGLIP_PREFIX}attn_pool.{n}" for n in pool]
            + ([f"{prefix}blocks.{last}.{layer}.{n}"
                for prefix, last in ((DINO_PREFIX, last_d), (SIGLIP_PREFIX, last_s))
                for layer in ("scale", "shift") for n in ("weight", "bias")] if sizes.film else []))


def _tower_size(config: Mapping[str, Any], timm_id: str) -> dict:
    size = dict(TIMM_SIZES[timm_id])
    size.update((config.get("tiny_timm_overrides") or {}).get(timm_id, {}))  # test checkpoints only
    return size


def _preprocessor(path: Path) -> dict:
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return {}
    pre = json.loads(file.read_text())
    if pre.get("image_resize_strategy", "resize-naive") != "resize-naive":
        raise CheckpointError(f"{file}: image_resize_strategy={pre['image_resize_strategy']!r}; the openvla preset "
                              "supports 'resize-naive' (the released checkpoints' strategy)")
    return pre


def sizes_from_checkpoint(path: str | Path, **text_overrides: Any) -> OpenVLASizes:
    """:class:`OpenVLASizes` of an OpenVLA checkpoint directory's ``config.json`` (+ ``preprocessor_config.json``)."""
    path = Path(path)
    config = read_config(path)
    check_architecture(config, ARCHITECTURES)
    ids = tuple(config.get("timm_model_ids") or ())
    if ids != (DINO_ID, SIGLIP_ID) or not config.get("use_fused_vision_backbone", True):
        raise CheckpointError(f"{path}: timm_model_ids={list(ids)}; the openvla preset supports the fused "
                              f"'dinosiglip-vit-so-224px' backbone ({[DINO_ID, SIGLIP_ID]})")
    image = int((config.get("image_sizes") or [224])[0])
    d, s = _tower_size(config, DINO_ID), _tower_size(config, SIGLIP_ID)
    dino = timm_dinov2_reg(int(d["embed_dim"]), int(d["depth"]), int(d["num_heads"]), image_size=image,
                           mlp_ratio=float(d["mlp_ratio"]))
    siglip = timm_siglip(int(s["embed_dim"]), int(s["depth"]), int(s["num_heads"]), image_size=image,
                         mlp_ratio=float(s["mlp_ratio"]))
    text_hf = dict(config.get("text_config") or {})
    text_hf.setdefault("vocab_size", 32064)
    text: TransformerConfig = llama_config_from_hf(text_hf, **text_overrides)
    pre = _preprocessor(path)
    # without a preprocessor_config.json: timm's data configs of the two towers (ImageNet, then 0.5 / 0.5)
    means = pre.get("means") or [(0.485, 0.456, 0.406), (0.5,) * 3]
    stds = pre.get("stds") or [(0.229, 0.224, 0.225), (0.5,) * 3]
    return OpenVLASizes(dino=dino, siglip=siglip, text=text, n_bins=int(config.get("n_action_bins", 256)),
                        action_vocab_size=text.vocab_size - int(config.get("pad_to_multiple_of", 64)),
                        dino_mean=tuple(means[0]), dino_std=tuple(stds[0]), siglip_mean=tuple(means[1]),
                        siglip_std=tuple(stds[1]))


def convert_openvla_tensors(tensors: Mapping[str, np.ndarray], sizes: OpenVLASizes
                            ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """HF OpenVLA tensors -> ``({vlax dotted path: array}, {path: checkpoint name})``."""
    lm = {k[len("language_model."):]: v for k, v in tensors.items() if k.startswith("language_model.")}
    if not lm:
        raise CheckpointError(f"no language_model.* tensors in the checkpoint; first names: {sorted(tensors)[:8]}")
    flat_lm, src_lm = convert_decoder_tensors(lm, sizes.text)
    rest = _split_fused({k: v for k, v in tensors.items() if not k.startswith("language_model.")})
    rest = stack_numbered(rest, DINO_PREFIX + "blocks.", num_layers=sizes.dino.depth)
    rest = stack_numbered(rest, SIGLIP_PREFIX + "blocks.", num_layers=sizes.siglip.depth)
    flat, sources = rename_tensors(rest, RULES)
    flat.update({"backbone." + k: v for k, v in flat_lm.items()})
    sources.update({"backbone." + k: "language_model." + v for k, v in src_lm.items()})
    return flat, sources


OFT_VISION_PREFIX = "vision_backbone--"  # OFT's vision_backbone--{step}_checkpoint.pt, converted to .safetensors
_LORA = re.compile(r"(.+)\.lora_([AB])\.([^.]+)\.weight")


def oft_vision_backbone_tensors(tensors: Mapping[str, np.ndarray], *, lora_alpha: float | None = None
                                ) -> dict[str, np.ndarray]:
    """OFT's saved ``FiLMedPrismaticVisionBackbone`` state dict -> OpenVLA checkpoint names (``vision_backbone.
    featurizer.blocks.N.norm1.weight``, ``...blocks.N.scale.weight``, ...), LoRA merged into its base weights.

    Accepted as saved (``vision_backbone.<tower>...``), with a DDP ``module.`` prefix, or under a whole model's
    ``vision_backbone.vision_backbone.``. ``lora_alpha``: default ``min(r, 16)``, OFT's LoraConfig.
    """
    out: dict[str, np.ndarray] = {}
    lora: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith("vision_backbone.vision_backbone."):
            name = name[len("vision_backbone."):]
        name = re.sub(r"(\.blocks\.\d+)\.block\.", r"\1.", name)  # FiLMedVisionTransformerBlock.block
        m = _LORA.fullmatch(name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = np.asarray(value, np.float32)
        else:
            out[name.replace(".base_layer.", ".")] = value
    for stem, ab in lora.items():
        weight = f"{stem}.weight"
        if set(ab) != {"A", "B"} or weight not in out:
            raise CheckpointError(f"LoRA tensors of {stem} are incomplete: need {stem}.base_layer.weight, "
                                  f"{stem}.lora_A.<adapter>.weight and {stem}.lora_B.<adapter>.weight")
        rank = ab["A"].shape[0]
        alpha = min(rank, 16) if lora_alpha is None else float(lora_alpha)
        out[weight] = np.asarray(out[weight], np.float32) + (alpha / rank) * (ab["B"] @ ab["A"])
    if not any(re.fullmatch(r"vision_backbone\.\w+\.blocks\.\d+\.(scale|shift)\.weight", k) for k in out):
        raise CheckpointError("no FiLM tensors (vision_backbone.<tower>.blocks.N.scale.weight) in OFT's "
                              f"vision-backbone file; first names: {sorted(tensors)[:6]}")
    return out


def _weight_files(path: Path, vision_backbone: str | Path | bool | None) -> tuple[list[Path], Path | None]:
    """``(model safetensors files, OFT vision-backbone file or None)`` of a checkpoint directory."""
    files = safetensors_files(path)
    model = [f for f in files if not f.name.startswith(OFT_VISION_PREFIX)]
    if not model:
        raise CheckpointError(f"{path} holds only OFT vision-backbone files {[f.name for f in files]}, no model "
                              "weights (model.safetensors)")
    if vision_backbone is False:
        return model, None
    if vision_backbone not in (None, True):
        file = Path(vision_backbone)
        if file.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"refusing to unpickle {file}: convert it once with `python -m "
                                  f"experiments.convert_torch_checkpoint --input {file} --output "
                                  f"{file.with_suffix('.safetensors')}`")
        return model, file
    found = sorted(path.glob(OFT_VISION_PREFIX + "*.safetensors")) if path.is_dir() else []
    if len(found) > 1:
        raise CheckpointError(f"{path} has several OFT vision-backbone files {[f.name for f in found]}: pass "
                              "load_openvla(..., vision_backbone=<the step's file>)")
    if not found and path.is_dir():
        pickled = sorted(f for f in path.glob(OFT_VISION_PREFIX + "*") if f.suffix in PICKLE_SUFFIXES)
        if pickled:  # an OFT+ run: loading without it would drop FiLM and the towers' LoRA updates
            raise CheckpointError(f"{pickled[0]} is OFT's FiLM vision backbone as a torch pickle: convert it once "
                                  f"with `python -m experiments.convert_torch_checkpoint --input {pickled[0]} "
                                  f"--output {pickled[0].with_suffix('.safetensors')}` (or pass "
                                  "vision_backbone=False to load the model without FiLM)")
    if vision_backbone is True and not found:
        raise CheckpointError(f"no {OFT_VISION_PREFIX}*.safetensors in {path} (vision_backbone=True)")
    return model, (found[0] if found else None)


def load_openvla(path: str | Path, *, action_dim: int = 7, dtype=None,
                 vision_backbone: str | Path | bool | None = None, lora_alpha: float | None = None,
                 **text_overrides: Any) -> OpenVLAPolicy:
    """An :class:`vlax.presets.openvla.OpenVLAPolicy` holding a local OpenVLA checkpoint (safetensors only).

    Missing, unexpected and wrongly shaped tensors are all named in one error. ``dtype`` sets the parameter dtype.
    OpenVLA-OFT+ (FiLM): ``vision_backbone`` is OFT's vision-backbone file (converted to safetensors); by default
    a single ``vision_backbone--*.safetensors`` in ``path`` is used, ``False`` ignores it. Its towers and FiLM
    layers (see the module docstring) replace model.safetensors' towers; ``lora_alpha`` as in
    :func:`oft_vision_backbone_tensors`. OFT's action head, proprio projector and extra cameras are not read.
    """
    path = Path(path)
    sizes = sizes_from_checkpoint(path, **text_overrides)
    model_files, film_file = _weight_files(path, vision_backbone)
    tensors = read_safetensors(model_files)
    if film_file is not None:
        sizes = with_film(sizes)
        tensors.update(oft_vision_backbone_tensors(read_safetensors(film_file), lora_alpha=lora_alpha))
    flat, sources = convert_openvla_tensors(tensors, sizes)
    spec = PolicySpec(cameras=("image",), image_size=sizes.dino.image_size, state_dim=0, action_dim=action_dim,
                      horizon=1, max_text_len=64, state_input="none")
    model = nnx.eval_shape(lambda: OpenVLAPolicy(spec, sizes, rngs=nnx.Rngs(0)))
    return assign_params(model, flat, sources=sources, dtype=dtype)


def dataset_statistics(path: str | Path) -> dict:
    """``dataset_statistics.json`` of a checkpoint (else ``config.json``'s ``norm_stats``); a clear error if none."""
    path = Path(path)
    file = path / STATISTICS_NAME
    if file.is_file():
        return json.loads(file.read_text())
    stats = read_config(path).get("norm_stats") if (path / "config.json").is_file() else None
    if stats:
        return stats
    raise CheckpointError(f"{path} has no {STATISTICS_NAME} (nor norm_stats in config.json): un-normalizing actions "
                          f"needs the dataset statistics the model was trained with; copy {STATISTICS_NAME} from "
                          "the original checkpoint (or the fine-tuning run) into this directory")


def action_normalization(path: str | Path, unnorm_key: str | None) -> NormalizationArtifact:
    """The ``bounds`` (q01/q99 -> [-1, 1], gripper mask) normalization of the actions under ``unnorm_key``."""
    stats = dataset_statistics(path)
    if unnorm_key is None:
        if len(stats) != 1:
            raise ValueError(f"the checkpoint has statistics for several datasets {sorted(stats)}: pass unnorm_key="
                             "one of them")
        unnorm_key = next(iter(stats))
    if unnorm_key not in stats:
        raise ValueError(f"unnorm_key={unnorm_key!r} is not in {Path(path) / STATISTICS_NAME}; known keys: "
                         f"{sorted(stats)}")
    action = dict(stats[unnorm_key]["action"])
    dim = len(action["q01"])
    mask = tuple(bool(m) for m in action.get("mask", [True] * dim))
    full = {k: list(action.get(k, [0.0] * dim)) for k in ("mean", "std", "min", "max", "q01", "q99")}
    return NormalizationArtifact(type="bounds", keys=("action",), masks={"action": mask},
                                 padded_dims={"action": dim}, stats={"action": full},
                                 dataset_hash=f"openvla:{unnorm_key}", dataset_name=unnorm_key)


__all__ = ["load_openvla", "sizes_from_checkpoint", "convert_openvla_tensors", "oft_vision_backbone_tensors",
           "unused_tensor_names", "dataset_statistics", "action_normalization", "ARCHITECTURES"]
