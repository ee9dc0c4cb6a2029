"""Whole-policy parameters from any checkpoint directory vlax reads: its own training workdirs and the published
formats its importers know, detected from the files present.

    fmt = detect_format("/ckpt/pi05_libero/params")                        # "openpi"
    params = read_policy_params("/ckpt/pi05_libero/params", config.model, spec)

``read_policy_params`` returns the nested dict of ``nnx.to_pure_dict(nnx.state(policy, nnx.Param))`` of the preset
the matching importer builds (host numpy leaves), i.e. what :func:`vlax.train.finetune.transplant_sharded` takes as
its source: the layout of the preset a config with ``model.preset`` builds. Formats and the files that identify them:

==============  ====================================================================================================
``vlax``        a training workdir (``checkpoints/``) or its ``checkpoints`` directory (``<step>/state``); read by the
                trainer itself (:class:`vlax.checkpoint.Checkpointer`), not here
``openpi``      an orbax ``params/`` directory (``_METADATA`` / ``_CHECKPOINT_METADATA``), or the step directory
                holding it: :func:`vlax.weights.openpi.load_openpi` (π0, π0.5, π0-FAST)
``octo``        ``config.json`` + ``example_batch.msgpack`` + ``<step>/default/checkpoint``
                (``OctoModel.save_pretrained``): :func:`vlax.weights.octo.load_octo`
``openvla``     ``config.json`` naming ``OpenVLAForActionPrediction`` + ``*.safetensors``:
                :func:`vlax.weights.openvla.load_openvla`
``lerobot``     ``config.json`` with a policy ``type`` + ``model.safetensors`` (``save_pretrained``):
                :func:`vlax.weights.lerobot.load_lerobot`
``roboflamingo``  a ``.safetensors`` file (or a directory of them) from ``experiments/convert_torch_checkpoint.py``
                with RoboFlamingo's names (``perceiver.*``, ``lang_encoder.gated_cross_attn_layers.*``)
==============  ====================================================================================================

A RoboFlamingo file holds only what RoboFlamingo trains (resampler, cross-attention, token embeddings, head), so
only those come back; CLIP and the LM's decoder layers come from their own checkpoints. Only safetensors, orbax and
msgpack are read; a directory of torch pickles is refused with the conversion command.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from vlax.weights.common import (PICKLE_SUFFIXES, CheckpointError, check_importer_kwargs, read_config,
                                 safetensors_files, tensor_names)

FORMATS = ("vlax", "openpi", "octo", "openvla", "lerobot", "roboflamingo")
# what each format needs, for the error on a directory that is none of them
NEEDS = {
    "vlax": "a training workdir with checkpoints/<step>/state (or that checkpoints/ directory)",
    "openpi": "an orbax params/ directory (_METADATA inside), e.g. checkpoints/<config>/<step>/params",
    "octo": "config.json + example_batch.msgpack + <step>/default/checkpoint (OctoModel.save_pretrained)",
    "openvla": "config.json with architectures ['OpenVLAForActionPrediction'] + *.safetensors",
    "lerobot": "config.json with a policy 'type' (act, diffusion, pi0, pi05, smolvla) + model.safetensors",
    "roboflamingo": "a .safetensors file (or a directory of them) with RoboFlamingo's perceiver.* / "
                    "lang_encoder.gated_cross_attn_layers.* tensors",
}
_ROBOFLAMINGO = re.compile(r"^(module\.)?(perceiver\.|lang_encoder\.gated_cross_attn_layers\.)")


def _is_vlax_checkpoints(path) -> bool:
    """``path`` holds orbax step directories of :class:`vlax.checkpoint.Checkpointer` (``<step>/state``)."""
    return path.is_dir() and any(p.name.isdigit() and (p / "state").is_dir() for p in path.iterdir())


def _is_roboflamingo(path: Path) -> bool:
    one_file = path.is_file() and path.suffix == ".safetensors"
    if not one_file and not (path.is_dir() and any(path.glob("*.safetensors"))):
        return False
    return any(_ROBOFLAMINGO.match(n) for n in tensor_names(path))


def _unknown(path, found: list[str]) -> CheckpointError:
    lines = "\n  ".join(f"{fmt}: {need}" for fmt, need in NEEDS.items())
    return CheckpointError(
        f"{os.fspath(path)!r} is none of the checkpoint formats vlax reads (it holds "
        f"{found[:12]}{' ...' if len(found) > 12 else ''}). Each format needs:\n  {lines}\n"
        "Point --config.finetune.checkpoint at such a directory (openpi's .../<step>/params, the directory "
        "save_pretrained wrote, a vlax workdir), or convert the checkpoint into one of them first.")


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS` from the files in ``path`` (a local directory, a ``.safetensors`` file, or a vlax
    workdir anywhere orbax reads, e.g. ``gs://``). Anything else is one :class:`CheckpointError` listing what each
    format needs; a directory of torch pickles only (``.bin`` / ``.pth`` ...) is refused with the conversion fix."""
    from vlax.checkpoint import as_path

    where = as_path(path)
    if (where / "checkpoints").is_dir() or _is_vlax_checkpoints(where):
        return "vlax"
    if "://" in os.fspath(path):
        raise CheckpointError(f"{os.fspath(path)} holds no vlax checkpoints (<step>/state); published checkpoints "
                              "(openpi, Octo, OpenVLA, LeRobot, RoboFlamingo) are read from a local copy")
    local = Path(os.fspath(path)).absolute()
    if not local.exists():
        raise CheckpointError(f"checkpoint path {os.fspath(path)!r} does not exist")
    from vlax.weights.openpi import is_openpi_params

    if is_openpi_params(local) or is_openpi_params(local / "params"):
        return "openpi"
    if local.is_dir() and (local / "config.json").is_file():
        config = read_config(local)
        if (local / "example_batch.msgpack").is_file():
            return "octo"
        names = list(config.get("architectures") or []) + [config.get("model_type")]
        if "OpenVLAForActionPrediction" in names or "openvla" in names:
            return "openvla"
        if isinstance(config.get("type"), str):
            return "lerobot"
    if _is_roboflamingo(local):
        return "roboflamingo"
    files = sorted(p.name for p in local.iterdir()) if local.is_dir() else [local.name]
    pickles = [local / f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
    if pickles:
        try:
            safetensors_files(local)  # the library's refusal of pickles (when no safetensors are beside them)
        except CheckpointError as e:
            raise CheckpointError(f"{e} RoboFlamingo's .pth files: `python -m experiments.convert_torch_checkpoint "
                                  f"--input {pickles[0]} --output {pickles[0].with_suffix('.safetensors')}`."
                                  ) from None
    raise _unknown(path, files)


def _on_host():
    """Build imported arrays on the CPU backend: the trainer places each one on its sharding afterwards, so the
    accelerators never hold a second, unsharded copy (a run restricted to accelerator platforms keeps the default)."""
    try:
        return jax.default_device(jax.devices("cpu")[0])
    except RuntimeError:
        return contextlib.nullcontext()


def _pure_numpy(module: nnx.Module) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _roboflamingo_params(path: Path, model_config: Mapping[str, Any], spec) -> dict:
    """The parameters a RoboFlamingo file holds, nested as the preset's (which the config builds, abstractly)."""
    from vlax.build import build_policy
    from vlax.weights.common import param_shapes, read_safetensors
    from vlax.weights.roboflamingo import convert_roboflamingo_tensors

    # the text vocabulary only sizes the token embeddings, whose shape the transplant checks against the model
    policy = nnx.eval_shape(lambda: build_policy(model_config, spec, 1, nnx.Rngs(0)))
    if not hasattr(policy, "resampler"):
        raise CheckpointError(f"{path} is a RoboFlamingo checkpoint but model.preset={model_config.get('preset')!r}; "
                              "use experiments/configs/roboflamingo.py")
    actions = getattr(policy.head, "actions", None)
    flat, sources = convert_roboflamingo_tensors(
        read_safetensors(safetensors_files(path)), cross_attn_every=policy.lm.cross_attn_every,
        depth=policy.lm.config.depth, tower_layers=len(actions.layers) if actions is not None else 3)
    shapes = param_shapes(policy)
    unexpected = sorted(k for k in flat if k not in shapes)
    if unexpected:
        raise CheckpointError(f"{path}: tensors the policy has no parameter for: "
                              f"{[f'{k} (checkpoint {sources.get(k, k)!r})' for k in unexpected]}")
    out: dict = {}
    for key, _ in nnx.to_flat_state(nnx.state(policy, nnx.Param)):
        name = ".".join(str(k) for k in key)
        if name in flat:
            node = out
            for k in key[:-1]:
                node = node.setdefault(k, {})
            node[key[-1]] = np.asarray(flat[name])
    return out


def read_policy_params(path: str | os.PathLike, model_config: Mapping[str, Any], spec,
                       **importer_kwargs: Any) -> dict:
    """The parameters of the published checkpoint ``path`` as the nested pure dict of the preset its importer
    builds (``nnx.to_pure_dict(nnx.state(policy, nnx.Param))``, host numpy leaves).

    ``model_config``: the config's ``model`` section (openpi fills its ``pi0`` entries from the checkpoint; the
    RoboFlamingo preset is built from it abstractly, to name and nest the file's tensors). ``spec``: the
    :class:`vlax.policy.PolicySpec` (openpi builds its policy for it; OpenVLA takes its ``action_dim``).
    ``importer_kwargs`` go to the importer (e.g. ``sizes=`` / ``tokenizer=`` for a LeRobot π0 whose config names
    no published variant). The policy's own normalization statistics are not returned.
    """
    fmt = detect_format(path)
    if fmt == "vlax":
        raise CheckpointError(f"{os.fspath(path)} is a vlax training workdir: restore it with "
                              "vlax.checkpoint.Checkpointer (the trainer's finetune.checkpoint reads it directly)")
    local = Path(os.fspath(path)).absolute()
    with _on_host():
        if fmt == "openpi":
            from vlax.weights.openpi import is_openpi_params, load_openpi

            params_dir = local if is_openpi_params(local) else local / "params"
            check_importer_kwargs(load_openpi, importer_kwargs, f"the openpi checkpoint {local}")
            policy, _ = load_openpi(params_dir, model_config, spec, **importer_kwargs)
        elif fmt == "octo":
            from vlax.weights.octo import load_octo

            check_importer_kwargs(load_octo, importer_kwargs, f"the Octo checkpoint {local}")
            policy = load_octo(local, **importer_kwargs)
        elif fmt == "openvla":
            from vlax.weights.openvla import load_openvla

            policy = load_openvla(local, **{"action_dim": spec.action_dim, **importer_kwargs})
        elif fmt == "lerobot":
            from vlax.weights.lerobot import load_lerobot

            policy, _ = load_lerobot(local, **importer_kwargs)
        else:
            if importer_kwargs:
                raise CheckpointError(f"the RoboFlamingo checkpoint {local} is read with the preset's own config; "
                                      f"it takes no importer arguments ({sorted(importer_kwargs)}): remove them "
                                      "from finetune.importer")
            return _roboflamingo_params(local, model_config, spec)
    return _pure_numpy(policy)


__all__ = ["FORMATS", "NEEDS", "detect_format", "read_policy_params"]
