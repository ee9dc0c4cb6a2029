"""π0, π0.5 and π0-FAST (Physical Intelligence): PaliGemma + a Gemma action expert sharing its attention, flow
matching (π0-FAST: PaliGemma decoding FAST action tokens).

Composition (every piece is a shared vlax module)::

    per camera: uint8 frames -> [-1, 1] -> SigLIP ViT (no pooling) -> linear to the LM width   [B, n_img, D]
                (a camera whose ``image_masks`` entry is False contributes masked-out tokens)
    language:   Gemma token embeddings * sqrt(D) (π0.5: the prompt also holds the discretized state)
    prefix = [images | language], bidirectional; Gemma over the prefix -> per-layer KV cache
    head (model.head, default ``flow`` / ``flow_pi05``): a Gemma expert whose layer l attends jointly to prefix
    layer l's keys/values and to its own tokens;
      π0:   [state token | H action tokens], time mixed into every action token by an MLP;
      π0.5: H action tokens, time through adaptive RMSNorm (scale, shift, gate) in every expert norm.
    training: t ~ Beta(1.5, 1) * 0.999 + 0.001, x_t = t noise + (1 - t) a, target noise - a; sampling: Euler
    steps from t = 1 to 0.
    π0-FAST (``model.preset='pi0_fast'``): no expert; the ``fast`` head decodes FAST tokens through Gemma's tied
    LM head with the KV cache. ``model.fast_layout='openpi'`` places them as openpi does (FAST id t at PaliGemma id
    ``257151 - 128 - t``, targets ``Action: <FAST>|<eos>`` after a ``Task: ..., State: ...;\n`` prompt; needs
    PaliGemma's tokenizer as ``model.tokenizer``), ``'vlax'`` (default) as vlax's own FAST policies do (the
    vocabulary's last ids, an end marker of their own). See :mod:`vlax.heads.fast`. openpi feeds its FAST models
    every camera unmasked (a missing one as a black frame): its sampler's attention window assumes no masked
    prefix token, so do the same to match it.
    LoRA (``model.pi0.lora``): low-rank adapters on the Gemma LM's projections, for fine-tuning with the LM frozen.
    Knowledge insulation (``model.knowledge_insulation``, π0.5 with KI, Driess et al. 2025): the VLM is trained
    on FAST tokens of the chunk (cross-entropy through its LM head) while the flow loss reaches the expert only,
    the VLM's keys / values seen through ``stop_gradient``; sampling is the flow head's.

Observation: ``images {camera: [B, h, w, 3]}`` (uint8, or float in [0, 1]), optional ``image_masks {camera: [B]}``
(False: that example has no such camera), ``state [B, action_dim]`` (π0, normalized, zero-padded),
``text_ids [B, L]``, ``text_mask [B, L]``. Actions are ``[B, H, action_dim]`` (normalized, zero-padded).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.backbones import Transformer
from vlax.backbones.config import TransformerConfig
from vlax.encoders.vit import ViT, ViTConfig
from vlax.heads import get_head
from vlax.nn import Dense, HeadContext, RopeConfig, apply_lora
from vlax.policy import PolicySpec, head_context_spec
from vlax.presets import register

# Gemma's published sizes as openpi names them (width, depth, mlp_dim, num_heads, num_kv_heads, head_dim).
GEMMA_VARIANTS: dict[str, tuple[int, int, int, int, int, int]] = {
    "gemma_2b": (2048, 18, 16_384, 8, 1, 256),
    "gemma_300m": (1024, 18, 4096, 8, 1, 256),
    # the sizes of the openpi reference fixtures
    "tiny": (64, 2, 128, 4, 1, 16),
    "tiny_expert": (32, 2, 64, 4, 1, 16),
}
PALIGEMMA_VOCAB = 257_152


@dataclasses.dataclass(frozen=True)
class Pi0Sizes:
    """Everything that shapes a :class:`Pi0Policy` (read from ``model.pi0``)."""

    vision: ViTConfig
    llm: TransformerConfig
    expert_width: int
    expert_mlp_dim: int
    expert_heads: int
    pi05: bool
    num_steps: int = 10
    lora: tuple[int, float, str] | None = None  # (rank, alpha, target regex) of adapters on the Gemma LM


GEMMA_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")


def _gemma(variant: str | Mapping[str, Any]) -> tuple[int, ...]:
    """A variant name, or explicit sizes ``{width, depth, mlp_dim, num_heads, num_kv_heads, head_dim}``."""
    if isinstance(variant, Mapping):
        missing = [f for f in GEMMA_FIELDS if f not in variant]
        if missing:
            raise ValueError(f"explicit Gemma sizes {dict(variant)} lack {missing}")
        return tuple(int(variant[f]) for f in GEMMA_FIELDS)
    if variant not in GEMMA_VARIANTS:
        raise ValueError(f"unknown Gemma variant {variant!r} (model.pi0.paligemma_variant / action_expert_variant); "
                         f"known: {sorted(GEMMA_VARIANTS)}")
    return GEMMA_VARIANTS[variant]


def sizes_from_model(model: Mapping[str, Any], text_vocab_size: int = 0) -> Pi0Sizes:
    """:class:`Pi0Sizes` of ``model.pi0`` (the keys of ``experiments/configs/pi0.py``)."""
    if "pi0" not in model:
        raise ValueError("model.preset='pi0' / 'pi05' needs model.pi0 (paligemma_variant, action_expert_variant, "
                         "vision, vocab_size, pi05); start from experiments/configs/pi0.py")
    c = dict(model["pi0"])
    # explicit sizes (model.pi0.llm / model.pi0.expert) win over the variant names
    width, depth, mlp, heads, kv, head_dim = _gemma(c.get("llm") or c.get("paligemma_variant", "gemma_2b"))
    e_width, e_depth, e_mlp, e_heads, e_kv, e_head_dim = _gemma(c.get("expert")
                                                                or c.get("action_expert_variant", "gemma_300m"))
    if (e_depth, e_kv, e_head_dim) != (depth, kv, head_dim):
        raise ValueError(f"the action expert must share the LM's depth, KV heads and head size to share its "
                         f"attention; got expert {(e_depth, e_kv, e_head_dim)} vs LM {(depth, kv, head_dim)}")
    vocab = int(c.get("vocab_size", PALIGEMMA_VOCAB))
    if text_vocab_size > vocab:
        raise ValueError(f"the tokenizer has {text_vocab_size} ids but model.pi0.vocab_size is {vocab}; use "
                         "PaliGemma's tokenizer or raise the vocabulary")
    dtype = None if model.get("dtype") in (None, "float32") else jnp.dtype(model["dtype"])
    llm = TransformerConfig(vocab_size=vocab, width=width, depth=depth, mlp_dim=mlp, num_heads=heads,
                            num_kv_heads=kv, head_dim=head_dim, norm_eps=1e-6, act="gelu_tanh",
                            rope=RopeConfig(theta=10_000.0), embed_scale=True, tie_embeddings=True,
                            norm_unit_offset=True, remat=str(model.get("remat", "none")), dtype=dtype)
    v = dict(c.get("vision", {}))
    vision = ViTConfig.from_variant(v.get("variant", "So400m/14"), image_size=int(v.get("image_size", 224)),
                                    pool="none", act="gelu_tanh",
                                    dtype=None if dtype is None else str(dtype.name),
                                    **{k: int(v[k]) for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size")
                                       if k in v})
    return Pi0Sizes(vision=vision, llm=llm, expert_width=e_width, expert_mlp_dim=e_mlp, expert_heads=e_heads,
                    pi05=bool(c.get("pi05", False)), num_steps=int(c.get("num_steps", 10)), lora=_lora(c.get("lora")))


# Every projection of Gemma's layers, as openpi's gemma_2b_lora adapts its attention and MLP einsums.
LORA_TARGET = r"^layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)$"


def _lora(lora: Mapping[str, Any] | None) -> tuple[int, float, str] | None:
    """``model.pi0.lora``: ``{rank, alpha, target}`` (alpha defaults to the rank, target to every projection)."""
    if not lora or not int(dict(lora).get("rank", 0)):
        return None
    lora = dict(lora)
    unknown = sorted(set(lora) - {"rank", "alpha", "target"})
    if unknown:
        raise ValueError(f"model.pi0.lora has unknown keys {unknown}; it takes rank, alpha and target")
    rank = int(lora["rank"])
    return rank, float(lora.get("alpha") or rank), str(lora.get("target") or LORA_TARGET)


def to_signed_pixels(images: jax.Array) -> jax.Array:
    """uint8 frames -> float32 in [-1, 1] (``/ 255 * 2 - 1``, openpi's order of operations); float frames are
    taken to be in [0, 1]."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0 * 2.0 - 1.0
    return images.astype(jnp.float32) * 2.0 - 1.0


class Pi0Policy(nnx.Module):
    """π0 / π0.5 (see the module docstring); keeps :class:`vlax.policy.VLA`'s contract."""

    def __init__(self, spec: PolicySpec, sizes: Pi0Sizes, *, head_name: str | None = None,
                 head_kwargs: Mapping[str, Any] | None = None, insulation: Mapping[str, Any] | None = None,
                 rngs: nnx.Rngs):
        if spec.image_size != sizes.vision.image_size:
            raise ValueError(f"the policy spec has image_size={spec.image_size}; π0's SigLIP reads "
                             f"{sizes.vision.image_size}x{sizes.vision.image_size}: set model.image_size to it")
        self.spec, self.sizes = spec, sizes
        self.vision = ViT(sizes.vision, rngs=rngs)
        self.img_proj = Dense(sizes.vision.width, sizes.llm.width, axes=("embed", "embed"), rngs=rngs)
        self.backbone = Transformer(sizes.llm, rngs=rngs)
        if sizes.lora is not None:
            # adapters beside the LM's frozen projections (freeze them with optim.freeze, see configs/pi0.py)
            rank, alpha, target = sizes.lora
            apply_lora(self.backbone, rank=rank, alpha=alpha, target=target, rngs=rngs)
        head_name = head_name or ("flow_pi05" if sizes.pi05 else "flow")
        kwargs = dict(head_kwargs or {})
        if head_name in ("flow", "flow_pi05"):
            # π0 embeds the state in the expert's suffix; π0.5 reads it from the prompt (discretized).
            state_dim = None if head_name == "flow_pi05" or spec.state_input != "head" else spec.state_dim
            kwargs = {**dict(width=sizes.expert_width, mlp_dim=sizes.expert_mlp_dim, num_heads=sizes.expert_heads,
                             state_dim=state_dim, rope=sizes.llm.rope, num_steps=sizes.num_steps,
                             accumulate_time=True), **kwargs}
        self.head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon,
                             context=head_context_spec(sizes.llm), rngs=rngs, **kwargs)
        # Knowledge insulation: a FAST head on the VLM beside the flow head (it has no parameters of its own)
        kwargs = dict(insulation or {})
        self.fast_weight = float(kwargs.pop("fast_weight", 1.0)) if kwargs else 0.0
        self.fast_head = get_head("fast", action_dim=spec.action_dim, horizon=spec.horizon,
                                  context=head_context_spec(sizes.llm), rngs=rngs, **kwargs) if kwargs else None

    def embed_images(self, obs: Mapping[str, Any]) -> tuple[list[jax.Array], list[jax.Array]]:
        """Per camera: tokens ``[B, n_img, D]`` and their mask ``[B, n_img]`` (False for a masked camera)."""
        images = obs["images"]
        masks = dict(obs.get("image_masks") or {})
        missing = [c for c in self.spec.cameras if c not in images]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}; it has {sorted(images)} (a camera an example "
                           "does not have is passed as any frame with image_masks[camera] = False)")
        tokens, token_masks = [], []
        for camera in self.spec.cameras:
            x = self.img_proj(self.vision(to_signed_pixels(images[camera])).tokens)
            m = jnp.asarray(masks.get(camera, jnp.ones(x.shape[0], bool)), bool)
            if m.shape != (x.shape[0],):
                raise ValueError(f"image_masks[{camera!r}] has shape {tuple(m.shape)}; expected [{x.shape[0]}]")
            tokens.append(x)
            token_masks.append(jnp.broadcast_to(m[:, None], x.shape[:2]))
        return tokens, token_masks

    def embed_prefix(self, obs: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(embeds [B, N, D], input_mask [B, N], ar_mask [N])``: images then language, all bidirectional."""
        parts, masks = self.embed_images(obs)
        parts.append(self.backbone.embed_tokens(jnp.asarray(obs["text_ids"])).astype(parts[0].dtype))
        masks.append(jnp.asarray(obs["text_mask"], bool))
        embeds = jnp.concatenate(parts, 1)
        return embeds, jnp.concatenate(masks, 1), jnp.zeros(embeds.shape[1], jnp.int32)

    def context(self, obs: Mapping[str, Any]) -> HeadContext:
        embeds, mask, ar = self.embed_prefix(obs)
        slots = getattr(self.head, "cache_slots", None)
        if self.fast_head is not None:
            slots = max(int(slots or 0), self.fast_head.cache_slots)
        cache_size = None if slots is None else embeds.shape[1] + int(slots)
        out = self.backbone(embeds=embeds, input_mask=mask, ar_mask=ar, cache_size=cache_size)
        state = None
        if self.spec.state_input == "head":
            state = jnp.asarray(obs["state"], out.hidden.dtype)
            if state.ndim != 2 or state.shape[-1] != self.spec.state_dim:
                raise ValueError(f"state has shape {tuple(state.shape)}; π0 takes [B, {self.spec.state_dim}] "
                                 "(normalized, zero-padded to the action dimension)")
        return HeadContext(tokens=out.hidden, mask=mask, cache=out.cache, state=state)

    def loss(self, obs: Mapping[str, Any], actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
        """Training loss on normalized, padded ``actions [B, H, A]``.

        With knowledge insulation (``model.knowledge_insulation``): ``flow + fast_weight * FAST cross-entropy``,
        the flow head reading the VLM's keys / values through ``stop_gradient`` (its loss trains the expert only;
        the VLM learns from the FAST tokens), metrics ``flow_loss`` and ``fast_loss`` beside ``loss``.
        """
        ctx = self.context(obs)
        if self.fast_head is None:
            return self.head.loss(ctx, actions, action_mask=action_mask, rngs=rngs, train=train, lm=self.backbone)
        insulated = ctx.replace(tokens=jax.lax.stop_gradient(ctx.tokens), cache=jax.lax.stop_gradient(ctx.cache))
        flow, _ = self.head.loss(insulated, actions, action_mask=action_mask, rngs=rngs, train=train,
                                 lm=self.backbone)
        fast, fast_metrics = self.fast_head.loss(ctx, actions, action_mask=action_mask, rngs=rngs, train=train,
                                                 lm=self.backbone)
        loss = flow + self.fast_weight * fast
        return loss, {"loss": loss, "flow_loss": flow, "fast_loss": fast, "fast_accuracy": fast_metrics["accuracy"]}

    def flow_loss(self, obs: Mapping[str, Any], actions: jax.Array, noise: jax.Array, time: jax.Array) -> jax.Array:
        """openpi's ``compute_loss`` for given draws: ``noise [B, H, A]``, ``time [B]`` -> per-step loss ``[B, H]``."""
        head = self.head
        ctx = self.context(obs)
        t = jnp.asarray(time, jnp.float32)
        x_t = t[:, None, None] * noise + (1.0 - t[:, None, None]) * actions
        v_t = head.velocity(head.expert.prepare(ctx.cache), head._state(ctx), x_t, t)
        return jnp.mean(jnp.square(v_t.astype(jnp.float32) - (noise - actions)), axis=-1)

    def sample(self, obs: Mapping[str, Any], *, rngs: jax.Array, num_steps: int | None = None,
               noise: jax.Array | None = None) -> jax.Array:
        """Normalized actions ``[B, H, A]``; ``noise [B, H, A]`` fixes the flow's start."""
        kwargs = {} if noise is None else {"noise": jnp.asarray(noise)}
        return self.head.sample(self.context(obs), rngs=rngs, num_steps=num_steps, lm=self.backbone, **kwargs)


def _build(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs,
           pi05: bool, default: str | None = None) -> Pi0Policy:
    sizes = sizes_from_model(model, text_vocab_size)
    if sizes.pi05 != pi05:
        raise ValueError(f"model.preset={model.get('preset')!r} but model.pi0.pi05={sizes.pi05}; make them agree")
    default = default or ("flow_pi05" if pi05 else "flow")
    head_name = model.get("head") or default
    head_kwargs = {**dict(dict(model.get("head_defaults", {})).get(head_name, {})),
                   **dict(model.get("head_kwargs", {}))}
    if head_name == "fast":
        head_kwargs = fast_head_kwargs(model, spec, head_kwargs)
    return Pi0Policy(spec, sizes, head_name=head_name, head_kwargs=head_kwargs,
                     insulation=_insulation(model, spec, head_name), rngs=rngs)


def _insulation(model: Mapping[str, Any], spec: PolicySpec, head_name: str) -> dict[str, Any] | None:
    """``model.knowledge_insulation``: ``{tokenizer, fast_weight, <other fast head kwargs>}``; off without a
    tokenizer. The FAST layout is ``model.fast_layout`` (default ``'vlax'``: the tokens follow π0.5's prompt,
    which already ends in ``Action: ``)."""
    ki = {k: v for k, v in dict(model.get("knowledge_insulation") or {}).items() if v is not None}
    if not ki.get("tokenizer"):
        return None
    if head_name not in ("flow", "flow_pi05"):
        raise ValueError(f"model.knowledge_insulation co-trains FAST tokens beside a flow head; model.head is "
                         f"{head_name!r}")
    weight = float(ki.pop("fast_weight", 1.0))
    return {**fast_head_kwargs(model, spec, ki), "fast_weight": weight}


FAST_LAYOUTS = ("vlax", "openpi")
TEXT_TOKENIZER_KINDS = ("byte", "word")  # model.tokenizer values that are no file: no PaliGemma tokenizer


def fast_layout(model: Mapping[str, Any], default: str = "vlax") -> str:
    """``model.fast_layout`` (or ``head_kwargs.layout``; they must agree), else ``default``."""
    given = model.get("fast_layout") or None
    kwarg = dict(model.get("head_kwargs", {})).get("layout")
    if given and kwarg and given != kwarg:
        raise ValueError(f"model.fast_layout={given!r} but model.head_kwargs.layout={kwarg!r}; set one of them")
    layout = str(given or kwarg or default)
    if layout not in FAST_LAYOUTS:
        raise ValueError(f"model.fast_layout={layout!r} is unknown; known: {list(FAST_LAYOUTS)}")
    return layout


def fast_text_tokenizer(model: Mapping[str, Any], given: Any = None) -> Any:
    """The text tokenizer the ``'openpi'`` FAST layout reads ``Action: ``, ``|`` and EOS from: ``given`` (an object
    or a path), else the file ``model.tokenizer`` names; None when neither is a tokenizer file."""
    from vlax.tokenizers import load_tokenizer

    source = given if given is not None else model.get("tokenizer")
    if source is None or (isinstance(source, str) and source in TEXT_TOKENIZER_KINDS):
        return None
    return load_tokenizer(source) if isinstance(source, (str, os.PathLike)) else source


def fast_head_kwargs(model: Mapping[str, Any], spec: PolicySpec, head_kwargs: Mapping[str, Any], *,
                     layout: str | None = None) -> dict[str, Any]:
    """The ``fast`` head's kwargs with its tokenizers resolved: a FAST tokenizer path (a vlax json file or a
    Hugging Face FAST processor directory) loads for the spec's chunk shape; the ``'openpi'`` layout adds the text
    tokenizer (:func:`fast_text_tokenizer`)."""
    from vlax.action_tokens import FastTokenizer

    kwargs = dict(head_kwargs)
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        raise ValueError("model.head='fast' needs model.head_kwargs.tokenizer: the path of a FAST tokenizer file "
                         "(experiments/fit_fast_tokenizer.py writes one) or of a Hugging Face FAST processor "
                         "directory (openpi's physical-intelligence/fast)")
    if isinstance(tokenizer, (str, os.PathLike)):
        kwargs["tokenizer"] = FastTokenizer.load(os.fspath(tokenizer), action_horizon=spec.horizon,
                                                 action_dim=spec.action_dim)
    kwargs["layout"] = layout = layout or fast_layout(model)
    if layout == "openpi":
        text = fast_text_tokenizer(model, kwargs.get("text_tokenizer"))
        if text is None:
            raise ValueError(f"model.fast_layout='openpi' needs PaliGemma's text tokenizer: set model.tokenizer to "
                             f"its tokenizer.model path (got model.tokenizer={model.get('tokenizer')!r})")
        kwargs["text_tokenizer"] = text
    return kwargs


@register("pi0")
def build_pi0(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> Pi0Policy:
    """``model.preset='pi0'``; ``model.head`` swaps the action head (default ``flow``)."""
    return _build(model, spec, text_vocab_size, rngs, pi05=False)


@register("pi05")
def build_pi05(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> Pi0Policy:
    """``model.preset='pi05'``; ``model.head`` swaps the action head (default ``flow_pi05``)."""
    return _build(model, spec, text_vocab_size, rngs, pi05=True)


@register("pi0_fast")
def build_pi0_fast(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> Pi0Policy:
    """``model.preset='pi0_fast'``: PaliGemma with the ``fast`` head (FAST tokens through Gemma's tied LM head;
    ``model.head_kwargs.tokenizer``: a FAST tokenizer file or processor directory; ``model.fast_layout``: where
    the tokens sit, ``'vlax'`` or openpi's ``'openpi'``). No action expert."""
    return _build(model, spec, text_vocab_size, rngs, pi05=False, default="fast")
