"""Action heads: the cost of sampling a chunk relative to one backbone + head forward pass.

    python -m benchmarks.bench_heads

A policy is a backbone prefix pass (camera embeddings + prompt tokens -> hidden states and the per-layer KV cache)
followed by the head. Sampling loops must reuse that prefix: flow matching runs only its action expert per Euler
step, diffusion only its denoiser per DDIM step, and binned LM decoding appends one token at a time to the KV
cache. So, per head, two jitted programs are timed from the same inputs:

* ``forward``: backbone prefix + one head evaluation (one Euler step; one DDIM step; one action token);
* ``sample``: backbone prefix + the full sampler (10 Euler steps; 10 DDIM steps; 7 action tokens).

Goals: ``sample / forward <= 1.5x`` for flow and diffusion, ``<= 2x`` for binned LM decoding. A loop that re-ran
the backbone would cost about 10x (7x for the tokens). The two programs are timed in alternating rounds (each the
median of several calls), and the ratio is the median over rounds, so both see the same load on a shared machine.

Proportions are π0's, scaled down to a CPU: a backbone with a Gemma-like wide MLP; a prefix of two cameras of 256
image tokens (SigLIP at 224 px) + 16 prompt tokens (π0 reads 2-3 cameras); a π0 expert of half the backbone's
width over a 50-step chunk (1.2M parameters beside the backbone's 9M; π0: 300M beside Gemma's 2B); Octo's
MLP-ResNet denoiser; OpenVLA's 7 action tokens. ``--cameras 1`` halves the prefix: at this small width the
expert's attention to the prefix weighs more than in π0 (where it is < 1 % of a step), so one Euler step costs
about 5 % of the prefix pass instead of π0's ~1 %.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import block, device_name
from vlax.backbones import Transformer, get_config
from vlax.heads import get_head
from vlax.nn import ContextSpec, HeadContext, count_params

BACKBONE = dict(vocab_size=4096, width=256, depth=4, mlp_dim=2048, num_heads=4, num_kv_heads=1, head_dim=64)
BATCH, TOKENS_PER_CAMERA, PROMPT_TOKENS = 1, 256, 16
STEPS, TOKENS = 10, 7
HEADS = {  # name -> (registry name, keyword arguments, ratio goal)
    "flow": ("flow", dict(action_dim=7, horizon=50, num_steps=STEPS), 1.5),
    "diffusion": ("diffusion", dict(action_dim=7, horizon=50, sampler="ddim", num_steps=STEPS), 1.5),
    "binned_lm": ("binned_lm", dict(action_dim=TOKENS, horizon=1), 2.0),
}


class Policy(nnx.Module):
    """Backbone prefix over ``[image embeddings, prompt]``, then the head on its context."""

    def __init__(self, head_name: str, head_kwargs: dict, *, rngs: nnx.Rngs):
        config = get_config("tiny", **BACKBONE)
        self.backbone = Transformer(config, rngs=rngs)
        spec = ContextSpec.from_config(config)
        if head_name == "flow":
            head_kwargs = dict(head_kwargs, rope=config.rope)  # suffix queries must rotate like the cached keys
        self.head = get_head(head_name, context=spec, **head_kwargs, rngs=rngs)

    def sample(self, images: jax.Array, prompt: jax.Array, key: jax.Array, num_steps: int | None) -> jax.Array:
        mask = jnp.ones((prompt.shape[0], images.shape[1] + prompt.shape[1]), bool)
        slots = self.head.cache_slots
        cache_size = None if slots is None else mask.shape[1] + slots
        out = self.backbone(prompt, images, input_mask=mask, cache_size=cache_size)
        ctx = HeadContext.from_backbone_output(out, mask)
        return self.head.sample(ctx, rngs=key, num_steps=num_steps, lm=self.backbone)


def jitted(policy: Policy, num_steps: int | None):
    graphdef, state = nnx.split(policy)
    fn = jax.jit(lambda s, images, prompt, key: nnx.merge(graphdef, s).sample(images, prompt, key, num_steps))
    return lambda *args: fn(state, *args)


def median_call(fn, args, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(cameras: int = 2, rounds: int = 7, calls: int = 5) -> None:
    image_tokens = cameras * TOKENS_PER_CAMERA
    print(f"device {device_name()}  backbone {BACKBONE}  batch {BATCH}, prefix {image_tokens} image "
          f"({cameras} cameras) + {PROMPT_TOKENS} prompt tokens")
    ks = jax.random.split(jax.random.key(0), 3)
    images = jax.random.normal(ks[0], (BATCH, image_tokens, BACKBONE["width"]), jnp.float32)
    prompt = jax.random.randint(ks[1], (BATCH, PROMPT_TOKENS), 0, BACKBONE["vocab_size"], jnp.int32)
    args = (images, prompt, ks[2])
    results = {}
    for label, (name, kwargs, goal) in HEADS.items():
        full = Policy(name, kwargs, rngs=nnx.Rngs(0))
        if name == "binned_lm":  # the forward pass is the same policy decoding a single token
            one = Policy(name, dict(kwargs, action_dim=1), rngs=nnx.Rngs(0))
            forward, sample = jitted(one, None), jitted(full, None)
        else:
            forward, sample = jitted(full, 1), jitted(full, None)
        for fn in (forward, sample):  # compile and warm up
            for _ in range(2):
                block(fn(*args))
        forward_t, sample_t, ratios = [], [], []
        for _ in range(rounds):
            f, s = median_call(forward, args, calls), median_call(sample, args, calls)
            forward_t.append(f)
            sample_t.append(s)
            ratios.append(s / f)
        backbone_params = count_params(nnx.state(full.backbone, nnx.Param))
        head_params = count_params(nnx.state(full.head, nnx.Param))
        results[label] = (statistics.median(forward_t), statistics.median(sample_t), statistics.median(ratios), goal)
        print(f"  {label:10s} head {head_params / 1e6:5.2f} M params beside a {backbone_params / 1e6:.2f} M backbone")
    print(f"{'head':10s} {'forward':>10s} {'sample':>10s} {'ratio':>7s}  goal")
    for label, (f, s, ratio, goal) in results.items():
        what = {"flow": f"{STEPS} Euler steps", "diffusion": f"{STEPS} DDIM steps",
                "binned_lm": f"{TOKENS} tokens"}[label]
        verdict = "ok" if ratio <= goal else "MISSED"
        print(f"{label:10s} {f * 1e3:8.2f}ms {s * 1e3:8.2f}ms {ratio:6.2f}x  <= {goal}x ({what}) {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cameras", type=int, default=2, help="cameras of 256 image tokens in the prefix")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per head")
    main(**vars(parser.parse_args()))
