"""KV-cached greedy decoding equals full forward passes (same tokens, logits max-abs <= 1e-5) and transformers'
``generate``; with a padded prompt (left and right padding) and with an image-embedding prefix."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from test_backbone_parity import build_hf_model  # the tiny HF checkpoints of the parity tests
from vlax.weights import load_pretrained

TOL = 1e-5
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name in ("llama_gqa", "gemma_mqa"):
        directory = tmp_path_factory.mktemp(name)
        out[name] = (build_hf_model(name, directory), load_pretrained(directory))
    return out


@nnx.jit(static_argnames=("cache_size",))
def prefill(model, tokens, embeds, input_mask, ar_mask, cache_size):
    return model(tokens, embeds, input_mask=input_mask, ar_mask=ar_mask, return_logits=True, cache_size=cache_size)


@nnx.jit
def step(model, inputs, cache):
    return model.decode_step(inputs, cache)


@nnx.jit
def full_logits(model, tokens, embeds, input_mask, ar_mask):
    return model(tokens, embeds, input_mask=input_mask, ar_mask=ar_mask, return_logits=True).logits


def cached_greedy(model, tokens, mask, embeds=None, ar_mask=None):
    """``NEW_TOKENS`` greedy tokens ``[B, n]`` and the logits each was chosen from ``[B, n, V]``, via the cache."""
    n_in = mask.shape[1]
    ar_mask = jnp.ones(n_in, jnp.int32) if ar_mask is None else ar_mask
    out = prefill(model, tokens, embeds, mask, ar_mask, cache_size=n_in + NEW_TOKENS)
    last = np.max(np.where(mask, np.arange(n_in), -1), axis=1)  # last real input of each row
    logits = [np.asarray(out.logits)[np.arange(len(last)), last]]
    cache = out.cache
    chosen = []
    for i in range(NEW_TOKENS):
        chosen.append(logits[-1].argmax(-1))
        if i + 1 < NEW_TOKENS:
            result = step(model, jnp.asarray(chosen[-1][:, None], jnp.int32), cache)
            cache = result.cache
            logits.append(np.asarray(result.logits[:, 0]))
    assert int(cache.end) == n_in + NEW_TOKENS - 1
    return np.stack(chosen, 1), np.stack(logits, 1)


def full_pass_greedy(model, prompt, embeds=None, prefix_ar=None):
    """The same decoding with no cache: a full forward pass over prompt + tokens so far for every new token.

    One row, unpadded prompt; the buffer has a fixed length (one compilation) with the not-yet-generated
    tail masked out, which cannot affect earlier tokens.
    """
    p = 0 if embeds is None else embeds.shape[1]
    n_prompt = len(prompt)
    buffer = np.zeros((1, n_prompt + NEW_TOKENS), np.int64)
    buffer[0, :n_prompt] = prompt
    prefix_ar = np.ones(p + n_prompt, np.int32) if prefix_ar is None else prefix_ar
    ar = jnp.asarray(np.concatenate([prefix_ar, np.ones(NEW_TOKENS, np.int32)]))
    chosen, logits = [], []
    for i in range(NEW_TOKENS):
        valid = n_prompt + i
        mask = jnp.asarray(np.arange(p + buffer.shape[1])[None] < p + valid)
        out = np.asarray(full_logits(model, jnp.asarray(buffer, jnp.int32), embeds, mask, ar))[0, p + valid - 1]
        logits.append(out)
        chosen.append(out.argmax())
        buffer[0, valid] = chosen[-1]
    return np.asarray(chosen), np.stack(logits)


def hf_greedy(hf, prompt):
    ids = torch.from_numpy(np.asarray(prompt)[None])
    with torch.no_grad():  # explicit attention mask: generate() would otherwise treat token 0 as padding
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                          min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(prompt):].numpy()


@pytest.mark.parametrize("name", ["llama_gqa", "gemma_mqa"])
def test_cached_greedy_equals_full_passes_and_transformers(models, name):
    hf, model = models[name]
    prompt = np.random.RandomState(3).randint(0, hf.config.vocab_size, size=(2, 6))
    tokens, logits = cached_greedy(model, jnp.asarray(prompt, jnp.int32), np.ones(prompt.shape, bool))
    for row in range(2):
        ref_tokens, ref_logits = full_pass_greedy(model, prompt[row])
        np.testing.assert_array_equal(tokens[row], ref_tokens)
        assert np.max(np.abs(logits[row] - ref_logits)) <= TOL
        np.testing.assert_array_equal(tokens[row], hf_greedy(hf, prompt[row]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_greedy_with_padded_prompt(models, side):
    """Prompts of different lengths in one batch, padded on either side: each row decodes as if alone.

    Left padding keeps every row's prompt ending at the same slot; with right padding the pad slots sit between
    the prompt and the generated tokens. Both work because padding is carried by the slot mask and position ids
    count real tokens only.
    """
    hf, model = models["llama_gqa"]
    rs = np.random.RandomState(4)
    long, short = rs.randint(0, 128, size=7), rs.randint(0, 128, size=4)
    pad = np.zeros(3, np.int64)
    row = np.concatenate([pad, short]) if side == "left" else np.concatenate([short, pad])
    valid = np.arange(7) >= 3 if side == "left" else np.arange(7) < 4
    tokens, logits = cached_greedy(model, jnp.asarray(np.stack([long, row]), jnp.int32),
                                   np.stack([np.ones(7, bool), valid]))
    for i, prompt in enumerate((long, short)):
        ref_tokens, ref_logits = full_pass_greedy(model, prompt)
        np.testing.assert_array_equal(tokens[i], ref_tokens)
        assert np.max(np.abs(logits[i] - ref_logits)) <= TOL
        np.testing.assert_array_equal(tokens[i], hf_greedy(hf, prompt))


@pytest.mark.parametrize("name", ["llama_gqa", "gemma_mqa"])
def test_cached_greedy_after_image_prefix(models, name):
    """Image embeddings + prompt attended bidirectionally (PaliGemma-style prefix-LM), then causal decoding."""
    hf, model = models[name]
    rs = np.random.RandomState(5)
    embeds = jnp.asarray(rs.randn(1, 4, hf.config.hidden_size).astype(np.float32))
    prompt = rs.randint(0, hf.config.vocab_size, size=(1, 3))
    prefix_ar = np.zeros(7, np.int32)
    tokens, logits = cached_greedy(model, jnp.asarray(prompt, jnp.int32), np.ones((1, 7), bool), embeds=embeds,
                                   ar_mask=jnp.asarray(prefix_ar))
    ref_tokens, ref_logits = full_pass_greedy(model, prompt[0], embeds=embeds, prefix_ar=prefix_ar)
    np.testing.assert_array_equal(tokens[0], ref_tokens)
    assert np.max(np.abs(logits[0] - ref_logits)) <= TOL
    # The bidirectional prefix matters: a causal prefix decodes from different logits.
    _, causal_logits = cached_greedy(model, jnp.asarray(prompt, jnp.int32), np.ones((1, 7), bool), embeds=embeds)
    assert np.max(np.abs(causal_logits - logits)) > 1e-3


def test_multi_token_step_and_embedding_inputs(models):
    """Appending 3 inputs in one step equals the full pass; feeding their embeddings equals feeding their ids."""
    _, model = models["gemma_mqa"]
    ids = jnp.asarray(np.random.RandomState(6).randint(0, 128, size=(2, 8)), jnp.int32)
    full = full_logits(model, ids, None, jnp.ones((2, 8), bool), jnp.ones(8, jnp.int32))
    out = prefill(model, ids[:, :5], None, jnp.ones((2, 5), bool), jnp.ones(5, jnp.int32), cache_size=10)
    by_ids = step(model, ids[:, 5:], out.cache)
    by_embeds = step(model, model.embed_tokens(ids[:, 5:]), out.cache)
    assert float(jnp.max(jnp.abs(by_ids.logits - full[:, 5:]))) <= TOL
    assert float(jnp.max(jnp.abs(by_embeds.logits - by_ids.logits))) <= TOL
    assert int(by_ids.cache.end) == 8 and by_ids.cache.next_position.tolist() == [8, 8]
    assert by_ids.cache.mask[:, :8].all() and not by_ids.cache.mask[:, 8:].any()


def test_cache_overflow_is_refused(models):
    _, model = models["llama_gqa"]
    out = model(jnp.zeros((1, 4), jnp.int32), cache_size=5)
    with pytest.raises(ValueError, match=r"cache full: 4 slots used \+ 2 new > cache_size=5"):
        model.decode_step(jnp.zeros((1, 2), jnp.int32), out.cache)


def test_cache_overflow_under_jit_is_nan_never_wrong_numbers(models):
    """Under jit ``cache.end`` is traced, so the overflow cannot raise; the clamped write must not leak finite
    logits. The step that fits stays finite (and exact), the one that overflows and every later one are NaN."""
    _, model = models["llama_gqa"]
    ids = jnp.asarray(np.random.RandomState(7).randint(0, 128, size=(2, 6)), jnp.int32)
    full = full_logits(model, ids, None, jnp.ones((2, 6), bool), jnp.ones(6, jnp.int32))
    out = prefill(model, ids[:, :4], None, jnp.ones((2, 4), bool), jnp.ones(4, jnp.int32), cache_size=5)
    fits = step(model, ids[:, 4:5], out.cache)
    assert float(jnp.max(jnp.abs(fits.logits - full[:, 4:5]))) <= TOL
    over = step(model, ids[:, 5:6], fits.cache)   # slot 5 of a 5-slot cache
    assert bool(jnp.all(jnp.isnan(over.logits))) and bool(jnp.all(jnp.isnan(over.hidden)))
    later = step(model, ids[:, 5:6], over.cache)
    assert bool(jnp.all(jnp.isnan(later.logits))) and bool(over.cache.overflows(0))
    # A multi-token step partly past the end is poisoned whole; one that cannot fit at all raises at trace time.
    assert bool(jnp.all(jnp.isnan(step(model, ids[:, 4:6], out.cache).logits)))
    with pytest.raises(ValueError, match=r"cache full: \? slots used \+ 6 new > cache_size=5"):
        step(model, ids, out.cache)
