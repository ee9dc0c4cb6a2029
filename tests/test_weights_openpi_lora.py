"""openpi LoRA checkpoints: the adapters folded on import give what openpi's LoRA einsums compute.

The tree is the tiny π0 fixture (tests/fixtures/openpi/pi0_tiny, openpi's own layout) with random adapters of rank
4 added beside every attention and MLP einsum of the language model and of the action expert, named and shaped as
openpi's ``lora.Einsum`` / ``lora.FeedForward`` create them. The reference applies openpi's two LoRA einsums in
numpy, with equations derived here from each base equation; vlax's side is ``x @ kernel`` of the imported layers.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from vlax.weights.common import CheckpointError
from vlax.weights.openpi import convert_params, read_params

FIXTURE = Path(__file__).parent / "fixtures" / "openpi" / "pi0_tiny" / "params"
RANK = 4
ATTN = "PaliGemma/llm/layers/attn/"
MLP = "PaliGemma/llm/layers/mlp"
# openpi's equations (Gemma attention, MQA path) with its '2' axis renamed C for numpy
EQUATIONS = {"q_einsum": "BTD,NDH->BTNH", "kv_einsum": "BSD,CKDH->CBSKH", "attn_vec_einsum": "BTNH,NHD->BTD"}


def lora_equations(eqn: str) -> tuple[str, str]:
    """openpi's rule: the first einsum replaces the weight's last label by L, the second its second-to-last."""
    lhs, rhs, out = re.match(r"(.*),(.*)->(.*)", eqn).groups()
    a_label, b_label = rhs[-2], rhs[-1]
    a_out = out.replace(b_label, "L")
    return f"{lhs},{rhs.replace(b_label, 'L')}->{a_out}", f"{a_out},{rhs.replace(a_label, 'L')}->{out}"


def openpi_einsum(eqn: str, x, w, a, b, scale: float):
    eqn_a, eqn_b = lora_equations(eqn)
    return np.einsum(eqn, x, w) + np.einsum(eqn_b, np.einsum(eqn_a, x, a), b) * scale


@pytest.fixture(scope="module")
def with_lora():
    flat = read_params(FIXTURE)
    rs = np.random.RandomState(0)
    adapted = dict(flat)
    for suffix in ("", "_1"):
        for name in EQUATIONS:
            w = flat[f"{ATTN}{name}{suffix}/w"]
            adapted[f"{ATTN}{name}{suffix}/lora_a"] = rs.normal(0, 0.1, w.shape[:-1] + (RANK,)).astype(np.float32)
            adapted[f"{ATTN}{name}{suffix}/lora_b"] = rs.normal(
                0, 0.1, w.shape[:-2] + (RANK,) + w.shape[-1:]).astype(np.float32)
        for name in ("gating_einsum", "linear"):
            w = flat[f"{MLP}{suffix}/{name}"]
            adapted[f"{MLP}{suffix}/{name}_lora_a"] = rs.normal(0, 0.1, w.shape[:-1] + (RANK,)).astype(np.float32)
            adapted[f"{MLP}{suffix}/{name}_lora_b"] = rs.normal(
                0, 0.1, w.shape[:-2] + (RANK,) + w.shape[-1:]).astype(np.float32)
    return flat, adapted


@pytest.mark.parametrize("suffix, target", [("", "backbone.layers"), ("_1", "head.expert.layers")])
def test_folded_lora_equals_openpi_lora_einsums(with_lora, suffix, target):
    flat, adapted = with_lora
    scale = 2.0  # alpha / rank other than 1, so a missing or misplaced scale shows
    ours, sources = convert_params(adapted, lora_scale=scale)
    rs = np.random.RandomState(1)
    get = lambda key: adapted[key].astype(np.float64)  # noqa: E731
    depth, heads, head_dim = flat[f"{ATTN}q_einsum{suffix}/w"].shape[:2] + flat[f"{ATTN}q_einsum{suffix}/w"].shape[-1:]
    width = flat[f"{ATTN}q_einsum{suffix}/w"].shape[2]
    worst = 0.0
    for layer in range(depth):
        x = rs.normal(size=(2, 5, width))
        kernel = lambda name: ours[f"{target}.{name}"][layer].astype(np.float64)  # noqa: E731
        w = {n: get(f"{ATTN}{n}{suffix}/{leaf}")[layer] for n in EQUATIONS for leaf in ("w",)}
        lora = {n: (get(f"{ATTN}{n}{suffix}/lora_a")[layer], get(f"{ATTN}{n}{suffix}/lora_b")[layer])
                for n in EQUATIONS}
        q = openpi_einsum(EQUATIONS["q_einsum"], x, w["q_einsum"], *lora["q_einsum"], scale)
        k, v = openpi_einsum(EQUATIONS["kv_einsum"], x, w["kv_einsum"], *lora["kv_einsum"], scale)
        pairs = [(q, (x @ kernel("self_attn.q_proj.kernel")).reshape(q.shape)),
                 (k, (x @ kernel("self_attn.k_proj.kernel")).reshape(k.shape)),
                 (v, (x @ kernel("self_attn.v_proj.kernel")).reshape(v.shape))]
        encoded = rs.normal(size=(2, 5, heads, head_dim))
        o = openpi_einsum(EQUATIONS["attn_vec_einsum"], encoded, w["attn_vec_einsum"], *lora["attn_vec_einsum"],
                          scale)
        pairs.append((o, encoded.reshape(2, 5, -1) @ kernel("self_attn.o_proj.kernel")))
        # openpi's FeedForward LoRA: x @ a @ b, no alpha / rank
        gating = get(f"{MLP}{suffix}/gating_einsum")[layer]
        ga, gb = get(f"{MLP}{suffix}/gating_einsum_lora_a")[layer], get(f"{MLP}{suffix}/gating_einsum_lora_b")[layer]
        for i, proj in enumerate(("gate_proj", "up_proj")):
            pairs.append((x @ gating[i] + x @ ga[i] @ gb[i], x @ kernel(f"mlp.{proj}.kernel")))
        hidden = rs.normal(size=(2, 5, gating.shape[-1]))
        la, lb = get(f"{MLP}{suffix}/linear_lora_a")[layer], get(f"{MLP}{suffix}/linear_lora_b")[layer]
        pairs.append((hidden @ get(f"{MLP}{suffix}/linear")[layer] + hidden @ la @ lb,
                      hidden @ kernel("mlp.down_proj.kernel")))
        for want, got in pairs:
            assert got.shape == want.shape
            worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    # float32 storage of the folded kernels: a relative error of a few ulp
    assert worst < 1e-6, f"max relative |vlax - openpi LoRA einsum| = {worst:.3g}"
    assert "lora_a" in sources[f"{target}.self_attn.q_proj.kernel"]
    # the adapters changed the weights (a fold that dropped them would also convert)
    base, _ = convert_params(flat)
    assert np.abs(ours[f"{target}.mlp.down_proj.kernel"] - base[f"{target}.mlp.down_proj.kernel"]).max() > 1e-3


def test_zero_adapters_leave_the_base_weights(with_lora):
    flat, adapted = with_lora
    zeroed = {k: np.zeros_like(v) if "lora_b" in k else v for k, v in adapted.items()}
    ours, _ = convert_params(zeroed)
    base, _ = convert_params(flat)
    assert ours.keys() == base.keys()
    for key in base:
        np.testing.assert_array_equal(ours[key], base[key], err_msg=key)


def test_a_lora_half_alone_or_misshaped_is_named(with_lora):
    flat, adapted = with_lora
    lonely = {k: v for k, v in adapted.items() if k != f"{ATTN}q_einsum/lora_b"}
    with pytest.raises(CheckpointError, match="missing .*q_einsum/lora_b"):
        convert_params(lonely)
    stray = {**flat, f"{ATTN}nonsense/lora_a": np.zeros((2, 3), np.float32)}
    with pytest.raises(CheckpointError, match="stray .*nonsense/lora_a"):
        convert_params(stray)
    wrong = {**adapted, f"{MLP}/linear_lora_a": np.zeros((2, 7, RANK), np.float32)}
    with pytest.raises(CheckpointError, match="linear_lora_a .* do not fit"):
        convert_params(wrong)
