"""π0-FAST in openpi's token layout, against openpi's recipe written out here in numpy / sentencepiece / tokenizers.

openpi's ``FASTTokenizer`` downloads PaliGemma's tokenizer and runs the hub processor's Python, so the reference is
its logic restated (from ``src/openpi/models/tokenizer.py``, ``pi0_fast.py`` and ``physical-intelligence/fast``'s
``processing_action_tokenizer.py``) over files this test writes itself in the same formats:

* a Gemma-style SentencePiece model with PaliGemma's tail (``<locNNNN>`` then 128 ``<segNNN>`` user-defined
  pieces closing the vocabulary), 1024 ids in all;
* a FAST processor directory as the hub's (byte-level BPE ``tokenizer.json``, ``processor_config.json`` with
  ``min_token=-354``, ``scale=10`` and no chunk shape), its ``processing_action_tokenizer.py`` a file that raises.

The reference DCT is the orthonormal DCT-II matrix (numpy), the BPE the ``tokenizers`` library the processor runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.pi0 import FAST_PROMPT
from vlax.action_tokens import FastTokenizer
from vlax.action_tokens.fast_universal import UniversalFastTokenizer
from vlax.build import build_policy
from vlax.policy import PolicySpec
from vlax.prompts import tokenize_prompts
from vlax.tokenizers import SentencePieceTokenizer

H, A, B = 4, 3, 2
VOCAB, SKIP, MIN_TOKEN, SCALE = 1024, 128, -354, 10.0
CAMERA = "base_0_rgb"
INSTRUCTIONS = ["Pick up the red_block ", "open the drawer"]  # cleaned as openpi does: lower case, _ -> space
TEXTS = INSTRUCTIONS + ["push the cube to the goal", "Task: , State: ;\n", "Action: ", "a|b", "0 1 2 3 4 5 6 7 8 9"]


# ---- openpi's recipe, restated ------------------------------------------------------------------------------------
def dct_matrix(n: int) -> np.ndarray:
    k, t = np.arange(n)[:, None], np.arange(n)[None]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * t + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


def ref_fast_tokens(bpe, chunk: np.ndarray) -> list[int]:
    """processor __call__: DCT over time, round(x * scale), chr(max(v - min_token, 0)), the BPE."""
    coeff = np.around(dct_matrix(len(chunk)) @ chunk * SCALE)
    return bpe.encode("".join(map(chr, np.maximum(coeff.flatten() - MIN_TOKEN, 0).astype(int)))).ids


def ref_fast_decode(bpe, ids) -> np.ndarray:
    """processor decode: the BPE's decode, ord + min_token, exactly [H, A] or zeros; inverse DCT."""
    try:
        coeff = np.array(list(map(ord, bpe.decode(list(ids))))) + MIN_TOKEN
        coeff = coeff.reshape(-1, A)
        assert coeff.shape == (H, A)
    except Exception:  # the processor prints the error and carries on with zeros
        coeff = np.zeros((H, A))
    return dct_matrix(H).T @ (coeff / SCALE)


def ref_tokenize(sp, bpe, prompt: str, state: np.ndarray, chunk: np.ndarray):
    """FASTTokenizer.tokenize without padding: ``(tokens, ar_mask, loss_mask)``."""
    cleaned = prompt.lower().strip().replace("_", " ")
    bins = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    prefix = sp.encode(f"Task: {cleaned}, State: {' '.join(map(str, bins))};\n", add_bos=True)
    in_pg = sp.vocab_size() - 1 - SKIP - np.array(ref_fast_tokens(bpe, chunk))
    postfix = sp.encode("Action: ") + in_pg.tolist() + sp.encode("|", add_eos=True)
    return prefix + postfix, [0] * len(prefix) + [1] * len(postfix), [False] * len(prefix) + [True] * len(postfix)


def ref_extract(sp, bpe, tokens: np.ndarray) -> np.ndarray:
    """FASTTokenizer.extract_actions."""
    decoded = sp.decode(tokens.tolist())
    if "Action: " not in decoded:
        return np.zeros((H, A))
    raw = np.array(sp.encode(decoded.split("Action: ")[1].split("|")[0].strip()))
    return ref_fast_decode(bpe, (sp.vocab_size() - 1 - SKIP - raw).tolist())


def openpi_buffer(row: np.ndarray, eos: int) -> np.ndarray:
    """What openpi's sample_actions leaves for a batch of one: the loop stops after EOS, the rest stays 0."""
    out = np.zeros_like(row)
    n = list(row).index(eos) + 1 if eos in row else len(row)
    out[:n] = row[:n]
    return out


# ---- files --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    """A PaliGemma-shaped SentencePiece model: Gemma's settings, then <loc> and 128 <seg> pieces up to 1024 ids."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 30), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        split_digits=True, character_coverage=1.0, minloglevel=2, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, pad_id=0,
        eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["\n"], hard_vocab_limit=False)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    pieces = [f"<loc{i:04d}>" for i in range(VOCAB - SKIP - len(proto.pieces))] + [f"<seg{i:03d}>" for i in range(SKIP)]
    for name in pieces:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = name, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    path = tmp_path_factory.mktemp("paligemma") / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.vocab_size() == VOCAB and sp.id_to_piece(VOCAB - 1) == "<seg127>"
    return path, sp


@pytest.fixture(scope="module")
def chunks() -> np.ndarray:
    rs = np.random.RandomState(0)
    return np.clip(np.cumsum(rs.normal(0, 0.25, (64, H, A)), axis=1), -1, 1)  # smooth normalized chunks


@pytest.fixture(scope="module")
def processor(chunks, tmp_path_factory):
    """A FAST processor directory in the hub's format, its BPE trained here as the processor's fit trains."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=2, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    coeff = np.around(np.einsum("kt,nta->nka", dct_matrix(H), chunks) * SCALE).reshape(len(chunks), -1)
    bpe.train_from_iterator(["".join(map(chr, (c - MIN_TOKEN).astype(int))) for c in coeff], trainer=trainer)
    root = tmp_path_factory.mktemp("fast_processor")
    bpe.save(str(root / "tokenizer.json"))
    (root / "processor_config.json").write_text(json.dumps({
        "action_dim": None, "auto_map": {"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"},
        "min_token": MIN_TOKEN, "processor_class": "UniversalActionProcessor", "scale": 10, "time_horizon": None,
        "vocab_size": 300}))
    (root / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": False}))
    (root / "processing_action_tokenizer.py").write_text('raise RuntimeError("the processor code must never run")\n')
    return root, Tokenizer.from_file(str(root / "tokenizer.json"))


# ---- the processor format -----------------------------------------------------------------------------------------
def test_the_processor_directory_loads_as_data_and_follows_the_processor(processor, chunks):
    root, bpe = processor
    tok = FastTokenizer.load(str(root), action_horizon=H, action_dim=A)
    assert isinstance(tok, UniversalFastTokenizer) and tok.vocab_size == bpe.get_vocab_size() == 300
    assert not (root / "__pycache__").exists()
    extreme = np.concatenate([chunks[:16], np.full((1, H, A), -40.0)])  # its DC coefficient is clipped at chr(0)
    ids = tok.encode(extreme)
    assert ids == [ref_fast_tokens(bpe, c) for c in extreme]
    assert max(map(len, ids)) <= tok.max_tokens == 2 * H * A
    decoded, valid = tok.decode(ids[:16])
    assert valid.all()
    np.testing.assert_allclose(decoded, [ref_fast_decode(bpe, i) for i in ids[:16]], rtol=0, atol=1e-6)
    err = np.linalg.norm((decoded - chunks[:16]).reshape(16, -1), axis=1)
    assert err.max() <= 0.5 / SCALE * np.sqrt(H * A)  # rounding is the only loss (orthonormal DCT)
    # The processor's decode: an unknown id is dropped by the BPE; a negative one, a short or an empty sequence
    # is zeros (flagged here).
    rows = [ids[0] + [5000], [-1] + ids[0], ids[0][:-1], []]
    out, valid = tok.decode(rows)
    for row, got, ok in zip(rows, out, valid):
        np.testing.assert_allclose(got, ref_fast_decode(bpe, row), rtol=0, atol=1e-6)
        assert ok == bool(np.any(ref_fast_decode(bpe, row))), row
    assert list(valid[[0, 1, 3]]) == [True, False, False]
    # No shape in the universal processor's config: one must be given before encoding.
    bare = FastTokenizer.load(str(root / "processor_config.json"))
    assert bare.action_shape is None and bare.with_shape(H, A).encode(chunks[:1]) == ids[:1]
    with pytest.raises(ValueError, match="records no chunk shape .* action_horizon= and action_dim="):
        bare.encode(chunks[:1])
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "processor_config.json").write_text(json.dumps({"scale": -1, "min_token": 0}))
    with pytest.raises(FileNotFoundError, match=r"lacks \['tokenizer.json'\]"):
        FastTokenizer.load(str(root / "broken"))
    (root / "broken" / "tokenizer.json").write_text((root / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="'scale' must be a positive number, got -1"):
        FastTokenizer.load(str(root / "broken"))


# ---- the policy ---------------------------------------------------------------------------------------------------
SPEC = PolicySpec(cameras=(CAMERA,), image_size=28, state_dim=A, action_dim=A, horizon=H, max_text_len=32,
                  state_input="none")


def _model(paligemma_path, processor_root) -> dict:
    return {"preset": "pi0_fast", "head": "fast", "fast_layout": "openpi", "tokenizer": str(paligemma_path),
            "head_kwargs": {"tokenizer": str(processor_root)}, "state_input": "none",
            "pi0": {"paligemma_variant": "tiny", "action_expert_variant": "tiny_expert", "vocab_size": VOCAB,
                    "vision": {"variant": "So400m/14", "width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2,
                               "image_size": 28}}}


@pytest.fixture(scope="module")
def setup(paligemma, processor, chunks):
    policy = build_policy(_model(paligemma[0], processor[0]), SPEC, VOCAB, nnx.Rngs(0))
    states = np.array([[0.3, -0.7, 0.05], [-0.2, 0.9, -1.0]])
    text = SentencePieceTokenizer.from_file(paligemma[0])
    ids, mask = tokenize_prompts(text, FAST_PROMPT, INSTRUCTIONS, SPEC.max_text_len, states)
    pixels = np.random.RandomState(1).randint(0, 256, (B, 28, 28, 3)).astype(np.uint8)
    obs = {"images": {CAMERA: pixels}, "text_ids": ids, "text_mask": mask}
    return policy, obs, states, jnp.asarray(chunks[[3, 40]], jnp.float32)


def test_token_ids_and_masks_equal_openpi_tokenize(setup, paligemma, processor):
    policy, obs, states, actions = setup
    head, (_, sp), (_, bpe) = policy.head, paligemma, processor
    assert (head.layout, head.fast_base, head.end_id) == ("openpi", VOCAB - 1 - SKIP, sp.eos_id())
    targets, lengths = map(np.asarray, head.encode_targets(actions))
    _, _, prefix_ar = policy.embed_prefix(obs)
    assert not np.asarray(prefix_ar).any()  # images and prompt: bidirectional, as openpi's ar_mask 0
    for i in range(B):
        tokens, ar, loss_mask = ref_tokenize(sp, bpe, INSTRUCTIONS[i], states[i], np.asarray(actions[i], np.float64))
        prompt = obs["text_ids"][i][obs["text_mask"][i]].tolist()
        n = int(lengths[i])
        assert prompt + targets[i, :n].tolist() == tokens
        # the head's targets are openpi's postfix: causal (ar 1), every one of them in the loss
        assert [0] * len(prompt) + [1] * n == ar and [False] * len(prompt) + [True] * n == loss_mask
        assert not targets[i, n:].any()


def test_loss_equals_openpi_compute_loss(setup, paligemma, processor):
    policy, obs, states, actions = setup
    (_, sp), (_, bpe) = paligemma, processor
    loss, metrics = nnx.jit(lambda m, o, a: m.loss(o, a, rngs=jax.random.key(0)))(policy, obs, actions)
    # openpi: one forward pass over [images | prompt + postfix | padding], positions 0..N-1, its make_attn_mask
    seqs = [ref_tokenize(sp, bpe, INSTRUCTIONS[i], states[i], np.asarray(actions[i], np.float64)) for i in range(B)]
    width = max(len(s[0]) for s in seqs)
    tokens, token_mask, ar, loss_mask = (np.zeros((B, width), dt) for dt in (np.int32, bool, np.int32, bool))
    for i, (t, a, m) in enumerate(seqs):
        tokens[i, :len(t)], token_mask[i, :len(t)], ar[i, :len(t)], loss_mask[i, :len(t)] = t, True, a, m

    @nnx.jit
    def openpi_logits(m, obs, tokens, token_mask, ar):
        images, image_masks = m.embed_images(obs)
        n = images[0].shape[1]
        out = m.backbone(tokens=tokens, embeds=images[0], input_mask=jnp.concatenate([image_masks[0], token_mask], 1),
                         ar_mask=jnp.concatenate([jnp.zeros((B, n), jnp.int32), ar], 1),
                         positions=jnp.broadcast_to(jnp.arange(n + width), (B, n + width)), return_logits=True)
        return out.logits[:, n:-1]  # text positions predicting tokens[:, 1:]

    logits = np.asarray(openpi_logits(policy, obs, tokens, token_mask, ar), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    per_example = (nll * loss_mask[:, 1:]).sum(1) / np.maximum(loss_mask[:, 1:].sum(1), 1)
    np.testing.assert_allclose(float(loss), per_example.mean(), rtol=1e-5)
    assert float(metrics["tokens"]) == np.mean([len(ref_fast_tokens(bpe, np.asarray(a, np.float64)))
                                                for a in actions])


def test_decoding_reads_ids_back_as_openpi_extract_actions(setup, paligemma, processor, chunks):
    policy, _, _, actions = setup
    head, (_, sp), (_, bpe) = policy.head, paligemma, processor
    width, eos = head.length, sp.eos_id()
    prefix, bar = sp.encode("Action: "), sp.encode("|")
    rs = np.random.RandomState(2)

    def row(ids):
        ids = list(ids)[:width]
        return ids + rs.randint(4, 400, width - len(ids)).tolist()  # garbage text ids after

    fast = [(VOCAB - 1 - SKIP - np.array(ref_fast_tokens(bpe, c))).tolist() for c in chunks[[5, 6]]]
    rows = [row(prefix + fast[0] + bar + [eos]),  # garbage after EOS
            row(prefix + fast[1] + bar),  # garbage after "|", no EOS
            row(prefix + fast[0] + [eos]),  # EOS without "|"
            row(sp.encode("open the drawer") + [eos]),  # no "Action: "
            row(prefix + fast[0][:2] + [VOCAB - 3] + fast[0][2:] + bar + [eos]),  # a <seg> id: negative FAST id
            row(prefix + [eos]),  # nothing between
            row(prefix + fast[1][:1] + sp.encode(" x") + fast[1][1:] + bar + [eos])]  # text among them
    rows = np.asarray(rows, np.int32)
    decoded, valid = map(np.asarray, jax.jit(head.decode_tokens)(jnp.asarray(rows)))
    for i, r in enumerate(rows):
        np.testing.assert_allclose(decoded[i], ref_extract(sp, bpe, openpi_buffer(r, eos)), rtol=0, atol=1e-6,
                                   err_msg=f"row {i}")
    assert list(valid) == [True, True, True, False, False, False, True]
    np.testing.assert_array_equal(decoded[0], decoded[2])
    assert not decoded[~valid].any()
    # Round trip: a chunk's own targets decode to it within FAST's rounding bound.
    targets, _ = head.encode_targets(actions)
    back, ok = map(np.asarray, head.decode_tokens(targets))
    assert ok.all()
    err = np.linalg.norm((back - np.asarray(actions)).reshape(B, -1), axis=1)
    assert err.max() <= 0.5 / SCALE * np.sqrt(H * A)


def test_greedy_decoding_follows_openpi_sample_actions(setup, paligemma):
    policy, obs, _, _ = setup
    head = policy.head

    @nnx.jit
    def sample(m, obs):
        return m.head.sample_tokens(m.context(obs), lm=m.backbone)

    tokens = np.asarray(sample(policy, obs))
    assert tokens.shape == (B, head.length)
    # openpi: prefix positions cumsum(mask) - 1, step k fed at prefill_len + k + 1; argmax over the vocabulary.
    mask = obs["text_mask"]

    @nnx.jit
    def teacher_forced(m, obs, fed):
        images, image_masks = m.embed_images(obs)
        n, t = images[0].shape[1], fed.shape[1]
        prefill = n + jnp.asarray(mask).sum(1)
        prefix_mask = jnp.concatenate([image_masks[0], jnp.asarray(mask)], 1)
        positions = jnp.concatenate([jnp.cumsum(prefix_mask, 1) - 1,
                                     prefill[:, None] + 1 + jnp.arange(t)[None]], 1)
        tokens = jnp.concatenate([jnp.asarray(obs["text_ids"]), fed], 1)
        out = m.backbone(tokens=tokens, embeds=images[0], input_mask=jnp.concatenate([prefix_mask, fed >= 0], 1),
                         ar_mask=jnp.concatenate([jnp.zeros(prefix_mask.shape[1], jnp.int32), jnp.ones(t, jnp.int32)]),
                         positions=positions, return_logits=True)
        last = n + jnp.asarray(mask).sum(1) - 1
        first = jnp.take_along_axis(out.logits, last[:, None, None], 1)
        return jnp.argmax(jnp.concatenate([first, out.logits[:, n + mask.shape[1]:-1]], 1), -1)

    np.testing.assert_array_equal(np.asarray(teacher_forced(policy, obs, jnp.asarray(tokens))), tokens)
    actions, valid = map(np.asarray, jax.jit(head.decode_tokens)(jnp.asarray(tokens)))
    assert actions.shape == (B, H, A) and not actions[~valid].any()


def test_the_openpi_importer_sets_up_openpi_layout(paligemma, processor, tmp_path):
    import orbax.checkpoint as ocp

    from vlax.weights.openpi import load_openpi, read_params

    flat = read_params(Path(__file__).parent / "fixtures" / "openpi" / "pi0_tiny" / "params")
    tree: dict = {}
    for key, value in flat.items():  # the PaliGemma part: openpi's π0-FAST params layout
        if key.startswith("PaliGemma/img/") or (key.startswith("PaliGemma/llm/")
                                                 and not any(p.endswith("_1") for p in key.split("/"))):
            node = tree
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "params", {"params": tree})
    spec = PolicySpec(cameras=(CAMERA,), image_size=224, state_dim=A, action_dim=A, horizon=H, max_text_len=32,
                      state_input="none")
    model = {"tokenizer": str(paligemma[0]), "head_kwargs": {"tokenizer": str(processor[0])}}
    policy, _ = load_openpi(tmp_path / "params", model, spec)
    assert policy.head.layout == "openpi" and policy.head.fast_base == VOCAB - 1 - SKIP
    assert isinstance(policy.head.tokenizer, UniversalFastTokenizer) and policy.head.tokenizer.action_shape == (H, A)
    with pytest.warns(UserWarning, match="vlax's own FAST layout because no PaliGemma tokenizer"):
        fallback, _ = load_openpi(tmp_path / "params", {"head_kwargs": model["head_kwargs"]}, spec)
    assert fallback.head.layout == "vlax"
    with pytest.raises(ValueError, match="fast_layout='openpi' needs PaliGemma's text tokenizer: set model.tokenizer"):
        load_openpi(tmp_path / "params", {**model, "tokenizer": "byte", "fast_layout": "openpi"}, spec)


def test_the_tiny_fast_config_builds_openpis_layout(paligemma, processor):
    from experiments.configs import pi0 as pi0_config
    from vlax.build import policy_spec

    config = pi0_config.get_config("tiny_fast")
    config.model.tokenizer = str(paligemma[0])
    config.model.head_kwargs.tokenizer = str(processor[0])
    spec = policy_spec(config, cameras=(CAMERA,), state_dim=A, action_dim=A)
    policy = nnx.eval_shape(lambda: build_policy(config.model.to_dict(), spec, VOCAB, nnx.Rngs(0)))
    head = policy.head
    assert (head.layout, head.fast_base, head.position_offset) == ("openpi", VOCAB - 1 - SKIP, 1)
    assert head.length == 3 + 2 * 10 * A + 2  # ids("Action: ") + the processor's bound + ids("|") + EOS
    assert spec.state_input == "none" and config.data.normalization == "bounds"
