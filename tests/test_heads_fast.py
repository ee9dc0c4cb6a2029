"""FAST head in vlax's layout: action tokens take the last vocabulary ids, teacher forcing through the KV cache
equals one full forward pass, a tiny VLA learns to decode fixed chunks exactly, and invalid token sequences decode
to flagged zeros inside ``jit``. openpi's layout: tests/test_pi0_fast_openpi.py."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.fit_fast_tokenizer import lerobot_action_chunks
from vlax.action_tokens import FastTokenizer
from vlax.build import backbone_vocab_size, build_policy, policy_spec
from vlax.heads import get_head
from vlax.nn.context import ContextSpec

DATASET = pathlib.Path(__file__).parent / "fixtures" / "lerobot_ds"
H, A, TEXT_VOCAB, B = 4, 4, 10, 2


@pytest.fixture(scope="module")
def chunks() -> np.ndarray:
    return lerobot_action_chunks(str(DATASET), H)  # real bounds-normalized chunks [N, 4, 4]


@pytest.fixture(scope="module")
def tokenizer_path(chunks, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fast") / "fast.json"
    FastTokenizer.fit(chunks, vocab_size=1024).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def built(tokenizer_path):
    """One tiny VLA for the module (building it is most of the run time on a loaded CPU); tests never mutate it."""
    return _policy(tokenizer_path)


def _model(tokenizer_path: str) -> dict:
    return {"head": "fast", "head_kwargs": {"tokenizer": tokenizer_path},
            "encoder": "conv_stem", "encoder_kwargs": {"width": 16, "channels": (8, 16)}, "backbone": "tiny",
            "backbone_overrides": {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                                   "head_dim": 16},
            "state_dim": 3, "action_dim": A, "max_text_len": 4, "num_readouts": 0, "state_input": "prefix"}


def _policy(tokenizer_path: str):
    model = _model(tokenizer_path)
    spec = policy_spec({"data": {"camera": "top", "image_size": 16, "action_horizon": H}, "model": model})
    return build_policy(model, spec, TEXT_VOCAB, nnx.Rngs(0)), model


def _obs(b: int = B):
    pixels = (jnp.arange(b)[:, None, None, None] * 80 + jnp.zeros((b, 16, 16, 3))).astype(jnp.uint8)
    return {"images": {"top": pixels}, "state": jnp.linspace(-1, 1, b * 3).reshape(b, 3),
            "text_ids": jnp.ones((b, 4), jnp.int32), "text_mask": jnp.ones((b, 4), bool)}


def test_action_ids_are_the_last_of_the_vocabulary(built, chunks):
    policy, model = built
    tok = policy.head.tokenizer
    vocab = backbone_vocab_size(model, TEXT_VOCAB)
    assert vocab == TEXT_VOCAB + tok.vocab_size + 1 == policy.backbone.config.vocab_size
    assert policy.head.end_id == TEXT_VOCAB  # the end marker is the first id after the text ones
    targets, lengths = policy.head.encode_targets(jnp.asarray(chunks[:3]))
    for row, n, ids in zip(np.asarray(targets), np.asarray(lengths), tok.encode(chunks[:3])):
        assert n == len(ids) and list(row[:n]) == [vocab - 1 - t for t in ids]
        assert np.all(row[n:] == TEXT_VOCAB)  # end marker, then end-marker padding (masked in the loss)
    assert policy.head.cache_slots == H * A  # max_tokens + 1 ids decoded, all but the last fed back


def test_teacher_forcing_through_the_cache_equals_one_full_forward_pass(built, chunks):
    policy, _ = built
    obs, actions = _obs(), jnp.asarray(chunks[[0, 9]])
    loss, metrics = nnx.jit(lambda m, o, a: m.loss(o, a, rngs=jax.random.key(0)))(policy, obs, actions)
    # Reference: the prefix and every target but the last in one causal-suffix forward pass, no cache.
    targets, lengths = policy.head.encode_targets(actions)
    t = targets.shape[1]

    @nnx.jit
    def full_forward(m, obs, targets):
        embeds, mask, ar = m.embed_prefix(obs)
        out = m.backbone(tokens=targets[:, :-1], embeds=embeds,
                         input_mask=jnp.concatenate([mask, jnp.ones((B, t - 1), bool)], 1),
                         ar_mask=jnp.concatenate([ar, jnp.ones(t - 1, jnp.int32)]), return_logits=True)
        return out.logits[:, embeds.shape[1] - 1:]

    # The last prefix position predicts the first target.
    logits = np.asarray(full_forward(policy, obs, targets), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    weight = np.arange(t)[None] <= np.asarray(lengths)[:, None]
    np.testing.assert_allclose(float(loss), (ce * weight).sum() / weight.sum(), rtol=1e-5)
    assert float(metrics["tokens"]) == float(np.mean(lengths))


def _train(policy, obs, actions, steps: int, lr: float = 3e-3):
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss_fn(p):
            return nnx.merge(graphdef, p, rest).loss(obs, actions, rngs=jax.random.key(0))[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return nnx.merge(graphdef, params, rest), losses


def test_a_tiny_vla_learns_to_decode_fixed_chunks_exactly(built, chunks):
    policy, _ = built
    obs, actions = _obs(), jnp.asarray(chunks[[0, 20]])
    tok = policy.head.tokenizer
    assert tok.encode(chunks[0]) != tok.encode(chunks[20])
    trained, losses = _train(policy, obs, actions, steps=40)
    assert losses[-1] < 0.05 * losses[0], losses[::8]

    @jax.jit
    def sample(model, obs):
        return model.head.sample_with_validity(model.context(obs), lm=model.backbone)

    decoded, valid = sample(trained, obs)
    assert decoded.shape == (B, H, A) and np.asarray(valid).all()
    expected, _ = tok.decode(tok.encode(chunks[[0, 20]]))  # what the exact FAST tokens decode to
    np.testing.assert_array_equal(np.asarray(decoded), expected)
    assert np.abs(np.asarray(decoded) - chunks[[0, 20]]).max() <= 0.5 / tok.scale * np.sqrt(H * A)
    # The contract's sample returns the same actions.
    contract = nnx.jit(lambda m, o: m.sample(o, rngs=jax.random.key(1)))(trained, obs)
    np.testing.assert_array_equal(np.asarray(contract), expected)


def test_invalid_token_sequences_decode_to_flagged_zeros_under_jit(built, chunks):
    policy, _ = built
    head, vocab = policy.head, policy.backbone.config.vocab_size
    good = [vocab - 1 - t for t in head.tokenizer.encode(chunks[5])[0]]
    width = head.max_tokens + 1
    rows = [good + [head.end_id] * (width - len(good)),  # valid, cut at the end marker
            good[:2] + [3] + [head.end_id] * (width - 3),  # a text id among the action tokens
            [head.end_id] * width]  # nothing before the end marker
    before = head.tokenizer.stats.invalid
    actions, valid = jax.jit(head.decode_tokens)(jnp.asarray(rows, jnp.int32))
    np.testing.assert_array_equal(np.asarray(valid), [True, False, False])
    expected = head.tokenizer.decode(head.tokenizer.encode(chunks[5]))[0][0]
    np.testing.assert_array_equal(np.asarray(actions[0]), expected)
    assert np.all(np.asarray(actions[1:]) == 0)
    assert head.tokenizer.stats.invalid == before + 2
    # Unconstrained sampling from an untrained model still returns [B, H, A] with a flag per example.
    free = get_head("fast", action_dim=A, horizon=H, context=ContextSpec.from_config(policy.backbone.config),
                    tokenizer=head.tokenizer, constrain_to_action_tokens=False)
    sample = nnx.jit(lambda f, m, o: f.sample_with_validity(m.context(o), lm=m.backbone))
    out, flags = sample(free, policy, _obs())
    assert out.shape == (B, H, A) and flags.shape == (B,) and np.all(np.isfinite(np.asarray(out)))
    assert np.all(np.asarray(out)[~np.asarray(flags)] == 0)


def test_bad_construction_is_one_clear_error(tokenizer_path, chunks):
    tok = FastTokenizer.load(tokenizer_path)
    spec = ContextSpec(width=16, vocab_size=TEXT_VOCAB + tok.vocab_size + 1)
    with pytest.raises(ValueError, match=r"needs a fitted tokenizer object .*model.head_kwargs.tokenizer"):
        get_head("fast", action_dim=A, horizon=H, context=spec)
    with pytest.raises(ValueError, match=r"the tokenizer encodes chunks \(4, 4\) but the head's actions are "
                                         r"\(8, 4\)"):
        get_head("fast", action_dim=A, horizon=8, context=spec, tokenizer=tok)
    with pytest.raises(ValueError, match=rf"{tok.vocab_size} FAST ids \+ 1 end marker do not fit a vocabulary of "
                                         r"20 ids"):
        get_head("fast", action_dim=A, horizon=H, context=ContextSpec(width=16, vocab_size=20), tokenizer=tok)
    with pytest.raises(ValueError, match=r"model.head='fast' needs model.head_kwargs.tokenizer"):
        backbone_vocab_size({**_model(tokenizer_path), "head_kwargs": {}}, TEXT_VOCAB)
    with pytest.raises(FileNotFoundError, match=r"no FAST tokenizer file at /nonexistent.json"):
        _policy("/nonexistent.json")
    with pytest.raises(ValueError, match=r"unknown FAST layout 'paligemma' \(model.fast_layout\); known"):
        get_head("fast", action_dim=A, horizon=H, context=spec, tokenizer=tok, layout="paligemma")
    with pytest.raises(ValueError, match=r"the 'openpi' FAST layout needs the backbone's text tokenizer object"):
        get_head("fast", action_dim=A, horizon=H, context=spec, tokenizer=tok, layout="openpi")
    with pytest.raises(ValueError, match=r"max_decoding_steps belong to the 'openpi' FAST layout"):
        get_head("fast", action_dim=A, horizon=H, context=spec, tokenizer=tok, max_decoding_steps=64)
