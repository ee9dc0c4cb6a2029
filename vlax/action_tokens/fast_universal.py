"""FAST tokenizers in the released Hugging Face processor format: ``physical-intelligence/fast`` (the universal
FAST+ tokenizer openpi's π0-FAST trains with) and processors fitted with its code, read as data.

A processor directory holds

* ``processor_config.json``: ``scale`` (10 in the universal one), ``min_token`` (-354), ``vocab_size`` (2048),
  ``time_horizon`` / ``action_dim`` (null in the universal one: the caller names the chunk shape),
  ``processor_class`` (``UniversalActionProcessor``) and ``auto_map``;
* ``tokenizer.json``: a ``tokenizers`` byte-level BPE (ByteLevel pre-tokenizer and decoder) over coefficient
  characters;
* ``tokenizer_config.json`` (optional): ``clean_up_tokenization_spaces``, which transformers applies on decode;
* ``processing_action_tokenizer.py``: the processor's Python. It is never imported or run here (no
  ``trust_remote_code``); its arithmetic is reimplemented below from the files' data.

The processor's arithmetic differs from :class:`vlax.action_tokens.FastTokenizer` in three ways, all kept:

1. encoding clips below only: each rounded scaled coefficient ``v`` becomes ``chr(max(v - min_token, 0))``
   (FastTokenizer clips to the fitted range on both sides), and the string goes through the tokenizer's own
   pre-tokenizer (byte level) before the BPE;
2. decoding is the tokenizer's own decode (it drops ids outside its vocabulary and fails on negative ones), then
   ``ord(c) + min_token`` per character; anything but exactly ``H * A`` characters, or a failed decode, is zeros
   (flagged invalid here; the processor prints an error and returns zeros). FastTokenizer instead pads or
   truncates a wrong-length sequence and refuses out-of-vocabulary ids;
3. the token bound: a byte-level token covers at least one UTF-8 byte and a coefficient character below U+0800
   takes at most two (``v - min_token < 2048``: |coefficient| below ~169 at scale 10, far beyond normalized
   actions), so a chunk needs at most ``2 * H * A`` tokens (longer encodings are cut by ``encode_padded``).

The DCT is computed in float64 (openpi's normalized actions are float64 once its float64 statistics apply).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from vlax.action_tokens.fast import DecodeStats, PaddedCodec, dct_coefficients, inverse_dct

PROCESSOR_CONFIG, TOKENIZER_FILE, TOKENIZER_CONFIG = "processor_config.json", "tokenizer.json", "tokenizer_config.json"
PROCESSOR_CLASS = "UniversalActionProcessor"
# transformers' clean_up_tokenization, in its order: applied to decoded text when the tokenizer config asks for it
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
MAX_CODE_POINT = 0x10FFFF


def is_processor_path(path: str | Path) -> bool:
    """True for a processor directory (``processor_config.json`` inside) or that config file itself."""
    p = Path(path)
    return (p.is_dir() and (p / PROCESSOR_CONFIG).is_file()) or (p.name == PROCESSOR_CONFIG and p.is_file())


class UniversalFastTokenizer(PaddedCodec):
    """A released FAST processor (see the module docstring) for chunks ``[H, A]``.

    ``action_horizon`` / ``action_dim`` may be None (the universal processor records neither); :meth:`with_shape`
    then gives the tokenizer for one chunk shape, which encoding bounds and decoding need.
    """

    kind = "universal"

    def __init__(self, bpe: Tokenizer, *, scale: float, min_token: int, action_horizon: int | None = None,
                 action_dim: int | None = None, clean_up_spaces: bool = False, source: str = "<processor>"):
        if not scale > 0:
            raise ValueError(f"{source}: scale must be > 0, got {scale}")
        for name, value in (("action_horizon", action_horizon), ("action_dim", action_dim)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{source}: {name} must be >= 1 (the action shape), got {value}")
        self.bpe, self.source = bpe, source
        self.scale, self.min_token = float(scale), int(min_token)
        self.action_horizon = None if action_horizon is None else int(action_horizon)
        self.action_dim = None if action_dim is None else int(action_dim)
        self.clean_up_spaces = bool(clean_up_spaces)
        self.vocab_size = int(bpe.get_vocab_size())
        self.stats = DecodeStats()

    # ---- shape -------------------------------------------------------------------------------------------------
    @property
    def action_shape(self) -> tuple[int, int] | None:
        if self.action_horizon is None or self.action_dim is None:
            return None
        return self.action_horizon, self.action_dim

    def with_shape(self, action_horizon: int, action_dim: int) -> "UniversalFastTokenizer":
        """This processor for chunks ``[action_horizon, action_dim]`` (the same BPE object)."""
        if self.action_shape == (int(action_horizon), int(action_dim)):
            return self
        return UniversalFastTokenizer(self.bpe, scale=self.scale, min_token=self.min_token,
                                      action_horizon=action_horizon, action_dim=action_dim,
                                      clean_up_spaces=self.clean_up_spaces, source=self.source)

    def _shape(self) -> tuple[int, int]:
        shape = self.action_shape
        if shape is None:
            raise ValueError(f"the FAST processor {self.source} records no chunk shape (time_horizon / action_dim "
                             "null); load it with action_horizon= and action_dim= or call with_shape(H, A)")
        return shape

    @property
    def max_tokens(self) -> int:
        """Upper bound on one chunk's tokens: two UTF-8 bytes per coefficient character, >= 1 byte per token."""
        h, a = self._shape()
        return 2 * h * a

    # ---- encoding ----------------------------------------------------------------------------------------------
    def coefficient_string(self, chunk: np.ndarray) -> str:
        """The character string the BPE reads for one chunk ``[H, A]``."""
        chunk = np.asarray(chunk, np.float64)
        if chunk.shape != self._shape():
            raise ValueError(f"a chunk has shape {chunk.shape}; this tokenizer encodes {self._shape()} chunks")
        values = np.maximum(dct_coefficients(chunk, self.scale).reshape(-1) - self.min_token, 0)
        if values.max(initial=0) > MAX_CODE_POINT or np.any((values >= 0xD800) & (values <= 0xDFFF)):
            raise ValueError(f"a scaled DCT coefficient of {int(values.max()) + self.min_token} is no character the "
                             f"tokenizer can encode (scale={self.scale}); normalize the actions to about [-1, 1]")
        return "".join(map(chr, values.tolist()))

    def encode(self, chunks: np.ndarray) -> list[list[int]]:
        """Token ids of each chunk: ``[B, H, A]`` (or one ``[H, A]``) -> ``B`` lists of ids."""
        chunks = np.asarray(chunks, np.float64)
        if chunks.ndim == 2:
            chunks = chunks[None]
        if chunks.ndim != 3 or chunks.shape[1:] != self._shape():
            raise ValueError(f"chunks have shape {chunks.shape}; this tokenizer encodes [B, {self._shape()[0]}, "
                             f"{self._shape()[1]}]")
        return [self.bpe.encode(self.coefficient_string(c)).ids for c in chunks]

    # ---- decoding ----------------------------------------------------------------------------------------------
    def _text(self, ids: list[int]) -> str:
        text = self.bpe.decode(ids)  # ids outside the vocabulary are dropped; a negative id raises
        if self.clean_up_spaces:
            for old, new in CLEAN_UP:
                text = text.replace(old, new)
        return text

    def decode(self, sequences: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(chunks float32 [B, H, A], valid bool [B])``; a sequence that fails to decode to exactly ``H * A``
        coefficients is zeros with ``valid`` False. Never raises per sequence."""
        shape = self._shape()
        chunks, valid = [], []
        for seq in sequences:
            self.stats.decoded += 1
            try:
                coeff = np.array([ord(c) for c in self._text([int(t) for t in seq])], np.int64) + self.min_token
                ok = coeff.size == shape[0] * shape[1]
            except (OverflowError, TypeError, ValueError):
                ok = False
            if ok:
                chunks.append(inverse_dct(coeff.reshape(shape), self.scale))
            else:
                self.stats.invalid += 1
                chunks.append(np.zeros(shape, np.float32))
            valid.append(ok)
        bad = len(valid) - sum(valid)
        if bad:
            warnings.warn(f"{bad} of {len(valid)} FAST token sequences were invalid and decoded as zeros",
                          stacklevel=2)
        return np.stack(chunks) if chunks else np.zeros((0, *shape), np.float32), np.array(valid, bool)

    # ---- files -------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, action_horizon: int | None = None, action_dim: int | None = None
             ) -> "UniversalFastTokenizer":
        """Read a processor directory (or its ``processor_config.json``). ``action_horizon`` / ``action_dim`` win
        over the config's ``time_horizon`` / ``action_dim``, as the processor's decode arguments do."""
        p = Path(path)
        directory = p if p.is_dir() else p.parent
        missing = [name for name in (PROCESSOR_CONFIG, TOKENIZER_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"the FAST processor directory {directory} lacks {missing}; download "
                                    "physical-intelligence/fast (or your processor) to a local directory first")
        source = str(directory)
        try:
            config = json.loads((directory / PROCESSOR_CONFIG).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{directory / PROCESSOR_CONFIG} is not json ({e})") from e
        if not isinstance(config, dict):
            raise ValueError(f"{directory / PROCESSOR_CONFIG} is not a json object")
        if config.get("processor_class", PROCESSOR_CLASS) != PROCESSOR_CLASS:
            raise ValueError(f"{source}: processor_class {config['processor_class']!r} is not a FAST processor "
                             f"({PROCESSOR_CLASS!r})")
        scale, min_token = config.get("scale"), config.get("min_token")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"{source}: 'scale' must be a positive number, got {scale!r}")
        if isinstance(min_token, bool) or not isinstance(min_token, int):
            raise ValueError(f"{source}: 'min_token' must be an integer, got {min_token!r}")
        shape = {}
        for ours, theirs, given in (("action_horizon", "time_horizon", action_horizon),
                                    ("action_dim", "action_dim", action_dim)):
            value = given if given is not None else config.get(theirs)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{source}: {theirs!r} must be a positive integer or null, got {value!r}")
            shape[ours] = value
        try:
            bpe = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"{directory / TOKENIZER_FILE} is not a huggingface tokenizers file ({e})") from e
        clean_up = False  # transformers' default when the config does not say
        if (directory / TOKENIZER_CONFIG).is_file():
            tok_config = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
            clean_up = bool(tok_config.get("clean_up_tokenization_spaces", False))
        return cls(bpe, scale=scale, min_token=min_token, clean_up_spaces=clean_up, source=source, **shape)

    def to_dict(self) -> dict[str, Any]:
        """The processor config this tokenizer would write (``processor_config.json``)."""
        return {"processor_class": PROCESSOR_CLASS, "scale": self.scale, "min_token": self.min_token,
                "vocab_size": self.vocab_size, "time_horizon": self.action_horizon, "action_dim": self.action_dim}
