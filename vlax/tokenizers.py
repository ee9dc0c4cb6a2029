"""Instruction tokenizers, each serialisable to JSON so a checkpoint carries the exact one it was trained with.

* :class:`WordTokenizer`: a word vocabulary built from a dataset's instructions, for from-scratch policies.
* :class:`ByteTokenizer`: UTF-8 bytes, no vocabulary to build.
* :class:`HFTokenizer`: a pretrained backbone's ``tokenizer.json`` (the ``tokenizers`` library) read from a local
  directory, with the BOS/EOS/padding choices of its ``tokenizer_config.json`` / ``special_tokens_map.json``.
* :class:`SentencePieceTokenizer`: a SentencePiece ``.model`` (PaliGemma / Gemma / Llama-2), run by the
  ``sentencepiece`` library itself, so ids are the ones those models were trained with; the model bytes are saved in
  the checkpoint (base64 in the JSON).

:func:`load_tokenizer` picks the right one for a backbone directory. :func:`encode_batch` pads a batch to
``[B, max_len]``; it uses the tokenizer's batch API and memoises repeated strings (instructions repeat).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import weakref
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.index.get(w, self.unk_id) for w in self.split(text)]
        return [self.bos_id] + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in (self.pad_id, self.bos_id))

    def to_json(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab}


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; ids 0/1/2 are padding/unknown/beginning."""

    kind = "byte"
    vocab_size, pad_id, bos_id = 259, 0, 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_id] + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": self.kind}


# ---- pretrained tokenizers ----------------------------------------------------------------------------------------

def _token_content(value: Any) -> str | None:
    """A special token as written in ``tokenizer_config.json``: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(directory: str | Path) -> dict[str, Any]:
    """``bos_token`` / ``eos_token`` / ``pad_token`` (strings) and ``add_bos_token`` / ``add_eos_token`` (bools)
    from a backbone directory's ``special_tokens_map.json`` and ``tokenizer_config.json`` (the latter wins, as in
    transformers). Missing files or keys are left out."""
    directory = Path(directory)
    found: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from e
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = _token_content(config.get(key))
            if token is not None:
                found[key] = token
        for key in ("add_bos_token", "add_eos_token"):
            if isinstance(config.get(key), bool):
                found[key] = config[key]
    return found


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` read from a local path or JSON text (no hub access).

    BOS/EOS: with ``add_bos`` / ``add_eos`` left ``None`` the ``tokenizer.json``'s own post-processor decides, as in
    transformers 5, which ignores ``tokenizer_config.json``'s ``add_bos_token`` / ``add_eos_token`` whenever a
    ``tokenizer.json`` exists (Llama-2, Gemma and SmolLM2 ship post-processors that match their configs). Set
    explicitly, they replace it: ``[bos] + ids + [eos]``, what transformers builds for one sequence with those flags.
    The ids of the BOS/EOS/pad tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json``.
    ``pad_id``: the argument, else the configured ``pad_token``, else the ``tokenizer.json`` padding id, else 0
    (padding is masked, so any valid id works for a vocabulary without one, e.g. Llama's).
    """

    kind = "hf"

    def __init__(self, spec: str, pad_id: int | None = None, *, add_bos: bool | None = None,
                 add_eos: bool | None = None, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        self._json = spec
        self._tok = _Tokenizer.from_str(spec)
        # Padding and truncation belong to encode_batch (fixed max_len, mask); a tokenizer.json may enable either.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        padding = json.loads(spec).get("padding") or {}
        self.pad_id = int(pad_id if pad_id is not None else padding.get("pad_id", 0))
        self.add_bos, self.add_eos, self.bos_id, self.eos_id = add_bos, add_eos, bos_id, eos_id
        for flag, token_id, what in ((add_bos, bos_id, "bos"), (add_eos, eos_id, "eos")):
            if flag and token_id is None:
                raise ValueError(f"add_{what}=True but no {what} token id is known; pass {what}_id= or set "
                                 f"{what}_token in tokenizer_config.json")

    @classmethod
    def from_file(cls, path: str | Path, pad_id: int | None = None, *, add_bos: bool | None = None,
                  add_eos: bool | None = None) -> "HFTokenizer":
        """From a ``tokenizer.json`` or a directory holding one (plus optional ``tokenizer_config.json`` /
        ``special_tokens_map.json``, read for the BOS/EOS/pad tokens). Explicit arguments win over those files."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}; a pretrained backbone's directory must hold one")
        tok = cls(path.read_text(), pad_id)  # to look up the configured tokens' ids
        special = read_special_tokens(directory)

        def token_id(key: str) -> int | None:
            token = special.get(key)
            if token is None:
                return None
            i = tok._tok.token_to_id(token)
            if i is None:
                raise ValueError(f"{key} {token!r} of {directory} is not in {path}'s vocabulary")
            return i

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        if pad_id is None:
            pad_id = token_id("pad_token")
        return cls(tok._json, pad_id, add_bos=add_bos, add_eos=add_eos, bos_id=bos_id, eos_id=eos_id)

    @property
    def _explicit(self) -> bool:
        return self.add_bos is not None or self.add_eos is not None

    def _wrap(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if not (add_special_tokens and self._explicit):
            return ids
        return [self.bos_id] * bool(self.add_bos) + ids + [self.eos_id] * bool(self.add_eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        use_post = add_special_tokens and not self._explicit
        return self._wrap(self._tok.encode(text, add_special_tokens=use_post).ids, add_special_tokens)

    def encode_many(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Batch encode (the Rust side runs the batch in parallel)."""
        use_post = add_special_tokens and not self._explicit
        return [self._wrap(e.ids, add_special_tokens)
                for e in self._tok.encode_batch(list(texts), add_special_tokens=use_post)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def to_json(self) -> dict:
        return {"kind": self.kind, "tokenizer_json": self._json, "pad_id": self.pad_id, "add_bos": self.add_bos,
                "add_eos": self.add_eos, "bos_id": self.bos_id, "eos_id": self.eos_id}


class SentencePieceTokenizer:
    """A SentencePiece model (``tokenizer.model``), e.g. PaliGemma's or Llama-2's, run by ``sentencepiece``.

    ``add_bos`` defaults to True (PaliGemma, π0 and Llama-2 prompts all start with BOS), ``add_eos`` to False.
    ``pad_id``: the argument, else the model's own pad id, else 0.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, *, add_bos: bool = True, add_eos: bool = False, pad_id: int | None = None):
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - an install problem, named
            raise ImportError("SentencePiece tokenizers need the 'sentencepiece' package: pip install "
                              "sentencepiece") from e
        self._proto = bytes(model_proto)
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.bos_id, self.eos_id = int(self._sp.bos_id()), int(self._sp.eos_id())
        for flag, token_id, what in ((add_bos, self.bos_id, "bos"), (add_eos, self.eos_id, "eos")):
            if flag and token_id < 0:
                raise ValueError(f"add_{what}=True but this SentencePiece model has no {what} piece; "
                                 f"pass add_{what}=False")
        own_pad = int(self._sp.pad_id())
        self.pad_id = int(pad_id if pad_id is not None else (own_pad if own_pad >= 0 else 0))

    @classmethod
    def from_file(cls, path: str | Path, *, add_bos: bool | None = None, add_eos: bool | None = None,
                  pad_id: int | None = None) -> "SentencePieceTokenizer":
        """From a ``.model`` file or a directory holding ``tokenizer.model`` (and optionally
        ``tokenizer_config.json`` for ``add_bos_token`` / ``add_eos_token``)."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        if path.is_dir():
            own = path / "tokenizer.model"
            models = [own] if own.is_file() else sorted(path.glob("*.model"))
            if len(models) != 1:
                raise FileNotFoundError(f"expected one SentencePiece .model in {path} (tokenizer.model), found "
                                        f"{[m.name for m in models]}")
            path = models[0]
        if not path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        special = read_special_tokens(directory)
        add_bos = special.get("add_bos_token", True) if add_bos is None else add_bos
        add_eos = special.get("add_eos_token", False) if add_eos is None else add_eos
        return cls(path.read_bytes(), add_bos=add_bos, add_eos=add_eos, pad_id=pad_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        special = add_special_tokens
        return self._sp.encode(text, add_bos=self.add_bos and special, add_eos=self.add_eos and special)

    def encode_many(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        special = add_special_tokens
        return self._sp.encode(list(texts), add_bos=self.add_bos and special, add_eos=self.add_eos and special)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def to_json(self) -> dict:
        return {"kind": self.kind, "model_base64": base64.b64encode(self._proto).decode("ascii"),
                "add_bos": self.add_bos, "add_eos": self.add_eos, "pad_id": self.pad_id}


def load_tokenizer(path: str | Path, **kwargs: Any) -> HFTokenizer | SentencePieceTokenizer:
    """A backbone's tokenizer from its local directory: ``tokenizer.json`` when present (the ``tokenizers`` library),
    else a SentencePiece ``tokenizer.model``. ``kwargs`` go to the ``from_file`` of the chosen class."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".model":
            return SentencePieceTokenizer.from_file(path, **kwargs)
        return HFTokenizer.from_file(path, **kwargs)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_file(path, **kwargs)
    if path.is_dir() and ((path / "tokenizer.model").is_file() or any(path.glob("*.model"))):
        return SentencePieceTokenizer.from_file(path, **kwargs)
    raise FileNotFoundError(f"no tokenizer in {path}: looked for tokenizer.json (Hugging Face tokenizers) and "
                            "tokenizer.model / *.model (SentencePiece)")


TOKENIZER_KINDS = ("word", "byte", "hf", "sentencepiece")


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
        return HFTokenizer(spec["tokenizer_json"], spec.get("pad_id"), add_bos=spec.get("add_bos"),
                           add_eos=spec.get("add_eos"), bos_id=spec.get("bos_id"), eos_id=spec.get("eos_id"))
    if kind == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(spec["model_base64"]), add_bos=spec.get("add_bos", True),
                                      add_eos=spec.get("add_eos", False), pad_id=spec.get("pad_id"))
    raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(repr(k) for k in TOKENIZER_KINDS)}")


# ---- batches ------------------------------------------------------------------------------------------------------

# Memo of encoded strings per tokenizer object. A cache only: the ids are a function of (tokenizer, text), so an
# iterator restored from a checkpoint (with a cold cache) yields the same batches.
_CACHE_LIMIT = 1 << 16
_caches: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def _cache_for(tokenizer: Any) -> dict:
    with _caches_lock:
        cache = _caches.get(tokenizer)
        if cache is None:
            cache = _caches[tokenizer] = {}
        return cache


def as_text(text: str | bytes | np.str_ | np.bytes_) -> str:
    """A str from what tf.data / numpy hand over (bytes are UTF-8)."""
    return text.decode("utf-8") if isinstance(text, (bytes, np.bytes_)) else str(text)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str | bytes], *, add_special_tokens: bool = True,
                 cache: bool = True) -> list[list[int]]:
    """Unpadded ids of each text: distinct strings encoded once (memoised across calls when ``cache``), through
    the tokenizer's batch API when it has one."""
    texts = [as_text(t) for t in texts]
    memo = _cache_for(tokenizer) if cache else {}
    found = {t: memo.get((t, add_special_tokens)) for t in dict.fromkeys(texts)}
    todo = [t for t, ids in found.items() if ids is None]
    if todo:
        many = getattr(tokenizer, "encode_many", None)
        encoded = (many(todo, add_special_tokens=add_special_tokens) if many is not None
                   else [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in todo])
        if cache and len(memo) + len(todo) > _CACHE_LIMIT:
            memo.clear()  # bounded: a dataset with more distinct strings than this just re-encodes
        for t, ids in zip(todo, encoded):
            found[t] = memo[(t, add_special_tokens)] = tuple(ids)
    return [list(found[t]) for t in texts]


def pad_ids(sequences: Sequence[Sequence[int]], max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids ``[B, max_len]`` int32 and mask ``[B, max_len]`` bool; longer sequences are truncated."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids = np.full((len(sequences), max_len), pad_id, np.int32)
    mask = np.zeros((len(sequences), max_len), bool)
    for i, seq in enumerate(sequences):
        seq = list(seq)[:max_len]
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = True
    return ids, mask


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str | bytes], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids ``[B, max_len]`` int32 and mask ``[B, max_len]`` bool; longer texts are truncated.

    ``texts`` may be str or UTF-8 bytes (a numpy object array from ``tf.numpy_function`` works). A pure function of
    its inputs: repeated strings are served from a memo, which never changes the result.
    """
    return pad_ids(encode_texts(tokenizer, list(texts)), max_len, tokenizer.pad_id)


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_json()))
