"""Prompt templates give each family's exact strings, and tokenized prompts equal the family's own recipe."""

import numpy as np
import pytest

from vlax.prompts import PROMPTS, discretize_state, get_prompt, tokenize_prompts
from vlax.tokenizers import WordTokenizer, load_tokenizer, tokenizer_from_json

from test_tokenizers import ROBOT_TEXTS, _train_sentencepiece


def test_template_strings():
    assert get_prompt("plain")("Open the drawer") == "Open the drawer"
    assert get_prompt("pi0")("  pick_up the cup\nnow ") == "pick up the cup now\n"
    assert get_prompt("paligemma")("pick_up") == "pick up\n"
    assert get_prompt("openvla")("Put the Corn on the plate") == (
        "In: What action should the robot take to put the corn on the plate?\nOut:")
    assert get_prompt("smolvla")("stack cups") == "stack cups\n"
    assert get_prompt("smolvla")("stack cups\n") == "stack cups\n"  # not doubled
    state = np.array([-1.0, -0.999, 0.0, 0.5, 0.99999, 1.0])
    assert get_prompt("pi05")("close_the door", state) == (
        "Task: close the door, State: 0 0 128 192 255 255;\nAction: ")
    assert discretize_state(state, bins=4) == "0 0 2 3 3 3"


def test_pi05_bins_match_numpy_digitize_on_random_states():
    rs = np.random.RandomState(0)
    state = rs.uniform(-1, 1, 32)
    expected = np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1
    assert discretize_state(state) == " ".join(map(str, expected))
    assert all(0 <= int(v) <= 255 for v in discretize_state(rs.uniform(-3, 3, 64)).split())


def test_custom_and_unknown_templates():
    custom = get_prompt("Robot, please {instruction}.")
    assert custom("wave") == "Robot, please wave." and get_prompt(custom.to_json())("wave") == "Robot, please wave."
    assert get_prompt("pi0").to_json() == "pi0" and get_prompt(get_prompt("pi0")) is PROMPTS["pi0"]
    with pytest.raises(ValueError, match=r"unknown prompt template 'pi9'; known: \['openvla', 'paligemma', 'pi0'"):
        get_prompt("pi9")
    with pytest.raises(ValueError, match="not a valid format string"):
        get_prompt("{instruction} {robot}")
    with pytest.raises(ValueError, match="formats the state; pass state"):
        get_prompt("pi05")("wave")
    with pytest.raises(ValueError, match="formats the state; pass states"):
        tokenize_prompts(WordTokenizer.build(["wave"]), "pi05", ["wave"], 8)


def test_pi0_tokens_follow_openpi_recipe(tmp_path):
    """openpi: ``encode(cleaned, add_bos=True) + encode("\\n")``, the newline tokenized on its own."""
    import sentencepiece as spm

    proto = _train_sentencepiece(tmp_path)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    tok = tokenizer_from_json(load_tokenizer(tmp_path).to_json())  # as a checkpoint restores it
    texts = [t for t in ROBOT_TEXTS]
    ids, mask = tokenize_prompts(tok, "pi0", texts, max_len=48)
    for row, m, text in zip(ids, mask, texts):
        cleaned = text.strip().replace("_", " ").replace("\n", " ")
        expected = sp.encode(cleaned, add_bos=True) + sp.encode("\n")
        assert row[m].tolist() == expected, text
        assert (row[~m] == tok.pad_id).all()
    # π0.5: the whole prompt with BOS in one piece
    states = np.random.RandomState(1).uniform(-1, 1, (len(texts), 5))
    ids, mask = tokenize_prompts(tok, "pi05", texts, max_len=96, states=states)
    for row, m, text, state in zip(ids, mask, texts, states):
        bins = np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1
        cleaned = text.strip().replace("_", " ").replace("\n", " ")
        full = f"Task: {cleaned}, State: {' '.join(map(str, bins))};\nAction: "
        assert row[m].tolist() == sp.encode(full, add_bos=True), text


def test_tokenize_prompts_truncates_and_is_pure():
    tok = WordTokenizer.build(ROBOT_TEXTS + ["in what action should the robot take to out"])
    a = tokenize_prompts(tok, "openvla", [b"open the top drawer"] * 3, max_len=6)
    b = tokenize_prompts(WordTokenizer.build(ROBOT_TEXTS + ["in what action should the robot take to out"]),
                         "openvla", ["open the top drawer"] * 3, max_len=6)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1].all() and a[0].shape == (3, 6)
