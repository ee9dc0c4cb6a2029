"""BinTokenizer against OpenVLA's published action tokenizer (``prismatic/vla/action_tokenizer.py``), written out
below in float64 numpy as the reference, on the edge cases that matter: the range ends, values outside the range,
exact bin edges and their float32 neighbours, and every token id (including ids outside the action range)."""

from __future__ import annotations

import numpy as np
import pytest

from vlax.heads import BinTokenizer

VOCAB, N_BINS = 32000, 256


def openvla_encode(actions: np.ndarray, vocab: int = VOCAB, n_bins: int = N_BINS, low=-1.0, high=1.0) -> np.ndarray:
    """Token ids: ``vocab - digitize(clip(a, low, high), linspace(low, high, n_bins))``."""
    edges = np.linspace(low, high, n_bins)
    return vocab - np.digitize(np.clip(actions.astype(np.float64), low, high), edges)


def openvla_decode(tokens: np.ndarray, vocab: int = VOCAB, n_bins: int = N_BINS, low=-1.0, high=1.0) -> np.ndarray:
    """Bin centres: ``centers[clip(vocab - token - 1, 0, n_bins - 2)]``."""
    edges = np.linspace(low, high, n_bins)
    centers = (edges[:-1] + edges[1:]) / 2.0
    return centers[np.clip(vocab - tokens - 1, 0, centers.shape[0] - 1)]


def _edge_cases() -> np.ndarray:
    edges32 = np.linspace(-1.0, 1.0, N_BINS).astype(np.float32)
    below = np.nextafter(edges32, np.float32(-np.inf))
    above = np.nextafter(edges32, np.float32(np.inf))
    special = np.asarray([-1.0, 1.0, 0.0, -0.0, -1.5, 1.5, -100.0, 100.0, np.float32(1e-8), -np.float32(1e-8)],
                         np.float32)
    rng = np.random.default_rng(0)
    return np.concatenate([special, edges32, below, above, rng.uniform(-1.2, 1.2, 500).astype(np.float32)])


def test_encode_reproduces_openvla_on_edge_cases():
    tok = BinTokenizer(n_bins=N_BINS, vocab_size=VOCAB)
    actions = _edge_cases()
    got = np.asarray(tok.encode(actions))
    want = openvla_encode(actions)
    mismatch = np.flatnonzero(got != want)
    assert mismatch.size == 0, f"{mismatch.size} ids differ, e.g. a={actions[mismatch[:3]]}: " \
                               f"{got[mismatch[:3]]} vs {want[mismatch[:3]]}"
    assert tok.token_range == (VOCAB - N_BINS, VOCAB - 1)
    # -1 is digitized into bin 1 (id vocab - 1); 1 (== the last edge) into bin n_bins (the first action id).
    assert int(tok.encode(np.float32(-1.0))) == VOCAB - 1 and int(tok.encode(np.float32(1.0))) == VOCAB - N_BINS
    assert int(tok.encode(np.float32(7.0))) == VOCAB - N_BINS and int(tok.encode(np.float32(-7.0))) == VOCAB - 1


def test_decode_reproduces_openvla_for_every_id():
    tok = BinTokenizer(n_bins=N_BINS, vocab_size=VOCAB)
    ids = np.arange(VOCAB - N_BINS - 5, VOCAB + 3)  # out-of-range ids on both sides are clipped onto the range
    got = np.asarray(tok.decode(ids))
    want = openvla_decode(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=6e-8)  # centres rounded once to float32
    assert got[-1] == got[-4] and got[0] == got[5]


def test_round_trip_lands_within_half_a_bin():
    tok = BinTokenizer(n_bins=N_BINS, vocab_size=VOCAB)
    actions = np.concatenate([np.random.default_rng(1).uniform(-1, 1, (63, 7)), np.ones((1, 7))]).astype(np.float32)
    decoded = np.asarray(tok.decode(tok.encode(actions)))
    assert decoded.shape == actions.shape
    assert np.abs(decoded - actions).max() <= 1.0 / (N_BINS - 1) + 1e-6  # half of a bin width 2 / (N_BINS - 1)


def test_classes_and_tokens_are_mirror_images():
    tok = BinTokenizer(n_bins=8, vocab_size=100)
    classes = np.arange(8)
    np.testing.assert_array_equal(np.asarray(tok.classes_to_tokens(classes)), 99 - classes)
    np.testing.assert_array_equal(np.asarray(tok.tokens_to_classes(tok.classes_to_tokens(classes))), classes)
    actions = np.linspace(-1, 1, 40, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(tok.encode(actions)), openvla_encode(actions, 100, 8))


def test_quantile_bins_hold_equal_mass_per_dimension():
    rng = np.random.default_rng(2)
    samples = np.stack([rng.normal(0, 0.1, 20000), rng.exponential(1.0, 20000)], axis=-1).astype(np.float32)
    tok = BinTokenizer.from_quantiles(samples, n_bins=11)
    assert tok.edges.shape == (2, 11)
    classes = np.asarray(tok.encode_classes(samples))  # [M, 2]
    for d in range(2):
        counts = np.bincount(np.clip(classes[:, d], 0, 9), minlength=10)  # the top edge folds into the last bin
        assert counts.min() >= 0.09 * len(samples) and counts.max() <= 0.11 * len(samples), (d, counts)
    centers = np.asarray(tok.decode_classes(classes))
    assert np.abs(np.median(centers[:, 0])) < 0.02 and np.median(centers[:, 1]) > 0.5  # per-dimension centres


def test_bad_bin_settings_are_refused():
    with pytest.raises(ValueError, match=r"n_bins=300 action tokens do not fit a vocabulary of 256 ids"):
        BinTokenizer(n_bins=300, vocab_size=256)
    with pytest.raises(ValueError, match=r"need low < high, got low=1.0, high=-1.0"):
        BinTokenizer(low=1.0, high=-1.0)
    with pytest.raises(ValueError, match=r"n_bins must be >= 2"):
        BinTokenizer(n_bins=1)
    with pytest.raises(ValueError, match=r"has no vocab_size: token ids need BinTokenizer\(vocab_size=...\)"):
        BinTokenizer(n_bins=8).encode(np.zeros(3, np.float32))
