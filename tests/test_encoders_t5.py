"""vlax's T5 encoder against transformers' ``T5EncoderModel`` (torch, CPU) on tiny random configs built here.

Both feed-forward forms (original T5's ReLU, T5 v1.1's gated GELU), relative position buckets beyond the exact
range (sequence 40 > 8 exact buckets), a padded row, and the import of the same weights from HF-Flax names (the
tree Octo stores). fp32, max abs error <= 1e-5.
"""

import numpy as np
import pytest
import torch
from flax import nnx

from vlax.encoders.t5 import T5Encoder, relative_position_buckets
from vlax.weights.common import CheckpointError, assign_params
from vlax.weights.t5 import convert_t5_tensors, flax_names_to_torch, t5_config_from_hf

TOL = 1e-5


def hf_encoder(feed_forward_proj: str, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
                      feed_forward_proj=feed_forward_proj)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():  # random norm scales, so that a wrong norm cannot hide behind ones
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return config, model


def inputs(batch: int = 2, length: int = 40):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    mask[1, 29:] = 0
    return ids, mask


def load(config, model, *, via_flax: bool = False) -> T5Encoder:
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if via_flax:  # the same weights written as HF-Flax names ("a/b/kernel" [in, out])
        flax = {}
        for k, v in tensors.items():
            parts = k.split(".")
            if parts[-1] == "weight" and "layer_norm" not in k:
                table = "relative_attention_bias" in k or k in ("shared.weight", "encoder.embed_tokens.weight")
                flax["/".join(parts[:-1] + ["embedding" if table else "kernel"])] = v if table else v.T
            else:
                flax["/".join(parts)] = v
        tensors = flax_names_to_torch(flax)
    cfg = t5_config_from_hf(config.to_dict())
    flat, sources = convert_t5_tensors(tensors, cfg)
    return assign_params(nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0))), flat, sources=sources)


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_t5_encoder_matches_transformers(feed_forward_proj):
    config, model = hf_encoder(feed_forward_proj)
    ids, mask = inputs()
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    for via_flax in (False, True):
        got = np.asarray(load(config, model, via_flax=via_flax)(ids, mask.astype(bool)))
        real = mask.astype(bool)
        err = float(np.max(np.abs(got[real] - want[real])))
        assert err <= TOL, (feed_forward_proj, via_flax, err)


def test_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    got = relative_position_buckets(50, 50, 32, 128)
    rel = torch.arange(50)[None, :] - torch.arange(50)[:, None]
    want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128).numpy()
    np.testing.assert_array_equal(got, want)
    got = relative_position_buckets(300, 300, 32, 128)
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128).numpy()
    np.testing.assert_array_equal(got, want)


def test_missing_block_is_named():
    config, model = hf_encoder("relu")
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tensors.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    cfg = t5_config_from_hf(config.to_dict())
    flat, sources = convert_t5_tensors(tensors, cfg)
    with pytest.raises(CheckpointError, match=r"missing keys.*layers\.1\.ff\.wo\.kernel"):
        assign_params(nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0))), flat, sources=sources)
