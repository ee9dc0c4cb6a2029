"""ResNet with basic blocks (ResNet-18 / -34), NHWC, in the two normalisations robot policies use.

* ``norm="frozen_batch"``: torchvision's ``FrozenBatchNorm2d`` (ACT): per-channel ``weight``, ``bias``,
  ``running_mean`` and ``running_var`` are fixed statistics, not trained, so they live in ``nnx.BatchStat``
  variables and are left out of the optimizer and of parameter counts. It equals a BatchNorm in eval mode.
* ``norm="group"``: GroupNorm with ``channels // 16`` groups in place of every BatchNorm (Diffusion Policy's
  replacement); its scale and bias are trained parameters.

The module tree follows torchvision's names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample``
with ``conv`` / ``norm``) so :func:`torchvision_rules` maps a torchvision / LeRobot state dict onto it with one
table. Images are taken as they are (already normalised by the caller); the classifier head is not built.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
NORMS = ("frozen_batch", "group")
# torchvision's FrozenBatchNorm2d and nn.BatchNorm2d both default to this epsilon.
BATCH_NORM_EPS = 1e-5
GROUP_NORM_EPS = 1e-5


def _conv(cin: int, cout: int, kernel: int, stride: int, *, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Conv:
    # torch pads symmetrically by kernel // 2; "SAME" would pad stride-2 convs asymmetrically.
    pad = kernel // 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    kernel_metadata={"logical_axes": (None, None, None, "embed")})


class FrozenBatchNorm(nnx.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` over the last axis, all four fixed."""

    def __init__(self, channels: int, *, eps: float = BATCH_NORM_EPS, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.BatchStat(jnp.ones((channels,), param_dtype))
        self.bias = nnx.BatchStat(jnp.zeros((channels,), param_dtype))
        self.running_mean = nnx.BatchStat(jnp.zeros((channels,), param_dtype))
        self.running_var = nnx.BatchStat(jnp.ones((channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., C] -> [..., C]``; folded into one scale and shift as torchvision does."""
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
        shift = self.bias[...] - self.running_mean[...] * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def _norm(kind: str, channels: int, *, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Module:
    if kind == "frozen_batch":
        return FrozenBatchNorm(channels, param_dtype=param_dtype)
    return nnx.GroupNorm(channels, num_groups=channels // 16, epsilon=GROUP_NORM_EPS, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


class Downsample(nnx.Module):
    """The 1x1 strided projection of a block's shortcut when its shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.conv = _conv(cin, cout, 1, stride, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = _norm(norm, cout, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with a residual: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = _conv(cin, cout, 3, stride, **kw)
        self.bn1 = _norm(norm, cout, **kw)
        self.conv2 = _conv(cout, cout, 3, 1, **kw)
        self.bn2 = _norm(norm, cout, **kw)
        self.downsample = Downsample(cin, cout, stride, norm, **kw) if stride != 1 or cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        return jax.nn.relu(self.bn2(self.conv2(y)) + shortcut)


class ResNet(nnx.Module):
    """Images ``[B, H, W, C]`` (float, normalised by the caller) -> last feature map ``[B, H/32, W/32, widths[-1]]``.

    ``depth`` picks the block counts (18 or 34) unless ``depths`` gives them; ``widths`` are the four stages'
    channels (64, 128, 256, 512 for the published models; smaller for tests), ``stem_width`` the 7x7 stem's.
    """

    def __init__(
        self,
        depth: int = 18,
        *,
        norm: str = "frozen_batch",
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int | None = None,
        depths: Sequence[int] | None = None,
        num_channels: int = 3,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise ValueError(f"ResNet norm={norm!r} is not supported; use one of {NORMS}")
        if depths is None:
            if depth not in DEPTHS:
                raise ValueError(f"ResNet depth={depth} has no basic-block layout; use one of {sorted(DEPTHS)} "
                                 "or pass depths=(n1, n2, n3, n4)")
            depths = DEPTHS[depth]
        if len(depths) != len(widths):
            raise ValueError(f"ResNet depths {tuple(depths)} and widths {tuple(widths)} need one entry per stage")
        stem_width = widths[0] if stem_width is None else stem_width
        if norm == "group":
            bad = [c for c in (stem_width, *widths) if c % 16]
            if bad:
                raise ValueError(f"norm='group' uses channels // 16 groups, so every width must be a multiple of "
                                 f"16; {bad} are not")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm_kind, self.dtype = norm, dtype
        self.widths = tuple(widths)
        self.conv1 = _conv(num_channels, stem_width, 7, 2, **kw)
        self.bn1 = _norm(norm, stem_width, **kw)
        previous = stem_width
        for i, (n, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(previous, width, stride, norm, **kw))
                previous = width
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.num_stages = len(depths)

    @property
    def out_channels(self) -> int:
        return self.widths[-1]

    def __call__(self, images: jax.Array, *, return_stages: bool = False):
        """``[B, H, W, C] -> [B, h, w, widths[-1]]``; with ``return_stages`` also a tuple of every stage's map."""
        x = images if self.dtype is None else images.astype(self.dtype)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        # torch's MaxPool2d(3, 2, padding=1) pads with -inf, as flax's max_pool does.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = []
        for i in range(self.num_stages):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x)
            stages.append(x)
        return (x, tuple(stages)) if return_stages else x


# ------------------------------------------------------------------------- torchvision / LeRobot key names


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch ``Conv2d.weight [out, in, kh, kw]`` -> flax ``Conv.kernel [kh, kw, in, out]``."""
    return np.transpose(w, (2, 3, 1, 0))


def torchvision_rules(source_prefix: str = "", target_prefix: str = "", *, norm: str = "frozen_batch") -> list:
    """Rename rules (for :func:`vlax.weights.common.rename_tensors`) from torchvision's ResNet names to :class:`ResNet`.

    ``source_prefix`` is a regex prefix of the checkpoint names (e.g. ``r"model\\.backbone\\."``),
    ``target_prefix`` the dotted path of the ResNet inside the vlax module (e.g. ``"backbone."``). Covers
    ``conv1``, ``bn1``, ``layerN.M.{conv1,bn1,conv2,bn2}`` and ``layerN.M.downsample.{0,1}``; ``fc`` is not
    mapped (the classifier is not built), so it is reported as unexpected.
    """
    s, t = source_prefix, target_prefix
    if norm == "frozen_batch":
        norm_fields = [("weight", "weight"), ("bias", "bias"), ("running_mean", "running_mean"),
                       ("running_var", "running_var")]
    else:
        norm_fields = [("weight", "scale"), ("bias", "bias")]
    rules = []
    where = [(r"conv1", "conv1", r"bn1", "bn1"),
             (r"(layer\d+)\.(\d+)\.conv1", r"\1.\2.conv1", r"(layer\d+)\.(\d+)\.bn1", r"\1.\2.bn1"),
             (r"(layer\d+)\.(\d+)\.conv2", r"\1.\2.conv2", r"(layer\d+)\.(\d+)\.bn2", r"\1.\2.bn2"),
             (r"(layer\d+)\.(\d+)\.downsample\.0", r"\1.\2.downsample.conv",
              r"(layer\d+)\.(\d+)\.downsample\.1", r"\1.\2.downsample.norm")]
    for conv_src, conv_dst, norm_src, norm_dst in where:
        rules.append((s + conv_src + r"\.weight", t + conv_dst + ".kernel", conv_kernel))
        for src_field, dst_field in norm_fields:
            rules.append((s + norm_src + r"\." + src_field, t + norm_dst + "." + dst_field, None))
    return rules


def frozen_stat_paths(module: nnx.Module) -> list[str]:
    """Dotted paths of every ``nnx.BatchStat`` in ``module`` (the frozen batch-norm terms an importer fills)."""
    return [".".join(str(k) for k in path) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.BatchStat))]


def assign_frozen_stats(module: nnx.Module, flat: dict[str, np.ndarray]) -> list[str]:
    """Write the ``flat`` entries whose paths are ``nnx.BatchStat`` variables of ``module``; returns the missing ones.

    Shapes are checked; the written entries are removed from ``flat`` so the rest can go to ``assign_params``.
    """
    missing, problems = [], []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.BatchStat)):
        key = ".".join(str(k) for k in path)
        if key not in flat:
            missing.append(key)
            continue
        value = flat.pop(key)
        want = var.get_value()
        if tuple(np.shape(value)) != tuple(want.shape):
            problems.append(f"{key}: checkpoint shape {tuple(np.shape(value))} != model shape {tuple(want.shape)}")
            continue
        var.set_value(jnp.asarray(value, dtype=want.dtype))
    if problems:
        raise ValueError("frozen batch-norm statistics do not match:\n  " + "\n  ".join(problems))
    return missing
