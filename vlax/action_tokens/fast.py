"""FAST action tokenizer (Pertsch et al. 2025): DCT over time, scaled integer coefficients, BPE over them.

Encoding a normalized chunk ``[H, A]``:

1. per action dimension an orthonormal DCT-II over the time axis (``scipy.fft.dct(norm="ortho")``);
2. multiply by ``scale`` and round to integers (``np.around``: half to even);
3. flatten coefficient-major (row-major over ``[H, A]``: every dimension's first coefficient, then every
   dimension's second, ...), so the low frequencies that carry most of the signal come first;
4. each integer ``v`` becomes the character ``chr(v - min_token)`` and a byte-pair encoding trained on the data
   (huggingface ``tokenizers``, no pre-tokenizer, the whole integer range as its initial alphabet) turns the
   string into token ids in ``[0, vocab_size)``.

Decoding inverts the steps. Rounding is the only lossy step: each scaled coefficient is off by at most 0.5, i.e.
each coefficient by at most ``0.5 / scale``; the DCT is orthonormal per dimension, so the chunk's L2 error equals
the coefficients' L2 error, at most ``0.5 / scale * sqrt(H * A)`` (coefficients clipped to the fitted range lose
more). Every coefficient is one alphabet character and BPE only merges, so a chunk never needs more than
``H * A`` tokens.

A tokenizer is saved as ONE json file (the BPE model, ``scale``, ``min_token``/``max_token`` and the action
shape); nothing is pickled. :meth:`FastTokenizer.load` also reads the released Hugging Face processor format
(openpi's universal ``physical-intelligence/fast``), whose arithmetic differs slightly: see
:mod:`vlax.action_tokens.fast_universal`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.fft
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

FORMAT = "vlax.fast_tokenizer"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "scale", "min_token", "max_token", "action_horizon", "action_dim", "bpe")
# chr() of an alphabet reaching the UTF-16 surrogate block cannot be encoded as a json / tokenizers string.
MAX_ALPHABET = 0xD800


def dct_coefficients(chunks: np.ndarray, scale: float) -> np.ndarray:
    """Rounded scaled DCT-II coefficients ``[..., H, A]`` (int64) of chunks ``[..., H, A]``."""
    coeff = scipy.fft.dct(np.asarray(chunks, np.float64), type=2, axis=-2, norm="ortho")
    return np.around(coeff * scale).astype(np.int64)


def inverse_dct(coefficients: np.ndarray, scale: float) -> np.ndarray:
    """Chunks ``[..., H, A]`` (float32) from integer coefficients ``[..., H, A]``."""
    return scipy.fft.idct(np.asarray(coefficients, np.float64) / scale, type=2, axis=-2,
                          norm="ortho").astype(np.float32)


@dataclasses.dataclass
class DecodeStats:
    """Host-side counts over every decode of one tokenizer (the decode loop never raises)."""

    decoded: int = 0
    invalid: int = 0  # ids outside the vocabulary or an empty sequence: decoded as zeros
    repaired: int = 0  # wrong number of coefficients: zero-padded or truncated to H * A
    truncated: int = 0  # encodings cut to a caller's maximum length


class PaddedCodec:
    """Padded batch encode / decode over a tokenizer's ``encode`` / ``decode`` (the API the FAST head calls)."""

    stats: DecodeStats

    def encode_padded(self, chunks: np.ndarray, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [B, length], lengths int32 [B])``; a longer encoding is cut (counted in ``stats``)."""
        seqs = self.encode(chunks)
        ids = np.full((len(seqs), length), pad_id, np.int32)
        lengths = np.zeros(len(seqs), np.int32)
        for i, seq in enumerate(seqs):
            if len(seq) > length:
                self.stats.truncated += 1
                warnings.warn(f"a chunk took {len(seq)} FAST tokens, more than the maximum {length}; it is cut "
                              "(raise the head's max_tokens)", stacklevel=2)
                seq = seq[:length]
            ids[i, :len(seq)], lengths[i] = seq, len(seq)
        return ids, lengths

    def decode_padded(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``decode`` of ``ids [B, T]`` cut to ``lengths [B]``."""
        ids, lengths = np.asarray(ids), np.asarray(lengths)
        return self.decode([row[:int(n)] for row, n in zip(ids, lengths)])


class FastTokenizer(PaddedCodec):
    """A fitted FAST tokenizer for chunks of shape ``action_shape = (H, A)``.

    Build one with :meth:`fit` (from normalized chunks) or :meth:`load` (a saved file).
    """

    def __init__(self, bpe: Tokenizer, *, scale: float, min_token: int, max_token: int, action_horizon: int,
                 action_dim: int):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if max_token < min_token:
            raise ValueError(f"max_token={max_token} is below min_token={min_token}")
        if action_horizon < 1 or action_dim < 1:
            raise ValueError(f"action shape must be positive, got ({action_horizon}, {action_dim})")
        self.bpe = bpe
        self.scale, self.min_token, self.max_token = float(scale), int(min_token), int(max_token)
        self.action_horizon, self.action_dim = int(action_horizon), int(action_dim)
        self.vocab_size = int(bpe.get_vocab_size())
        self.stats = DecodeStats()
        # Token strings by id, so decoding concatenates them exactly (Tokenizer.decode would join with spaces).
        self._pieces = [bpe.id_to_token(i) for i in range(self.vocab_size)]

    @property
    def action_shape(self) -> tuple[int, int]:
        return self.action_horizon, self.action_dim

    @property
    def max_tokens(self) -> int:
        """Upper bound on the tokens of one chunk: one alphabet character per coefficient, BPE only merges."""
        return self.action_horizon * self.action_dim

    # ---- fitting -----------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, chunks: np.ndarray | Sequence[np.ndarray], vocab_size: int = 1024, scale: float = 10.0, *,
            min_frequency: int = 2) -> "FastTokenizer":
        """Fit the BPE on normalized chunks ``[N, H, A]``; ``vocab_size`` counts the alphabet as well."""
        chunks = np.asarray(chunks, np.float64)
        if chunks.ndim != 3 or chunks.shape[0] == 0:
            raise ValueError(f"fit needs normalized chunks [N, H, A] with N >= 1, got shape {chunks.shape}")
        if not np.all(np.isfinite(chunks)):
            raise ValueError("fit got non-finite actions (NaN or inf); normalize and clean the chunks first")
        coeff = dct_coefficients(chunks, scale)
        low, high = int(coeff.min()), int(coeff.max())
        alphabet = high - low + 1
        if alphabet > vocab_size:
            raise ValueError(f"the scaled coefficients span {alphabet} integers ({low}..{high}) but vocab_size="
                             f"{vocab_size}; use vocab_size >= {alphabet}, a smaller scale (got {scale}), or "
                             "normalize the actions to about [-1, 1]")
        if alphabet > MAX_ALPHABET:
            raise ValueError(f"the scaled coefficients span {alphabet} integers, more characters than a BPE "
                             f"alphabet holds ({MAX_ALPHABET}); lower scale={scale}")
        bpe = Tokenizer(BPE())
        trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
                             initial_alphabet=[chr(i) for i in range(alphabet)], show_progress=False,
                             max_token_length=None)
        strings = [_to_string(c, low) for c in coeff.reshape(len(coeff), -1)]
        bpe.train_from_iterator(strings, trainer=trainer)
        return cls(bpe, scale=scale, min_token=low, max_token=high, action_horizon=chunks.shape[1],
                   action_dim=chunks.shape[2])

    # ---- encoding ----------------------------------------------------------------------------------------------
    def _check_chunks(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks, np.float64)
        if chunks.ndim == 2:
            chunks = chunks[None]
        if chunks.ndim != 3 or chunks.shape[1:] != self.action_shape:
            raise ValueError(f"chunks have shape {chunks.shape}; this tokenizer encodes [B, {self.action_horizon}, "
                             f"{self.action_dim}] (fit a tokenizer for this action shape)")
        return chunks

    def coefficient_string(self, chunk: np.ndarray) -> str:
        """The character string the BPE reads for one chunk ``[H, A]`` (coefficients clipped to the fit range)."""
        coeff = dct_coefficients(self._check_chunks(chunk)[0], self.scale)
        return _to_string(np.clip(coeff.reshape(-1), self.min_token, self.max_token), self.min_token)

    def encode(self, chunks: np.ndarray) -> list[list[int]]:
        """Token ids of each chunk: ``[B, H, A]`` (or one ``[H, A]``) -> ``B`` lists of ids in ``[0, vocab)``."""
        return [self.bpe.encode(self.coefficient_string(c)).ids for c in self._check_chunks(chunks)]

    # ---- decoding ----------------------------------------------------------------------------------------------
    def decode(self, sequences: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(chunks float32 [B, H, A], valid bool [B])`` of ``B`` id sequences; never raises per sequence.

        A sequence with an id outside ``[0, vocab_size)`` or no id at all decodes to zeros with ``valid`` False;
        one whose characters give the wrong number of coefficients is zero-padded or truncated to ``H * A``
        (counted in ``stats.repaired``, still ``valid``).
        """
        n = self.action_horizon * self.action_dim
        chunks, valid = [], []
        for seq in sequences:
            seq = [int(t) for t in seq]
            self.stats.decoded += 1
            if not seq or any(t < 0 or t >= self.vocab_size for t in seq):
                self.stats.invalid += 1
                chunks.append(np.zeros(self.action_shape, np.float32))
                valid.append(False)
                continue
            coeff = np.array([ord(ch) for t in seq for ch in self._pieces[t]], np.int64) + self.min_token
            if coeff.size != n:
                self.stats.repaired += 1
                coeff = np.pad(coeff[:n], (0, max(0, n - coeff.size)))
            chunks.append(inverse_dct(coeff.reshape(self.action_shape), self.scale))
            valid.append(True)
        bad = len(valid) - sum(valid)
        if bad:
            warnings.warn(f"{bad} of {len(valid)} FAST token sequences were invalid and decoded as zeros",
                          stacklevel=2)
        return np.stack(chunks) if chunks else np.zeros((0, *self.action_shape), np.float32), np.array(valid, bool)

    # ---- files -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "scale": self.scale, "min_token": self.min_token,
                "max_token": self.max_token, "action_horizon": self.action_horizon, "action_dim": self.action_dim,
                "bpe": json.loads(self.bpe.to_str())}

    def save(self, path: str) -> None:
        """Write the tokenizer as one json file."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "FastTokenizer":
        if not isinstance(data, dict):
            raise ValueError(f"{source} is not a FAST tokenizer file (a json object); write one with "
                             "experiments/fit_fast_tokenizer.py")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(f"{source} lacks the FAST tokenizer fields {missing}; refit it with "
                             "experiments/fit_fast_tokenizer.py")
        if data["format"] != FORMAT or data["version"] != VERSION:
            raise ValueError(f"{source} has format {data['format']!r} version {data['version']!r}; this reader "
                             f"reads {FORMAT!r} version {VERSION}")
        for key in ("min_token", "max_token", "action_horizon", "action_dim"):
            if not isinstance(data[key], int) or isinstance(data[key], bool):
                raise ValueError(f"{source}: field {key!r} must be an integer, got {data[key]!r}")
        for key in ("action_horizon", "action_dim"):
            if data[key] < 1:
                raise ValueError(f"{source}: field {key!r} must be >= 1 (the action shape), got {data[key]}")
        if not isinstance(data["scale"], (int, float)) or not data["scale"] > 0:
            raise ValueError(f"{source}: field 'scale' must be a positive number, got {data['scale']!r}")
        try:
            bpe = Tokenizer.from_str(json.dumps(data["bpe"]))
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"{source}: field 'bpe' is not a huggingface tokenizers model ({e})") from e
        return cls(bpe, scale=data["scale"], min_token=data["min_token"], max_token=data["max_token"],
                   action_horizon=data["action_horizon"], action_dim=data["action_dim"])

    @classmethod
    def load(cls, path: str, *, action_horizon: int | None = None, action_dim: int | None = None) -> Any:
        """Read a tokenizer file written by :meth:`save`, or a released Hugging Face FAST processor directory
        (``physical-intelligence/fast``: ``processor_config.json`` + ``tokenizer.json``), which gives a
        :class:`vlax.action_tokens.fast_universal.UniversalFastTokenizer` for chunks ``[action_horizon,
        action_dim]`` (the universal processor records no shape). A vlax file carries its own shape."""
        from vlax.action_tokens.fast_universal import UniversalFastTokenizer, is_processor_path

        if is_processor_path(path):
            return UniversalFastTokenizer.load(path, action_horizon=action_horizon, action_dim=action_dim)
        if os.path.isdir(path):
            raise FileNotFoundError(f"{path} is a directory without processor_config.json; a FAST tokenizer is a "
                                    "vlax json file (experiments/fit_fast_tokenizer.py) or a Hugging Face FAST "
                                    "processor directory")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no FAST tokenizer file at {path}; write one with "
                                    "experiments/fit_fast_tokenizer.py")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not json ({e}); it should be a FAST tokenizer file") from e
        return cls.from_dict(data, source=path)


def _to_string(values: np.ndarray, min_token: int) -> str:
    return "".join(map(chr, (np.asarray(values, np.int64) - min_token).tolist()))
