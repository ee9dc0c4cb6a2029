"""OpenVLA-OFT+'s FiLM language conditioning (``model.film=True``) in the OpenVLA preset.

Reference: openvla-oft's ``prismatic/models/film_vit_wrapper.py`` (``FiLMedVisionTransformerBlock``,
``FiLMedPrismaticVisionBackbone``) and the language embedding of ``modeling_prismatic.py``:

    gamma = scale(mean_e), beta = shift(mean_e)          nn.Linear(D_llm, D_tower) each, in every block of both towers
    x = x + ls1(attn(norm1(x)))
    x = x * (1 + gamma) + beta                            between the attention and the MLP residuals
    x = x + ls2(mlp(norm2(x)))

``mean_e``: the mean LLM input embedding over the non-action positions. The block is checked against a numpy
float64 transcription of those equations on timm's tensor layout (no torch/timm code is imported), the rest on
the tiny OFT preset at 32 wide (2 x 2 patch grid, 14 action slots); the importer on an OFT+-layout vision-backbone
file written from the tiny reference checkpoint.
"""

import math
import shutil
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.openvla import get_config
from vlax.encoders.vit import EncoderBlock, ViT
from vlax.nn.film import FiLM
from vlax.policy import PolicySpec
from vlax.presets.openvla import build_openvla, sizes_from_model, timm_dinov2_reg, timm_siglip
from vlax.weights.common import CheckpointError, assign_params, param_shapes
from vlax.weights.openvla import load_openvla, unused_tensor_names

FIXTURE = Path(__file__).parent / "fixtures" / "openvla"
IMAGE, HORIZON, WIDTH = 28, 2, 32


# ----------------------------------------------------------------------------- one block against OFT's equations


def np_layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu(x):  # torch nn.GELU(): the exact erf form (timm's default act of both towers)
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    """timm ``Attention``: fused ``qkv`` [3D, D] (q, k, v rows), softmax(q k^T / sqrt(d_h)) v, ``proj``."""
    b, t, d = x.shape
    qkv = (x @ qkv_w.T + qkv_b).reshape(b, t, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return out @ proj_w.T + proj_b


def np_filmed_block(x, lang, t, heads, film_after="attn"):
    """OFT's ``FiLMedVisionTransformerBlock.forward`` on timm-layout tensors ``t`` (torch [out, in] weights);
    ``film_after="mlp"`` is the wrong placement, to show the comparison would see it."""
    gamma = lang @ t["scale.weight"].T + t["scale.bias"]
    beta = lang @ t["shift.weight"].T + t["shift.bias"]
    film = lambda h: h * (1 + gamma[:, None, :]) + beta[:, None, :]  # noqa: E731
    ls1, ls2 = t.get("ls1.scale_factor", 1.0), t.get("ls2.scale_factor", 1.0)
    h = np_layer_norm(x, t["norm1.weight"], t["norm1.bias"])
    x = x + ls1 * np_attention(h, t["attn.qkv.weight"], t["attn.qkv.bias"], t["attn.proj.weight"],
                               t["attn.proj.bias"], heads)
    if film_after == "attn":
        x = film(x)
    h = np_layer_norm(x, t["norm2.weight"], t["norm2.bias"])
    x = x + ls2 * (np_gelu(h @ t["mlp.fc1.weight"].T + t["mlp.fc1.bias"]) @ t["mlp.fc2.weight"].T + t["mlp.fc2.bias"])
    return film(x) if film_after == "mlp" else x


def timm_tensors(block: EncoderBlock) -> dict[str, np.ndarray]:
    """The block's parameters in timm / OFT names and torch layout (float64)."""
    p = {".".join(map(str, k)): np.asarray(v.get_value(), np.float64)
         for k, v in nnx.to_flat_state(nnx.state(block, nnx.Param))}
    a = "self_attn."
    t = {"norm1.weight": p["layer_norm1.scale"], "norm1.bias": p["layer_norm1.bias"],
         "norm2.weight": p["layer_norm2.scale"], "norm2.bias": p["layer_norm2.bias"],
         "attn.qkv.weight": np.concatenate([p[a + f"{n}_proj.kernel"].T for n in "qkv"]),
         "attn.qkv.bias": np.concatenate([p[a + f"{n}_proj.bias"] for n in "qkv"]),
         "attn.proj.weight": p[a + "o_proj.kernel"].T, "attn.proj.bias": p[a + "o_proj.bias"]}
    for name in ("fc1", "fc2"):
        t[f"mlp.{name}.weight"], t[f"mlp.{name}.bias"] = p[f"mlp.{name}.kernel"].T, p[f"mlp.{name}.bias"]
    for name in ("scale", "shift"):
        t[f"{name}.weight"], t[f"{name}.bias"] = p[f"film.{name}.kernel"].T, p[f"film.{name}.bias"]
    for i in (1, 2):
        if f"layer_scale{i}.lambda1" in p:
            t[f"ls{i}.scale_factor"] = p[f"layer_scale{i}.lambda1"]
    return t


@pytest.mark.parametrize("tower", ["dinov2", "siglip"])
def test_filmed_block_matches_oft_equations(tower):
    """Random (non-trivial) weights everywhere, FiLM included: vlax's block = OFT's equations within 1e-5; FiLM
    after the MLP instead would differ by far more (the test sees the placement)."""
    make = timm_dinov2_reg if tower == "dinov2" else timm_siglip
    cfg = make(16, 1, 2, image_size=IMAGE, film_dim=12)
    block = nnx.eval_shape(lambda: EncoderBlock(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    assign_params(block, {path: (rng.normal(0.0, 0.4, v.shape) + (1.0 if len(v.shape) == 1 else 0.0)).astype(
        np.float32) for path, v in param_shapes(block).items()})
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    lang = rng.normal(size=(2, 12)).astype(np.float32)
    got = np.asarray(nnx.jit(lambda b, x, c: b(x, c))(block, jnp.asarray(x), jnp.asarray(lang)), np.float64)
    t = timm_tensors(block)
    want = np_filmed_block(x.astype(np.float64), lang.astype(np.float64), t, heads=2)
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= 1e-5 * scale
    wrong = np_filmed_block(x.astype(np.float64), lang.astype(np.float64), t, heads=2, film_after="mlp")
    assert float(np.abs(got - wrong).max()) > 1e-2 * scale
    vit = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"film_cond \[B, 12\]"):
        vit.intermediate(jnp.zeros((1, IMAGE, IMAGE, 3)), -1)
    with pytest.raises(ValueError, match="has no FiLM layers"):
        nnx.eval_shape(lambda: ViT(make(16, 1, 2, image_size=IMAGE), rngs=nnx.Rngs(0)))(
            jnp.zeros((1, IMAGE, IMAGE, 3)), film_cond=jnp.zeros((1, 12)))


# ----------------------------------------------------------------------------- the preset with FiLM


def random_values(shapes: dict, film_std: float = 0.0) -> dict[str, np.ndarray]:
    """A value per parameter path, the same for the same path in any policy (seeded by the path), FiLM at
    ``film_std``: norms and LayerScale near 1, kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), biases small."""
    out = {}
    for path, sds in shapes.items():
        rng = np.random.default_rng(zlib.crc32(path.encode()))
        leaf = path.rsplit(".", 1)[-1]
        if ".film." in f".{path}":
            v = rng.normal(0.0, film_std, sds.shape)
        elif leaf in ("scale", "lambda1"):
            v = 1.0 + 0.1 * rng.normal(size=sds.shape)
        elif len(sds.shape) >= 2 and leaf != "embedding":
            v = rng.normal(size=sds.shape) / math.sqrt(sds.shape[-2])
        else:
            v = rng.normal(0.0, 1.0 if leaf == "embedding" else 0.05, sds.shape)
        out[path] = v.astype(np.float32)
    return out


def tiny_policy(film: bool, film_std: float = 0.0):
    """tiny_oft(_film) with every tower and the LLM 32 wide, built abstractly and filled from
    :func:`random_values` (no per-op compiles of an eager init; the plain and FiLM policies share every value)."""
    model = get_config("tiny_oft_film" if film else "tiny_oft").model.to_dict()
    c = model["openvla"]
    c["image_size"], c["film_init"] = IMAGE, "zeros"
    c["dino"] = c["siglip"] = dict(width=WIDTH, depth=3, num_heads=2, mlp_ratio=4.0)
    c["text"] = dict(c["text"], width=WIDTH, mlp_dim=64, num_heads=2, num_kv_heads=1)
    spec = PolicySpec(cameras=("image",), image_size=IMAGE, state_dim=0, action_dim=7, horizon=HORIZON,
                      max_text_len=8, state_input="none")
    policy = nnx.eval_shape(lambda: build_openvla(model, spec, 0, nnx.Rngs(0)))
    return assign_params(policy, random_values(param_shapes(policy), film_std))


def close(got, want, tol):
    """max |got - want| <= tol * max(1, max |want|)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.abs(got - want).max())
    assert err <= tol * max(1.0, float(np.abs(want).max())), err


def obs_with(ids: np.ndarray, mask: np.ndarray, images: np.ndarray) -> dict:
    return {"images": {"image": images}, "text_ids": ids, "text_mask": mask}


@pytest.fixture(scope="module")
def setup():
    # the same weights everywhere but FiLM (zero: the identity, OFT's (1 + gamma) form)
    plain, filmed = tiny_policy(False), tiny_policy(True)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, (2, 6)).astype(np.int32)  # no id 2: only FiLM reads the </s> embedding
    ids[:, 0] = 1
    mask = np.ones((2, 6), bool)
    mask[0, 4:] = False
    images = rng.integers(0, 256, (2, IMAGE, IMAGE, 3), dtype=np.uint8)
    actions = jnp.asarray(rng.uniform(-1, 1, (2, HORIZON, 7)), jnp.float32)

    @nnx.jit
    def forward(policy, obs):
        return policy.vision_features(obs), policy.sample(obs, rngs=jax.random.key(0))

    # OFT+ trains FiLM and the action head in full (the rest through LoRA); the token embeddings show the
    # language path. Fewer gradients: a cheaper compile (test_preset_openvla's OFT test takes them all)
    wrt = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("film"), nnx.PathContains("head"),
                                     nnx.PathContains("embed_tokens")))

    @nnx.jit
    def film_step(policy, obs):  # the FiLM policy's forward and one loss step: one compile for every test
        loss, grads = nnx.value_and_grad(lambda p: p.loss(obs, actions, rngs=jax.random.key(0))[0],
                                         argnums=nnx.DiffState(0, wrt))(policy)
        return policy.vision_features(obs), policy.sample(obs, rngs=jax.random.key(0)), loss, grads

    return dict(plain=plain, filmed=filmed, ids=ids, mask=mask, images=images, forward=forward,
                film_step=film_step)


def test_zero_film_is_the_plain_policy(setup):
    """FiLM at zero (``film_init='zeros'``) is the identity: features and the sampled chunk equal the plain OFT
    policy with the same weights (the FiLM policy holds 2 x (D_llm x D + D) more parameters per block)."""
    s = setup
    obs = obs_with(s["ids"], s["mask"], s["images"])
    f_plain, a_plain = s["forward"](s["plain"], obs)
    f_film, a_film, _, _ = s["film_step"](s["filmed"], obs)
    assert a_plain.shape == (2, HORIZON, 7)
    # two different compiled programs (the FiLM one also takes gradients): float32 rounding of fused ops differs
    close(f_film, f_plain, 1e-6)  # |features| ~ 40: a few float32 ulps
    close(a_film, a_plain, 1e-5)
    count = lambda p: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(p, nnx.Param)))  # noqa: E731
    assert count(s["filmed"]) - count(s["plain"]) == 2 * 3 * 2 * (WIDTH * WIDTH + WIDTH)


def test_language_changes_the_visual_features(setup):
    """With non-trivial FiLM the prompt changes the fused patch features (and the plain policy's do not); the
    language mean is masked: padding after the prompt changes nothing. The mean itself is numpy's."""
    s = setup
    policy = tiny_policy(True, film_std=0.3)  # |gamma|, |beta| ~ 1
    ids, mask, images = s["ids"], s["mask"], s["images"]
    other_ids = ids.copy()
    other_ids[:, 1:] = np.random.default_rng(5).integers(3, 300, (2, 5))
    padded_ids = ids.copy()
    padded_ids[0, 4:] = 99  # the padded positions of row 0 hold other ids
    feats = {name: np.asarray(s["film_step"](policy, obs_with(i, mask, images))[0])
             for name, i in (("a", ids), ("b", other_ids), ("pad", padded_ids))}
    feats.update({name: np.asarray(s["forward"](s["plain"], obs_with(i, mask, images))[0])
                  for name, i in (("plain_a", ids), ("plain_b", other_ids))})
    assert float(np.abs(feats["a"] - feats["b"]).max()) > 1e-2 * float(np.abs(feats["a"]).max())
    np.testing.assert_array_equal(feats["plain_a"], feats["plain_b"])
    close(feats["pad"], feats["a"], 1e-6)

    table = np.asarray(policy.backbone.embed_tokens.embedding.get_value(), np.float64)
    rows = [[*ids[i][mask[i]], 29871] for i in range(2)]  # the prompt and predict_action's trailing 29871
    full_ids, full_mask = np.zeros((2, 7), np.int32), np.zeros((2, 7), bool)
    for i, row in enumerate(rows):
        full_ids[i, :len(row)], full_mask[i, :len(row)] = row, True
    got = np.asarray(policy.language_embedding(policy.backbone.embed_tokens(jnp.asarray(full_ids)),
                                               jnp.asarray(full_mask)))
    for i, row in enumerate(rows):
        np.testing.assert_allclose(got[i], table[row + [2]].mean(0), rtol=0, atol=1e-6)  # + OFT's </s>


def test_jitted_loss_step_with_film_and_l1_head(setup):
    """One jitted L1 loss + gradient step (w.r.t. FiLM, the head and the token embeddings): finite, and the
    gradient reaches the FiLM layers of every used block of both towers, the head, and the </s> embedding row
    (id 2 is not in the prompt: only FiLM's language mean reads it)."""
    s = setup
    policy = tiny_policy(True, film_std=0.05)
    _, _, loss, grads = s["film_step"](policy, obs_with(s["ids"], s["mask"], s["images"]))
    assert np.isfinite(float(loss))
    flat = {".".join(map(str, k)): np.asarray(getattr(v, "get_value", lambda: v)())
            for k, v in nnx.to_flat_state(grads)}
    for tower in ("dino", "siglip"):
        for layer in ("scale", "shift"):
            g = flat[f"vision.{tower}.encoder.layers.film.{layer}.kernel"]  # [L, D_llm, D]
            assert np.all(np.isfinite(g))
            assert all(float(np.abs(g[i]).max()) > 0 for i in range(g.shape[0] - 1))
            assert float(np.abs(g[-1]).max()) == 0  # the last block never runs (OpenVLA reads the one before)
    assert float(np.abs(flat["backbone.embed_tokens.embedding"][2]).max()) > 0
    assert float(np.abs(flat["head.fc2.kernel"]).max()) > 0


def test_oft_film_init_is_torch_linear_default():
    """The configs' ``film_init='uniform'`` reaches both towers and draws kernel and bias from
    U(-1/sqrt(D_llm), 1/sqrt(D_llm)), torch nn.Linear's default, as OFT's FiLM layers start; ``zeros`` is zero."""
    sizes = sizes_from_model(get_config("tiny_oft_film").model.to_dict())
    assert sizes.film and sizes.dino.film_init == sizes.siglip.film_init == "uniform"
    assert sizes.dino.film_dim == sizes.siglip.film_dim == 64 and sizes.film_stop_token == 2
    film = FiLM(256, 96, rngs=nnx.Rngs(0))
    bound = 1 / math.sqrt(256)
    for layer in (film.scale, film.shift):
        for value in (layer.kernel.get_value(), layer.bias.get_value()):
            v = np.asarray(value)
            assert bound >= float(np.abs(v).max()) > 0.9 * bound
            assert abs(float(v.std()) - bound / math.sqrt(3)) < 0.15 * bound
    zero = FiLM(8, 4, init="zeros", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(zero(x, jnp.ones((2, 8)))), np.asarray(x))


def test_oft_film_7b_parameter_count():
    """OpenVLA-OFT+ at published size (ALOHA: 25 x 14 actions), built abstractly. openvla-oft publishes no count;
    from its modules: openvla-7b (7,541,237,184, test_preset_openvla) + FiLM (two nn.Linear(4096, D) in each of
    the 24 DINOv2 and 27 SigLIP blocks: 456,241,920) + L1RegressionActionHead (MLPResNet, 2 blocks:
    268,644,366) = 8,266,123,470."""
    c = get_config("oft_film_7b")
    assert c.model.film and c.model.head == "l1_mlp" and c.data.action_horizon == 25 and c.model.action_dim == 14
    spec = PolicySpec(cameras=("image",), image_size=224, state_dim=0, action_dim=14, horizon=25, max_text_len=32,
                      state_input="none")
    model = nnx.eval_shape(lambda: build_openvla(c.model.to_dict(), spec, 0, nnx.Rngs(0)))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    film = 24 * 2 * (4096 * 1024 + 1024) + 27 * 2 * (4096 * 1152 + 1152)
    d, a = 4096, 14
    head = 2 * a * d + (a * d * d + d) + 2 * (2 * d + d * d + d) + 2 * d + (d * a + a)
    assert film == 456_241_920 and head == 268_644_366
    film_params = {k: v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "film" in k}
    assert count([v.get_value() for v in film_params.values()]) == film
    assert count(nnx.state(model.head, nnx.Param)) == head
    assert count(nnx.state(model, nnx.Param)) == 7_541_237_184 + film + head == 8_266_123_470


# ----------------------------------------------------------------------------- importing OFT's vision-backbone file


def oft_vision_file(tensors: dict, rank: int, rng) -> tuple[dict, dict]:
    """The fixture's towers as OFT+ would save them (``vision_backbone.state_dict()`` of the FiLM wrapper under
    peft LoRA, rank ``rank``, alpha min(r, 16)), with random FiLM and LoRA; returns ``(file, expected merged)``."""
    out, expected = {}, {}
    lora = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "attn_pool.q", "attn_pool.kv", "attn_pool.proj",
            "attn_pool.mlp.fc1", "attn_pool.mlp.fc2")
    depth = {"featurizer": 3, "fused_featurizer": 3}
    for key, value in tensors.items():
        if not key.startswith("vision_backbone."):
            continue
        tower, rest = key[len("vision_backbone."):].split(".", 1)
        in_block = rest.startswith("blocks.")
        if in_block:
            _, n, rest = rest.split(".", 2)
        module = rest.rsplit(".", 1)[0]
        new = (f"vision_backbone.{tower}.blocks.{n}.block." if in_block else f"vision_backbone.{tower}.")
        if module in lora:
            leaf = rest.rsplit(".", 1)[1]
            out[new + f"{module}.base_layer.{leaf}"] = value
            if leaf == "weight":
                a = rng.normal(0, 0.1, (rank, value.shape[1])).astype(np.float32)
                b = rng.normal(0, 0.1, (value.shape[0], rank)).astype(np.float32)
                out[new + f"{module}.lora_A.default.weight"] = a
                out[new + f"{module}.lora_B.default.weight"] = b
                expected[key] = value + min(rank, 16) / rank * (b @ a)
        else:
            out[new + rest] = value
    for tower, width in (("featurizer", 64), ("fused_featurizer", 48)):
        for n in range(depth[tower]):
            for layer in ("scale", "shift"):
                w = rng.normal(0, 0.1, (width, 64)).astype(np.float32)  # nn.Linear(llm_dim=64, vision_dim)
                bias = rng.normal(0, 0.1, (width,)).astype(np.float32)
                out[f"vision_backbone.{tower}.blocks.{n}.{layer}.weight"] = w
                out[f"vision_backbone.{tower}.blocks.{n}.{layer}.bias"] = bias
                expected[f"{tower}.{n}.{layer}"] = (w, bias)
    return out, expected


def test_importer_reads_oft_film_vision_backbone(tmp_path):
    """An OFT+ checkpoint directory (model.safetensors + the converted vision_backbone--<step>_checkpoint file):
    the FiLM layers land in both towers (kernels transposed, stacked per block), LoRA is merged into the towers'
    weights as W + (alpha / r) B A, the 8 last-block FiLM tensors join the unused list; the torch pickle is
    refused with the conversion command, and vision_backbone=False loads the plain model."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(FIXTURE / "model.safetensors")
    for name in ("config.json", "preprocessor_config.json", "dataset_statistics.json", "model.safetensors"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    file, expected = oft_vision_file(tensors, rank=32, rng=np.random.default_rng(0))
    save_file(file, tmp_path / "vision_backbone--100000_checkpoint.safetensors")
    policy = load_openvla(tmp_path)
    assert policy.sizes.film and policy.sizes.dino.film_dim == policy.sizes.siglip.film_dim == 64
    for tower, vit in (("featurizer", policy.vision.dino), ("fused_featurizer", policy.vision.siglip)):
        film = vit.encoder.layers.film
        for n in range(3):
            for layer in ("scale", "shift"):
                w, b = expected[f"{tower}.{n}.{layer}"]
                np.testing.assert_array_equal(np.asarray(getattr(film, layer).kernel.get_value()[n]), w.T)
                np.testing.assert_array_equal(np.asarray(getattr(film, layer).bias.get_value()[n]), b)
    q = np.asarray(policy.vision.dino.encoder.layers.self_attn.q_proj.kernel.get_value()[1])
    merged = expected["vision_backbone.featurizer.blocks.1.attn.qkv.weight"]
    np.testing.assert_allclose(q, merged[:64].T, rtol=0, atol=1e-6)
    fc2 = np.asarray(policy.vision.siglip.head.mlp.fc2.kernel.get_value())
    np.testing.assert_allclose(fc2, expected["vision_backbone.fused_featurizer.attn_pool.mlp.fc2.weight"].T,
                               rtol=0, atol=1e-6)
    unused = unused_tensor_names(policy.sizes)
    assert len(unused) == 51 and "vision_backbone.fused_featurizer.blocks.2.shift.bias" in unused

    plain = load_openvla(tmp_path, vision_backbone=False)
    assert not plain.sizes.film
    (tmp_path / "vision_backbone--100000_checkpoint.safetensors").rename(tmp_path / "vision_backbone--5_checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"convert_torch_checkpoint --input .*vision_backbone--5_checkpoint\.pt"):
        load_openvla(tmp_path)
