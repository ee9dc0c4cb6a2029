"""Tokenizers encode, pad, and survive a JSON round trip unchanged."""

import json

import numpy as np
import pytest

from vlax.tokenizers import ByteTokenizer, HFTokenizer, WordTokenizer, encode_batch, tokenizer_from_json

INSTRUCTIONS = ["Push the puck to the goal.", "open the drawer", "Press the button from the top"]


def test_word_tokenizer_build_encode_roundtrip():
    tok = WordTokenizer.build(INSTRUCTIONS)
    ids = tok.encode("push the drawer, please")
    assert ids[0] == tok.bos_id and ids[-1] == tok.unk_id  # "please" was never seen
    assert tok.decode(tok.encode("open the drawer")) == "open the drawer"
    again = tokenizer_from_json(json.loads(json.dumps(tok.to_json())))
    assert again.vocab == tok.vocab and again.encode(INSTRUCTIONS[0]) == tok.encode(INSTRUCTIONS[0])


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("reach goal é")) == "reach goal é"
    assert tokenizer_from_json(tok.to_json()).encode("ab") == [2, ord("a") + 3, ord("b") + 3]


def test_encode_batch_pads_and_truncates():
    tok = WordTokenizer.build(INSTRUCTIONS)
    ids, mask = encode_batch(tok, [b"open the drawer", "push the puck to the goal ."], max_len=5)
    assert ids.shape == (2, 5) and ids.dtype == np.int32
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert ids[0, 4] == tok.pad_id


def test_hf_tokenizer_from_local_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(INSTRUCTIONS * 10, trainers.BpeTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]"]))
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer.from_file(tmp_path)
    assert tok.encode("open the drawer") == raw.encode("open the drawer").ids
    again = tokenizer_from_json(json.loads(json.dumps(tok.to_json())))
    assert again.encode(INSTRUCTIONS[2]) == tok.encode(INSTRUCTIONS[2])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json at"):
        HFTokenizer.from_file(tmp_path / "missing")


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'spm'; known"):
        tokenizer_from_json({"kind": "spm"})
