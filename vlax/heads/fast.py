"""π0-FAST-style action head: FAST tokens decoded autoregressively through the backbone's LM head.

A chunk ``[H, A]`` becomes a variable-length sequence of FAST token ids (DCT + BPE, see
:mod:`vlax.action_tokens.fast`), placed in the backbone's vocabulary in one of two layouts (``layout``):

``"vlax"`` (default, for policies vlax trains from its own fitted tokenizer on any backbone): like RT-2 /
OpenVLA's binned tokens the FAST ids take the LAST ids of the vocabulary, counted from the end: FAST id ``t`` is
vocabulary id ``vocab_size - 1 - t`` and the end marker is ``vocab_size - 1 - n`` for a tokenizer of ``n`` ids, so
``n + 1`` ids are reserved (``vlax.build.backbone_vocab_size`` adds them to the text vocabulary). The targets are
``[FAST ids, end]``; sampling may be restricted to the reserved ids.

``"openpi"`` (openpi's π0-FAST, the layout its released checkpoints were trained with; PaliGemma's text tokenizer
needed): FAST id ``t`` is vocabulary id ``text_vocab - 1 - 128 - t`` (the last 128 PaliGemma ids, its ``<seg>``
tokens, are skipped), and the targets are the postfix openpi appends after ``Task: ..., State: ...;\\n``:
``ids("Action: ") + FAST ids + ids("|") + [EOS]``, every one of them in the loss (openpi's loss mask is the postfix),
the cross-entropy averaged per example then over the batch as openpi's ``compute_loss`` does. Sampling is greedy
over the whole vocabulary for ``max_decoding_steps`` ids (openpi: 256), each generated token one RoPE position
further than training placed it (openpi's ``sample_actions`` feeds step ``k`` at ``prefix_len + k + 1``, its
``compute_loss`` at ``prefix_len + k``), and the ids are read back as openpi's
``extract_actions`` does: cut at the first EOS (what a batch of one leaves), decoded to text, the part between the
first ``"Action: "`` and the next ``"|"`` stripped and re-encoded, mapped back to FAST ids and FAST-decoded.

* ``loss``: next-token cross-entropy over the whole vocabulary with teacher forcing, the prefix's KV cache
  extended by the targets; padding after the targets is masked out.
* ``sample``: greedy decoding, then FAST-decoded to ``[B, H, A]``. A sequence that cannot be decoded (no
  ``"Action: "``, ids outside the FAST vocabulary, the wrong number of coefficients) becomes zeros;
  :meth:`FastHead.sample_with_validity` returns the per-example flag and the tokenizer counts them.

BPE and text tokenizers cannot run under ``jit``, so the head receives fitted tokenizer objects and calls them on
the host through ``jax.pure_callback``. FAST tokenizer: ``vocab_size``, ``action_shape``, ``max_tokens``,
``encode(chunks [B, H, A]) -> B id lists``, ``encode_padded(chunks, length) -> (ids int32 [B, length], lengths
int32 [B])`` and ``decode(id lists) / decode_padded(ids [B, T], lengths [B]) -> (chunks float32 [B, H, A], valid
bool [B])`` (:class:`vlax.action_tokens.FastTokenizer` and the released-processor
:class:`~vlax.action_tokens.fast_universal.UniversalFastTokenizer` are two). Text tokenizer (``"openpi"``):
``vocab_size``, ``eos_id``, ``encode(text, add_special_tokens=False)`` and ``decode(ids)``
(:class:`vlax.tokenizers.SentencePieceTokenizer` on PaliGemma's ``tokenizer.model`` is one).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.nn import ContextSpec, HeadContext, LanguageModel
from vlax.nn.head_base import ActionHead, RngLike, masked_mean, split_rngs
from vlax.nn.lm_decoding import (autoregressive_decode, check_decode_room, teacher_forced_logits,
                                 token_cross_entropy)

TOKENIZER_API = ("vocab_size", "action_shape", "max_tokens", "encode", "encode_padded", "decode", "decode_padded")
TEXT_TOKENIZER_API = ("vocab_size", "eos_id", "encode", "decode")
LAYOUTS = ("vlax", "openpi")
OPENPI_SKIP_TOKENS = 128  # PaliGemma's 128 <seg> tokens close its vocabulary; openpi keeps FAST ids off them
OPENPI_DECODING_STEPS = 256  # openpi's sample_actions default
ACTION_PREFIX, ACTION_END = "Action: ", "|"


class _Host:
    """Holds the tokenizers as static data: nnx does not walk into them, and equal heads share one graph
    definition."""

    def __init__(self, tokenizer: Any, text: Any = None):
        self.tokenizer, self.text = tokenizer, text

    def __eq__(self, other):
        return isinstance(other, _Host) and other.tokenizer is self.tokenizer and other.text is self.text

    def __hash__(self):
        return hash((id(self.tokenizer), id(self.text)))


def _bind_shape(tokenizer: Any, shape: tuple[int, int]) -> Any:
    """A processor that records no chunk shape (openpi's universal one) takes the head's."""
    if getattr(tokenizer, "action_shape", ()) is None and hasattr(tokenizer, "with_shape"):
        return tokenizer.with_shape(*shape)
    return tokenizer


class FastHead(ActionHead):
    """Cross-entropy over FAST tokens in the backbone's vocabulary; greedy autoregressive decoding.

    Args:
      action_dim, horizon: actions are ``[B, horizon, action_dim]`` (the tokenizer's ``action_shape``).
      context: :class:`vlax.nn.ContextSpec` with ``vocab_size`` (the backbone's, reserved ids included).
      tokenizer: a fitted FAST tokenizer (see the module docstring for the methods used).
      max_tokens: most FAST tokens per chunk (default: the tokenizer's bound).
      constrain_to_action_tokens: ``"vlax"`` layout only: sampling picks among the reserved ids (default; else
        the whole vocabulary, a text id then making the sequence invalid).
      layout: ``"vlax"`` or ``"openpi"`` (see the module docstring).
      text_tokenizer: ``"openpi"``: the backbone's text tokenizer (PaliGemma's), for ``"Action: "``, ``"|"``, EOS
        and reading decoded ids back.
      skip_tokens: ``"openpi"``: ids left free at the end of the text vocabulary (openpi: 128).
      max_decoding_steps: ``"openpi"``: ids decoded when sampling, also the targets' length (default
        ``len(ids("Action: ")) + max_tokens + len(ids("|")) + 1``; openpi's models: 256). ``"vlax"`` decodes
        ``max_tokens + 1``. Either needs that many KV-cache slots minus one.
      decode_position_offset: RoPE positions the generated tokens are shifted by (``"openpi"``: 1, where openpi's
        sampler puts them; ``"vlax"``: 0, where training saw them).
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, tokenizer: Any = None,
                 max_tokens: int | None = None, constrain_to_action_tokens: bool | None = None,
                 layout: str = "vlax", text_tokenizer: Any = None, skip_tokens: int = OPENPI_SKIP_TOKENS,
                 max_decoding_steps: int | None = None, decode_position_offset: int | None = None,
                 rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        self.context.require("vocab_size", why="the FAST head")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown FAST layout {layout!r} (model.fast_layout); known: {list(LAYOUTS)}")
        if tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("the FAST head needs a fitted tokenizer object (tokenizer=FastTokenizer.load(path)); "
                             "through build_policy, set model.head_kwargs.tokenizer to the file's path")
        tokenizer = _bind_shape(tokenizer, self.action_shape)
        missing = [name for name in TOKENIZER_API if not hasattr(tokenizer, name)]
        if missing:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} lacks {missing}; pass a FastTokenizer")
        if tuple(tokenizer.action_shape) != self.action_shape:
            raise ValueError(f"the tokenizer encodes chunks {tuple(tokenizer.action_shape)} but the head's actions "
                             f"are {self.action_shape} (horizon, action_dim); fit a tokenizer for this shape")
        self.layout = layout
        self.num_action_ids = int(tokenizer.vocab_size)
        self.max_tokens = int(max_tokens or tokenizer.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        vocab = self.context.vocab_size
        if layout == "vlax":
            if text_tokenizer is not None or max_decoding_steps is not None:
                raise ValueError("text_tokenizer and max_decoding_steps belong to the 'openpi' FAST layout; set "
                                 "model.fast_layout='openpi' or drop them")
            if self.num_action_ids + 1 > vocab:
                raise ValueError(f"{self.num_action_ids} FAST ids + 1 end marker do not fit a vocabulary of {vocab} "
                                 f"ids; the backbone needs vocab_size >= {self.num_action_ids + 1}")
            self.constrain = True if constrain_to_action_tokens is None else bool(constrain_to_action_tokens)
            self.prefix_ids, self.end_ids = (), ()
            self.length = self.max_tokens + 1
            self.position_offset = int(decode_position_offset or 0)
        else:
            self._init_openpi(text_tokenizer, skip_tokens, max_decoding_steps, constrain_to_action_tokens)
            self.position_offset = 1 if decode_position_offset is None else int(decode_position_offset)
        self.host = _Host(tokenizer, text_tokenizer)

    def _init_openpi(self, text: Any, skip: int, steps: int | None, constrain: bool | None) -> None:
        if text is None or isinstance(text, str):
            raise ValueError("the 'openpi' FAST layout needs the backbone's text tokenizer object (PaliGemma's "
                             "tokenizer.model, text_tokenizer=load_tokenizer(path)); through the pi0_fast preset, "
                             "set model.tokenizer to its path")
        missing = [name for name in TEXT_TOKENIZER_API if getattr(text, name, None) is None]
        if missing:
            raise ValueError(f"text tokenizer {type(text).__name__} lacks {missing}; the 'openpi' FAST layout needs "
                             "PaliGemma's SentencePiece tokenizer (vlax.tokenizers.SentencePieceTokenizer)")
        if constrain:
            raise ValueError("the 'openpi' FAST layout samples over the whole vocabulary (its 'Action: ' and '|' are "
                             "text tokens); drop constrain_to_action_tokens")
        self.constrain = False
        text_vocab, vocab = int(text.vocab_size), self.context.vocab_size
        self.fast_base = text_vocab - 1 - int(skip)  # vocabulary id of FAST id 0; FAST id t is fast_base - t
        if text_vocab > vocab or self.fast_base - (self.num_action_ids - 1) < 0:
            raise ValueError(f"{self.num_action_ids} FAST ids below the last {skip} of a {text_vocab}-id text "
                             f"vocabulary do not fit a backbone of {vocab} ids; the 'openpi' layout needs "
                             f"text vocab >= {self.num_action_ids + skip + 1} and backbone vocab >= text vocab")
        self.prefix_ids = tuple(int(i) for i in text.encode(ACTION_PREFIX, add_special_tokens=False))
        self.end_ids = tuple(int(i) for i in text.encode(ACTION_END, add_special_tokens=False)) + (int(text.eos_id),)
        fixed = len(self.prefix_ids) + len(self.end_ids)
        self.length = int(steps or fixed + self.max_tokens)
        if self.length <= fixed:
            raise ValueError(f"max_decoding_steps={steps} leaves no room for FAST tokens after the {fixed} ids of "
                             f"'Action: ', '|' and EOS; use more than {fixed} (openpi: {OPENPI_DECODING_STEPS})")

    @property
    def tokenizer(self) -> Any:
        return self.host.tokenizer

    @property
    def text_tokenizer(self) -> Any:
        return self.host.text

    @property
    def end_id(self) -> int:
        """Vocabulary id of the end marker (``"vlax"``) or EOS (``"openpi"``)."""
        if self.layout == "openpi":
            return self.end_ids[-1]
        return self.context.vocab_size - 1 - self.num_action_ids

    @property
    def cache_slots(self) -> int:
        return self.length - 1  # every decoded id but the last is fed back

    # ---- ids ---------------------------------------------------------------------------------------------------
    def to_vocab(self, fast: np.ndarray | jax.Array) -> Any:
        """FAST ids -> vocabulary ids (either layout; numpy or jax)."""
        if self.layout == "openpi":
            return self.fast_base - fast
        return self.context.vocab_size - 1 - fast

    def encode_targets(self, actions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Vocabulary targets ``[B, T]`` and per-example lengths ``[B]`` of normalized actions ``[B, H, A]``.

        ``"vlax"``: ``T = max_tokens + 1``, FAST ids then end-marker padding; the length counts the FAST ids (the
        loss takes one more, the end marker). ``"openpi"``: ``T = max_decoding_steps``, openpi's postfix
        (``Action: ``, FAST ids, ``|``, EOS) then zeros; the length counts the whole postfix, all of it in the
        loss (a postfix longer than ``T`` is cut there, as openpi cuts at ``max_token_len``).
        """
        b = actions.shape[0]
        width = self.max_tokens if self.layout == "vlax" else self.length  # vlax: the end marker is added below
        shapes = (jax.ShapeDtypeStruct((b, width), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
        tokenizer, actions = self.tokenizer, jax.lax.stop_gradient(actions)
        if self.layout == "vlax":
            def host(chunks):
                return tokenizer.encode_padded(np.asarray(chunks), self.max_tokens)

            fast, lengths = jax.pure_callback(host, shapes, actions, vmap_method="sequential")
            fast = jnp.pad(fast, ((0, 0), (0, 1)))
            position = jnp.arange(self.length)[None]
            return jnp.where(position < lengths[:, None], self.to_vocab(fast), self.end_id), lengths

        def host_openpi(chunks):
            ids = np.zeros((len(chunks), self.length), np.int32)
            lengths = np.zeros(len(chunks), np.int32)
            for i, seq in enumerate(tokenizer.encode(np.asarray(chunks))):
                row = [*self.prefix_ids, *self.to_vocab(np.asarray(seq, np.int64)).tolist(), *self.end_ids]
                if len(row) > self.length:
                    if hasattr(tokenizer, "stats"):
                        tokenizer.stats.truncated += 1
                    warnings.warn(f"a chunk's postfix took {len(row)} ids, more than the {self.length} decoded; it is "
                                  "cut (raise max_decoding_steps)", stacklevel=2)
                    row = row[:self.length]
                ids[i, :len(row)], lengths[i] = row, len(row)
            return ids, lengths

        return jax.pure_callback(host_openpi, shapes, actions, vmap_method="sequential")

    def _extract_openpi(self, row: np.ndarray) -> list[int] | None:
        """openpi's ``extract_actions`` up to the FAST decode: the FAST ids of one decoded row, None when there
        are none to read (no ``"Action: "``, an id outside the text vocabulary)."""
        text = self.text_tokenizer
        row = [int(t) for t in row]
        if self.end_id in row:
            row = row[:row.index(self.end_id)]
        if any(t < 0 or t >= int(text.vocab_size) for t in row):
            return None
        decoded = text.decode(row)
        if ACTION_PREFIX not in decoded:
            return None
        inner = decoded.split(ACTION_PREFIX)[1].split(ACTION_END)[0].strip()
        return [self.fast_base - int(t) for t in text.encode(inner, add_special_tokens=False)]

    def decode_tokens(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(actions float32 [B, H, A], valid bool [B])`` of vocabulary ids ``[B, T]``: cut at the first end
        marker (``"vlax"``; all ``T`` ids when there is none), or read as openpi does (``"openpi"``)."""
        b, t = tokens.shape
        shapes = (jax.ShapeDtypeStruct((b, *self.action_shape), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.bool_))
        tokenizer = self.tokenizer
        if self.layout == "openpi":
            def host_openpi(ids):
                seqs = [self._extract_openpi(row) for row in np.asarray(ids)]
                chunks, valid = tokenizer.decode([s or [] for s in seqs])
                chunks, valid = np.asarray(chunks, np.float32), np.asarray(valid, bool)
                found = np.array([s is not None for s in seqs])
                return np.where(found[:, None, None], chunks, 0.0).astype(np.float32), valid & found

            return jax.pure_callback(host_openpi, shapes, tokens, vmap_method="sequential")

        is_end = tokens == self.end_id
        lengths = jnp.where(is_end.any(axis=1), jnp.argmax(is_end, axis=1), t).astype(jnp.int32)
        fast = self.to_vocab(tokens).astype(jnp.int32)  # a text id lands outside [0, n)

        def host(ids, n):
            chunks, valid = tokenizer.decode_padded(np.asarray(ids), np.asarray(n))
            return chunks.astype(np.float32), valid.astype(bool)

        return jax.pure_callback(host, shapes, fast, lengths, vmap_method="sequential")

    # ---- contract ----------------------------------------------------------------------------------------------
    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike | None = None, train: bool = True, lm: LanguageModel | None = None
             ) -> tuple[jax.Array, dict]:
        """Cross-entropy of the targets (see :meth:`encode_targets`); metrics ``accuracy`` (teacher-forced argmax)
        and ``tokens`` (mean FAST tokens per chunk)."""
        self.check_context(ctx)
        actions, mask = self.prepare_actions(actions, action_mask)
        check_decode_room(ctx, lm, self.cache_slots, "the FAST head")
        # The DCT mixes every time step into every coefficient, so masked entries cannot leave the loss; they are
        # tokenized as zeros (the normalized mean) instead of whatever padding the data holds.
        actions = jnp.where(mask, actions, 0.0)
        targets, lengths = self.encode_targets(actions)
        logits = teacher_forced_logits(ctx, lm, targets)
        position = jnp.arange(targets.shape[1])[None]
        ce = token_cross_entropy(logits, targets)
        if self.layout == "openpi":
            weight = position < lengths[:, None]  # the whole postfix
            per_example = jnp.sum(ce * weight, 1) / jnp.maximum(jnp.sum(weight, 1), 1)  # openpi's compute_loss
            loss = jnp.mean(per_example)
            fast_tokens = jnp.maximum(lengths - len(self.prefix_ids) - len(self.end_ids), 0)
        else:
            weight = position <= lengths[:, None]  # FAST tokens and the end marker
            loss, fast_tokens = masked_mean(ce, weight), lengths
        hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        metrics = {"loss": loss, "accuracy": masked_mean(hit, weight),
                   "tokens": jnp.mean(fast_tokens.astype(jnp.float32))}
        return loss, metrics

    def sample_tokens(self, ctx: HeadContext, *, lm: LanguageModel | None, rngs: RngLike | None = None
                      ) -> jax.Array:
        """Greedy vocabulary ids ``[B, T]`` (``T``: ``max_tokens + 1`` or ``max_decoding_steps``)."""
        self.check_context(ctx)
        check_decode_room(ctx, lm, self.cache_slots, "the FAST head")
        vocab, reserved = self.context.vocab_size, self.num_action_ids + 1

        def choose(logits, _key):
            if self.constrain:  # index k of the reversed tail is vocabulary id vocab - 1 - k
                return (vocab - 1 - jnp.argmax(logits[..., vocab - reserved:][..., ::-1], axis=-1)).astype(jnp.int32)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)

        if self.position_offset:
            ctx = ctx.replace(cache=ctx.cache.replace(next_position=ctx.cache.next_position + self.position_offset))
        key = split_rngs(rngs)[0] if rngs is not None else jax.random.key(0)  # greedy: the key is not read
        return autoregressive_decode(ctx, lm, self.length, choose, key)

    def sample_with_validity(self, ctx: HeadContext, *, rngs: RngLike | None = None,
                             lm: LanguageModel | None = None) -> tuple[jax.Array, jax.Array]:
        """``(actions [B, H, A], valid [B])``: invalid sequences decode to zeros with ``valid`` False."""
        return self.decode_tokens(self.sample_tokens(ctx, lm=lm, rngs=rngs))

    def sample(self, ctx: HeadContext, *, rngs: RngLike, num_steps: int | None = None,
               lm: LanguageModel | None = None) -> jax.Array:
        """Actions ``[B, H, A]`` (normalized), greedily decoded; ``num_steps`` is not used."""
        return self.sample_with_validity(ctx, rngs=rngs, lm=lm)[0]
