"""The head contract around the heads: liftable imports, the registry, cache needs, and bad input refused with one
clear error."""

from __future__ import annotations

import ast
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vlax.nn as vn
from vlax.action_tokens import FastTokenizer
from vlax.heads import HEADS, BinTokenizer, head_class
from vlax.heads import get_head as _get_head

HEADS_DIR = pathlib.Path(__file__).resolve().parents[1] / "vlax" / "heads"
HEAD_FILES = sorted(p for p in HEADS_DIR.glob("*.py") if p.name != "__init__.py")  # __init__ is the registry
ALLOWED_ROOTS = {"jax", "flax", "einops", "numpy", "__future__"}


def _imported_modules(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.append("." * node.level + (node.module or ""))  # relative: ties the file to its package
            else:
                names.append(node.module)
    return names


def _liftable(module: str) -> bool:
    root = module.split(".")[0]
    return (module == "vlax.nn" or module.startswith("vlax.nn.") or root in ALLOWED_ROOTS
            or root in sys.stdlib_module_names)


def test_head_files_are_found():
    assert {"binned.py", "chunk.py", "diffusion.py", "flow.py"} <= {p.name for p in HEAD_FILES}


@pytest.mark.parametrize("path", HEAD_FILES, ids=lambda p: p.name)
def test_head_file_imports_only_vlax_nn_jax_flax_einops_numpy_stdlib(path):
    bad = [m for m in _imported_modules(path) if not _liftable(m)]
    assert not bad, f"{path.name} imports {bad}; a head file may import only vlax.nn, jax, flax, einops, numpy " \
                    f"and the standard library"


def test_import_checker_rejects_what_it_should():
    for module in ("vlax.heads.binned", "vlax.backbones", "vlax.train.loop", "torch", ".common", "vlax.nnx"):
        assert not _liftable(module), module
    for module in ("vlax.nn", "vlax.nn.head_base", "jax.numpy", "flax.nnx", "einops", "numpy", "math"):
        assert _liftable(module), module


# ---- registry ----------------------------------------------------------------------------------------------------
SPEC = vn.ContextSpec(width=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, vocab_size=64)
SMALL = {  # the cheapest construction of each registered head
    "binned": dict(num_heads=2, n_bins=8), "binned_lm": dict(n_bins=8),
    "act": dict(num_heads=2, mlp_dim=16),
    "chunk": dict(width=16, num_heads=2, mlp_dim=16), "chunk_cvae": dict(width=16, num_heads=2, mlp_dim=16,
                                                                          encoder_depth=1),
    "flow": dict(width=8, mlp_dim=16), "flow_pi05": dict(width=8, mlp_dim=16), "flow_smolvla": dict(mlp_dim=16),
    "l1_mlp": dict(hidden_dim=8, num_blocks=1), "l1_map": dict(num_heads=2),
    "lstm": dict(hidden_dim=8, num_layers=1, tower_dims=(8,)),
    "diffusion": dict(denoiser_kwargs=dict(hidden_dim=8, num_blocks=1)),
    "diffusion_unet": dict(denoiser_kwargs=dict(down_dims=(8, 16), step_embed_dim=8, n_groups=2)),
    # A FAST tokenizer for [4, 3] chunks whose ids (+ the end marker) fit SPEC's 64-id vocabulary.
    "fast": dict(tokenizer=FastTokenizer.fit(np.random.default_rng(0).uniform(-1, 1, (16, 4, 3)), vocab_size=32,
                                             scale=2.0)),
}


def get_head(name: str, **kwargs):
    """The head built abstractly (shapes only): construction checks run without initialising parameters."""
    return nnx.eval_shape(lambda: _get_head(name, **kwargs))


def test_unknown_head_lists_the_known_names():
    with pytest.raises(ValueError, match=r"unknown action head 'flwo'.*'flow'.*'flow_smolvla'"):
        get_head("flwo", action_dim=2, horizon=4, context=SPEC)


def test_registry_defaults_are_published_values_and_overridable():
    assert head_class("flow_smolvla") == (head_class("flow")[0], dict(expert="smolvla", causal_actions=True))
    head = get_head("diffusion_unet", action_dim=2, horizon=4, context=SPEC, num_train_timesteps=30,
                    **SMALL["diffusion_unet"])
    assert head.schedule.num_train_timesteps == 30 and head.schedule.name == "squaredcos_cap_v2"
    assert head.variance_type == "fixed_small"


@pytest.mark.parametrize("name", sorted(HEADS))
def test_cache_slots_say_what_the_head_reads(name):
    head = get_head(name, action_dim=3, horizon=4, context=SPEC, **SMALL[name])
    expected = {"binned_lm": 12, "fast": 12, "flow": 0, "flow_pi05": 0, "flow_smolvla": 0}.get(name)
    assert head.cache_slots == expected
    assert head.action_shape == (4, 3)


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_action_shape_mismatch_names_both_shapes():
    head = get_head("chunk", action_dim=3, horizon=4, context=SPEC, **SMALL["chunk"])
    ctx = vn.HeadContext(tokens=jnp.zeros((2, 5, 16)), mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"actions have shape \(2, 4, 2\); this head expects \[B, 4, 3\]"):
        head.loss(ctx, jnp.zeros((2, 4, 2)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"action_mask of shape \(5,\) does not broadcast to actions \(2, 4, 3\)"):
        head.loss(ctx, jnp.zeros((2, 4, 3)), action_mask=jnp.ones((5,), bool), rngs=nnx.Rngs(0))


def test_context_width_mismatch_names_both():
    head = get_head("binned", action_dim=3, horizon=4, context=SPEC, **SMALL["binned"])
    ctx = vn.HeadContext(tokens=jnp.zeros((2, 5, 12)), mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"context tokens have shape \(2, 5, 12\); this head expects \[B, N, 16\]"):
        head.sample(ctx, rngs=nnx.Rngs(0))


def test_a_missing_or_misshaped_state_names_the_expected_shape():
    head = get_head("flow", action_dim=3, horizon=4, context=SPEC, state_dim=5, **SMALL["flow"])
    k = jnp.zeros((2, 1, 5, 1, 8))
    cache = vn.KVCache.from_prefix(k, k, jnp.ones((1, 5), bool))
    ctx = vn.HeadContext(tokens=jnp.zeros((1, 5, 16)), mask=jnp.ones((1, 5), bool), cache=cache)
    with pytest.raises(ValueError, match=r"ctx.state must be \[B, 5\], got None"):
        head.sample(ctx, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ctx.state must be \[B, 5\], got \(1, 4\)"):
        head.sample(ctx.replace(state=jnp.zeros((1, 4))), rngs=nnx.Rngs(0))


def test_bins_that_do_not_fit_the_vocabulary_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"n_bins=65 action tokens do not fit a vocabulary of 64 ids"):
        get_head("binned_lm", action_dim=3, horizon=4, context=SPEC, n_bins=65)
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=100 differs from the backbone's vocab_size=64"):
        get_head("binned_lm", action_dim=3, horizon=4, context=SPEC, tokenizer=BinTokenizer(8, vocab_size=100))
    with pytest.raises(ValueError, match=r"needs ContextSpec fields \['vocab_size'\]"):
        get_head("binned_lm", action_dim=3, horizon=4, context=vn.ContextSpec(width=16), n_bins=8)


def test_a_horizon_the_config_cannot_hold_is_refused_at_construction():
    unet = dict(down_dims=(8, 16, 32), step_embed_dim=8, n_groups=2)
    with pytest.raises(ValueError, match=r"horizon=6 must be divisible by 4 for a U-Net with down_dims=\(8, 16, 32\)"):
        get_head("diffusion_unet", action_dim=3, horizon=6, context=SPEC, denoiser_kwargs=unet)
    with pytest.raises(ValueError, match=r"action_dim and horizon must be >= 1, got action_dim=3, horizon=0"):
        get_head("chunk", action_dim=3, horizon=0, context=SPEC, **SMALL["chunk"])
    with pytest.raises(ValueError, match=r"num_steps=30 exceeds num_train_timesteps=20"):
        get_head("diffusion", action_dim=3, horizon=4, context=SPEC, num_steps=30, **SMALL["diffusion"])
    with pytest.raises(ValueError, match=r"the π0 expert needs ContextSpec fields \['num_layers', 'num_kv_heads'"):
        get_head("flow", action_dim=3, horizon=4, context=vn.ContextSpec(width=16), **SMALL["flow"])


def test_lm_decoding_that_overflows_the_cache_names_the_needed_size():
    head = get_head("binned_lm", action_dim=3, horizon=4, context=SPEC, n_bins=8)
    k = jnp.zeros((2, 1, 5, 1, 8))
    ctx = vn.HeadContext(tokens=jnp.zeros((1, 5, 16)), mask=jnp.ones((1, 5), bool),
                         cache=vn.KVCache.from_prefix(k, k, jnp.ones((1, 5), bool), max_len=10))
    with pytest.raises(ValueError, match=r"the KV cache has 10 slots for a 5-token prefix but decoding needs 11 "
                                         r"more; build the cache with cache_size >= 16"):
        head.sample(ctx, rngs=nnx.Rngs(0), lm=object())


def test_unknown_options_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown flow expert 'pi1'; known: \['pi0', 'smolvla'\]"):
        get_head("flow", action_dim=3, horizon=4, context=SPEC, expert="pi1")
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; known: \['ddpm', 'ddim', 'octo'\]"):
        get_head("diffusion", action_dim=3, horizon=4, context=SPEC, sampler="euler")
    with pytest.raises(ValueError, match=r"unknown noise schedule 'cos'; known: "):
        get_head("diffusion", action_dim=3, horizon=4, context=SPEC, schedule="cos")
    with pytest.raises(ValueError, match=r"unknown regression loss 'l2'; known: \['l1', 'mse', 'huber'\]"):
        get_head("chunk", action_dim=3, horizon=4, context=SPEC, loss="l2", **SMALL["chunk"])
