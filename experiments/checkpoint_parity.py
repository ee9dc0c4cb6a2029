"""Checkpoint-import demo: build small random Hugging Face models locally, import them with vlax, and print how
closely vlax reproduces transformers' outputs.

    make parity        # or: python -m experiments.checkpoint_parity

Nothing is downloaded: each reference model is created with random weights, saved as safetensors to a temporary
directory, read back by ``vlax.weights.load_pretrained`` and run on the same inputs as the torch original.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _language_models():
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  max_position_embeddings=256)
    yield "Llama (GQA 8/2 heads)", LlamaForCausalLM(LlamaConfig(num_attention_heads=8, num_key_value_heads=2,
                                                                   **common))
    yield "Gemma (MQA, head_dim 64)", GemmaForCausalLM(GemmaConfig(num_attention_heads=4, num_key_value_heads=1,
                                                                     head_dim=64, **common))


def _vision_models():
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    yield "SigLIP vision (MAP head)", SiglipVisionModel(SiglipVisionConfig(
        hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, image_size=64,
        patch_size=16)), 64
    yield "DINOv2 at 84 px (trained 56)", Dinov2Model(Dinov2Config(
        hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, image_size=56,
        patch_size=14, layerscale_value=0.5)), 84


def main() -> None:
    import torch
    from transformers.utils import logging as hf_logging

    from vlax.weights import load_pretrained

    hf_logging.disable_progress_bar()

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.RandomState(0).randint(0, 256, size=(2, 16))
        for name, ref in _language_models():
            path = os.path.join(tmp, name.split()[0].lower())
            ref.save_pretrained(path)
            t0 = time.perf_counter()
            model = load_pretrained(path)
            load_s = time.perf_counter() - t0
            with torch.no_grad():
                expected = ref(torch.from_numpy(tokens)).logits.numpy()
            got = np.asarray(jax.jit(lambda ids: model(ids, return_logits=True).logits)(jnp.asarray(tokens)))
            rows.append((name, "logits", got.shape, float(np.abs(got - expected).max()), load_s))
        for name, ref, size in _vision_models():
            path = os.path.join(tmp, name.split()[0].lower())
            ref.save_pretrained(path)
            t0 = time.perf_counter()
            model = load_pretrained(path)
            load_s = time.perf_counter() - t0
            pixels = np.random.RandomState(1).randn(2, 3, size, size).astype(np.float32)
            with torch.no_grad():
                out = ref(torch.from_numpy(pixels), interpolate_pos_encoding=True) if "DINO" in name else \
                    ref(torch.from_numpy(pixels))
                expected = out.last_hidden_state.numpy()
            vit_out = model(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
            got = np.asarray(jnp.concatenate([vit_out.prefix, vit_out.tokens], axis=1))
            rows.append((name, "last hidden", got.shape, float(np.abs(got - expected).max()), load_s))

    print("\nvlax vs transformers (random weights, fp32, same inputs)\n")
    print(f"{'model':32s} {'output':12s} {'shape':18s} {'max |diff|':>11s} {'import s':>9s}")
    for name, what, shape, err, load_s in rows:
        print(f"{name:32s} {what:12s} {str(tuple(shape)):18s} {err:11.2e} {load_s:9.2f}")
    worst = max(r[3] for r in rows)
    print(f"\nworst max |diff| = {worst:.2e} ({'within' if worst <= 1e-5 else 'OUTSIDE'} the 1e-5 tolerance)")


if __name__ == "__main__":
    main()
