"""Instruction tokenizers, each serialisable to JSON so a checkpoint carries the exact one it was trained with.

* :class:`WordTokenizer`: a word vocabulary built from a dataset's instructions, for from-scratch policies.
* :class:`ByteTokenizer`: UTF-8 bytes, no vocabulary to build.
* :class:`HFTokenizer`: a pretrained backbone's ``tokenizer.json`` read from a local file (no hub access).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def to_json(self) -> dict: ...


class WordTokenizer:
    """Lower-cased words and punctuation; id 0 is padding, 1 unknown, 2 beginning of text."""

    kind = "word"

    def __init__(self, words: Sequence[str]):
        self.vocab = [PAD, UNK, BOS, *sorted(set(words) - {PAD, UNK, BOS})]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.vocab_size, self.pad_id, self.unk_id, self.bos_id = len(self.vocab), 0, 1, 2

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())

    @classmethod
    def build(cls, texts: Iterable[str]) -> "WordTokenizer":
        words: set[str] = set()
        for t in texts:
            words.update(cls.split(t))
        return cls(sorted(words))

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [self.index.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in (self.pad_id, self.bos_id))

    def to_json(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab}


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; ids 0/1/2 are padding/unknown/beginning."""

    kind = "byte"
    vocab_size, pad_id, bos_id = 259, 0, 2

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": self.kind}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), read from a local path or JSON text."""

    kind = "hf"

    def __init__(self, spec: str, pad_id: int | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        self._json = spec
        self._tok = _Tokenizer.from_str(spec)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.pad_id = 0 if pad_id is None else pad_id

    @classmethod
    def from_file(cls, path: str | Path, pad_id: int | None = None) -> "HFTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}; a pretrained backbone's directory must hold one")
        return cls(path.read_text(), pad_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def to_json(self) -> dict:
        return {"kind": self.kind, "tokenizer_json": self._json, "pad_id": self.pad_id}


def tokenizer_from_json(spec: dict) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint saved."""
    kind = spec.get("kind")
    if kind == "word":
        tok = WordTokenizer([])
        tok.vocab = list(spec["vocab"])
        tok.index = {w: i for i, w in enumerate(tok.vocab)}
        tok.vocab_size = len(tok.vocab)
        return tok
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(spec["tokenizer_json"], spec.get("pad_id"))
    raise ValueError(f"unknown tokenizer kind {kind!r}; known: 'word', 'byte', 'hf'")


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str | bytes], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids ``[B, max_len]`` int32 and mask ``[B, max_len]`` bool; longer texts are truncated."""
    ids = np.full((len(texts), max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    for i, text in enumerate(texts):
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        tokens = tokenizer.encode(text)[:max_len]
        ids[i, :len(tokens)] = tokens
        mask[i, :len(tokens)] = True
    return ids, mask


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_json()))
