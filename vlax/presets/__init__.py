"""Published model families as presets: each file composes vlax's encoders, connectors, backbones and heads.

A preset is chosen by ``model.preset`` in an experiment config; the empty string (the default) is the generic
:class:`vlax.policy.VLA`. A preset builder has the signature of :func:`vlax.build.build_policy`::

    build(model: Mapping, spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> policy

and the policy it returns keeps :class:`vlax.policy.VLA`'s contract, which the trainer, the evaluator and the
server rely on: ``spec``, ``head`` (a registered head, so ``model.head`` still swaps it), ``backbone`` (or
``None``), ``context(obs) -> HeadContext``, ``loss(obs, actions, *, action_mask, rngs, train)`` and
``sample(obs, *, rngs, num_steps)``.

Preset modules register themselves with :func:`register`; they are imported lazily by name so that importing
vlax does not import every family.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

PresetBuilder = Callable[..., Any]

# preset name -> module under vlax.presets that registers it
PRESET_MODULES: dict[str, str] = {
    "act": "act",
    "diffusion_policy": "diffusion_policy",
    "octo": "octo",
    "helix": "helix",
    "openvla": "openvla",
    "pi0": "pi0",
    "pi05": "pi0",
    "pi0_fast": "pi0",
    "roboflamingo": "roboflamingo",
    "rt2": "rt2",
    "smolvla": "smolvla",
}

_BUILDERS: dict[str, PresetBuilder] = {}


def register(name: str) -> Callable[[PresetBuilder], PresetBuilder]:
    """Decorator: ``@register("act")`` on a preset's builder."""

    def wrap(fn: PresetBuilder) -> PresetBuilder:
        _BUILDERS[name] = fn
        return fn

    return wrap


def known_presets() -> list[str]:
    return sorted(set(PRESET_MODULES) | set(_BUILDERS))


def get_preset(name: str) -> PresetBuilder:
    """The builder registered as ``name``; an unknown name lists the known ones."""
    if name not in _BUILDERS and name in PRESET_MODULES:
        importlib.import_module(f"vlax.presets.{PRESET_MODULES[name]}")
    if name not in _BUILDERS:
        raise ValueError(f"unknown preset {name!r} (model.preset); known: {known_presets()} "
                         "or '' for the generic VLA")
    return _BUILDERS[name]


__all__ = ["PRESET_MODULES", "register", "get_preset", "known_presets"]
