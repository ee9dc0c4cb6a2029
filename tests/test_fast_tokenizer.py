"""FAST tokenizer: round-trip error bound on LeRobot's own fixture chunks, token ids against an independent
computation (the DCT written out from its formula, the BPE run through ``tokenizers`` itself), invalid sequences
decoded to flagged zeros, exact save/load and bad files named."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer

from experiments.fit_fast_tokenizer import compression, lerobot_action_chunks, main
from vlax.action_tokens import FastTokenizer

DATASET = pathlib.Path(__file__).parent / "fixtures" / "lerobot_ds"
HORIZON = 8


@pytest.fixture(scope="module")
def chunks() -> np.ndarray:
    return lerobot_action_chunks(str(DATASET), HORIZON)  # [N, 8, 4], bounds-normalized


@pytest.fixture(scope="module")
def tokenizer(chunks) -> FastTokenizer:
    return FastTokenizer.fit(chunks, vocab_size=1024, scale=10.0)


def _dct_from_formula(x: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-II over axis 0: X_k = sqrt(2/N) c_k sum_n x_n cos(pi (2n + 1) k / 2N), c_0 = 1/sqrt(2)."""
    n = x.shape[0]
    k, t = np.arange(n)[:, None], np.arange(n)[None, :]
    basis = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * t + 1) * k / (2 * n))
    basis[0] /= np.sqrt(2.0)
    return basis @ x


def test_fixture_chunks_are_real_normalized_windows(chunks):
    assert chunks.shape[1:] == (HORIZON, 4) and len(chunks) > 30
    assert chunks.min() >= -1.2 and chunks.max() <= 1.2 and chunks.std() > 0.1  # q01/q99 bounds -> about [-1, 1]


@pytest.mark.parametrize("scale", [10.0, 2.0])
def test_round_trip_error_is_within_the_rounding_bound(chunks, scale):
    # Rounding moves each scaled coefficient by <= 0.5, so each coefficient by <= 0.5 / scale; the DCT is
    # orthonormal, so a chunk's L2 error is the coefficients' L2 error <= 0.5 / scale * sqrt(H * A). The 1e-5
    # slack covers the float32 output.
    tok = FastTokenizer.fit(chunks, vocab_size=1024, scale=scale)
    decoded, valid = tok.decode(tok.encode(chunks))
    assert valid.all() and tok.stats.repaired == 0
    err = np.linalg.norm((decoded - chunks).reshape(len(chunks), -1), axis=1)
    bound = 0.5 / scale * np.sqrt(HORIZON * 4)
    assert err.max() <= bound + 1e-5, (err.max(), bound)
    assert err.max() > 0.05 * bound  # lossy as predicted, not trivially exact
    # Per coefficient: the decoded chunk's coefficients sit within 0.5 / scale of the originals.
    coeff_err = np.abs(_dct_from_formula(np.moveaxis(decoded - chunks, 1, 0).reshape(HORIZON, -1)))
    assert coeff_err.max() <= 0.5 / scale + 1e-5


def test_token_ids_equal_an_independent_computation(tokenizer, chunks, tmp_path):
    path = tmp_path / "fast.json"
    tokenizer.save(str(path))
    bpe = Tokenizer.from_str(json.dumps(json.loads(path.read_text())["bpe"]))
    for chunk in chunks[[0, 7, len(chunks) - 1]]:
        coeff = np.round(_dct_from_formula(chunk.astype(np.float64)) * 10.0).astype(int)  # [H, A]
        # Coefficient-major: every dimension's first coefficient, then every dimension's second, ...
        values = [coeff[k, d] for k in range(HORIZON) for d in range(4)]
        text = "".join(chr(v - tokenizer.min_token) for v in values)
        expected = bpe.encode(text).ids
        assert tokenizer.encode(chunk)[0] == expected
        assert len(expected) < HORIZON * 4  # BPE merged something
    assert tokenizer.min_token == int(np.round(np.stack([_dct_from_formula(c) for c in chunks]) * 10).min())


def test_invalid_sequences_decode_to_flagged_zeros(tokenizer, chunks):
    good = tokenizer.encode(chunks[0])[0]
    before = tokenizer.stats.invalid
    with pytest.warns(UserWarning, match="3 of 4 FAST token sequences were invalid"):
        decoded, valid = tokenizer.decode([good, [tokenizer.vocab_size], [], [good[0], -1]])
    np.testing.assert_array_equal(valid, [True, False, False, False])
    assert np.all(decoded[1:] == 0) and np.abs(decoded[0]).max() > 0
    assert tokenizer.stats.invalid == before + 3


def test_a_wrong_length_sequence_is_padded_or_truncated(tokenizer, chunks):
    ids = tokenizer.encode(chunks[3])[0]
    coeff = np.array([ord(c) for c in tokenizer.coefficient_string(chunks[3])]) + tokenizer.min_token
    short = ids[:3]
    n_short = len("".join(tokenizer.bpe.id_to_token(i) for i in short))
    padded = np.zeros(HORIZON * 4)
    padded[:n_short] = coeff[:n_short]
    decoded, valid = tokenizer.decode([short, ids + ids])
    assert valid.all()
    expected = np.linalg.solve(_dct_from_formula(np.eye(HORIZON)), padded.reshape(HORIZON, 4) / 10.0)
    np.testing.assert_allclose(decoded[0], expected, atol=1e-6)
    np.testing.assert_allclose(decoded[1], tokenizer.decode([ids])[0][0], atol=0)  # the extra copy is cut


def test_save_load_round_trip_is_exact(tokenizer, chunks, tmp_path):
    path = tmp_path / "fast.json"
    tokenizer.save(str(path))
    loaded = FastTokenizer.load(str(path))
    assert loaded.to_dict() == tokenizer.to_dict()
    assert loaded.encode(chunks) == tokenizer.encode(chunks)
    np.testing.assert_array_equal(loaded.decode(loaded.encode(chunks))[0],
                                  tokenizer.decode(tokenizer.encode(chunks))[0])


def test_bad_files_are_one_clear_error(tokenizer, tmp_path):
    data = tokenizer.to_dict()

    def write(content) -> str:
        path = tmp_path / "bad.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    with pytest.raises(ValueError, match=r"lacks the FAST tokenizer fields \['min_token', 'bpe'\]"):
        FastTokenizer.load(write({k: v for k, v in data.items() if k not in ("min_token", "bpe")}))
    with pytest.raises(ValueError, match=r"field 'action_horizon' must be an integer, got '8'"):
        FastTokenizer.load(write({**data, "action_horizon": "8"}))
    with pytest.raises(ValueError, match=r"field 'action_dim' must be >= 1 \(the action shape\), got 0"):
        FastTokenizer.load(write({**data, "action_dim": 0}))
    with pytest.raises(ValueError, match=r"field 'bpe' is not a huggingface tokenizers model"):
        FastTokenizer.load(write({**data, "bpe": {"model": 3}}))
    with pytest.raises(ValueError, match=r"is not json"):
        FastTokenizer.load(write("{not json"))
    with pytest.raises(FileNotFoundError, match=r"no FAST tokenizer file at .*missing.json"):
        FastTokenizer.load(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"chunks have shape \(2, 5, 4\); this tokenizer encodes \[B, 8, 4\]"):
        tokenizer.encode(np.zeros((2, 5, 4)))


def test_fit_refuses_a_vocabulary_smaller_than_the_alphabet(chunks):
    with pytest.raises(ValueError, match=r"span \d+ integers .* but vocab_size=8; use vocab_size >= \d+"):
        FastTokenizer.fit(chunks, vocab_size=8)
    with pytest.raises(ValueError, match=r"non-finite"):
        FastTokenizer.fit(np.full((2, 4, 2), np.nan))


def test_fit_script_writes_a_loadable_file_and_reports_compression(tmp_path, capsys):
    out = tmp_path / "fast.json"
    report = main(["--dataset", str(DATASET), "--horizon", str(HORIZON), "--out", str(out)])
    tok = FastTokenizer.load(str(out))
    chunks = lerobot_action_chunks(str(DATASET), HORIZON)
    assert report == compression(tok, chunks)
    assert report["numbers_per_chunk"] == 32 and 1.0 < report["compression_ratio"]
    assert '"compression_ratio"' in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"no episode of .* has 500 steps \(the longest has \d+\); lower --horizon"):
        lerobot_action_chunks(str(DATASET), 500)
