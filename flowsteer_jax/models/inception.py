"""pytorch-fid's FID InceptionV3 up to the pool3 features (2048-d) as a Flax NNX module.

`pytorch_fid.inception.InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True,
use_fid_inception=True)`: bilinear resize to 299x299 (torch's `F.interpolate(align_corners=False)`, no
antialiasing), `2x - 1`, torchvision's Inception3 stem and Mixed blocks with pytorch-fid's patches (FIDInceptionA/C/
E_1 average-pool without counting the padding, FIDInceptionE_2 max-pools), and the global average pool. Images are
NHWC in [0, 1] here; torch takes NCHW. Attribute names mirror the torch module names (`Mixed_5b.branch1x1.conv`,
`.bn`) and the conv shapes come from `conversion.inception`, so the weights load through its key table.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion import inception as inception_conv
from conversion.inception import Conv

# Convolutions in full float32 on every platform: FID compares against published statistics, and TF32/bf16 passes
# on GPU/TPU would shift the features.
PRECISION = jax.lax.Precision.HIGHEST


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d: conv without bias, BatchNorm (eps 0.001, running statistics), ReLU."""

    def __init__(self, spec: Conv, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        (ph, pw), s = spec.padding, spec.stride
        self.conv = nnx.Conv(
            spec.cin,
            spec.cout,
            kernel_size=spec.kernel,
            strides=(s, s),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=PRECISION,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            spec.cout,
            use_running_average=True,
            epsilon=inception_conv.BN_EPS,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool, floor mode, padding never wins (torch's `max_pool2d`)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 / 1 average pool with padding 1 and `count_include_pad=False`: each window's mean over its real pixels
    (TensorFlow's pooling, which pytorch-fid's FID blocks restore)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, window, strides, pad)
    return total / count


class MixedBlock(nnx.Module):
    """One Mixed block: kind A/C/E_1/E_2 (pytorch-fid's FIDInception*) or B/D (torchvision's InceptionB/D).

    The branches are attributes named as in torchvision; their outputs concatenate on channels in torch's order.
    """

    def __init__(self, kind: str, cin: int, arg: int | None, **kw):
        self.kind = kind
        for name, spec in inception_conv.mixed_convs(kind, cin, arg).items():
            setattr(self, name, BasicConv2d(spec, **kw))

    def _chain(self, x: jax.Array, *names: str) -> jax.Array:
        for name in names:
            x = getattr(self, name)(x)
        return x

    def _pool_branch(self, x: jax.Array) -> jax.Array:
        pooled = max_pool(x, 1, 1) if self.kind == "E_2" else avg_pool_exclude_pad(x)
        return self.branch_pool(pooled)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self._chain
        if self.kind == "A":
            outs = [
                c(x, "branch1x1"),
                c(x, "branch5x5_1", "branch5x5_2"),
                c(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                self._pool_branch(x),
            ]
        elif self.kind == "B":
            outs = [
                c(x, "branch3x3"),
                c(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                max_pool(x, 2),
            ]
        elif self.kind == "C":
            outs = [
                c(x, "branch1x1"),
                c(x, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
                c(x, *(f"branch7x7dbl_{i}" for i in range(1, 6))),
                self._pool_branch(x),
            ]
        elif self.kind == "D":
            outs = [
                c(x, "branch3x3_1", "branch3x3_2"),
                c(x, *(f"branch7x7x3_{i}" for i in range(1, 5))),
                max_pool(x, 2),
            ]
        else:  # E_1, E_2
            b3 = self.branch3x3_1(x)
            d3 = c(x, "branch3x3dbl_1", "branch3x3dbl_2")
            outs = [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d3),
                self.branch3x3dbl_3b(d3),
                self._pool_branch(x),
            ]
        return jnp.concatenate(outs, axis=-1)


@lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch's CPU `upsample_bilinear2d` along one axis (align_corners=False, no antialias).

    torch's float32 arithmetic, bit for bit: `scale = float(in) / out`, `src = max(scale * (dst + 0.5) - 0.5, 0)`
    with the multiply-subtract fused (its x86 build contracts it to an FMA; the float64 product of two float32s is
    exact, so one rounding to float32 is the FMA), `i0 = floor(src)`, `lambda = src - i0`, weights `1 - lambda`
    and `lambda` on `i0` and `min(i0 + 1, in - 1)`. Separate roundings would move the weights by up to 16 ulps.
    A matrix rather than `jax.image.resize`, which antialiases (a wider triangle kernel) when it downsamples.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(f32), f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1))
    i1 = np.minimum(i0 + 1, in_size - 1)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), f32(1) - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC images -> `size` (H, W) as torch's `F.interpolate(mode="bilinear", align_corners=False)`."""
    _, h, w, _ = images.shape
    rh = jnp.asarray(bilinear_matrix(h, size[0]))
    rw = jnp.asarray(bilinear_matrix(w, size[1]))
    x = jnp.einsum("oh,bhwc->bowc", rh, images.astype(jnp.float32), precision=PRECISION)
    return jnp.einsum("pw,bowc->bopc", rw, x, precision=PRECISION)


class InceptionV3(nnx.Module):
    """pytorch-fid's InceptionV3 (`output_blocks=[3]`): `model(images)` -> (B, 2048) pool3 features.

    `images`: NHWC in [0, 1], any size (resized to 299x299). `features_299(x)` takes images already resized and
    scaled to [-1, 1]; `__call__` = `features_299(2 * resize_bilinear(images) - 1)`.
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype | None = None) -> None:
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)
        self.dtype = dtype
        for name, spec in inception_conv.STEM.items():
            setattr(self, name, BasicConv2d(spec, **kw))
        for name, kind, cin, arg in inception_conv.MIXED:
            setattr(self, name, MixedBlock(kind, cin, arg, **kw))

    def features_299(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool(x, 2)
        for name, *_ in inception_conv.MIXED:
            x = getattr(self, name)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))

    def __call__(self, images: jax.Array) -> jax.Array:
        x = resize_bilinear(images, (inception_conv.RESIZE, inception_conv.RESIZE))
        return self.features_299(2 * x - 1)


def load_inception(path_safetensors: str, dtype: jnp.dtype = jnp.float32) -> InceptionV3:
    """The FID InceptionV3 with its weights from the `.safetensors` conversion of pytorch-fid's
    `pt_inception-2015-12-05-6726825d.pth` (`conversion.torch_files`). Strict: one ConversionError names every
    unknown, missing or mis-shaped key (`fc.*` and `num_batches_tracked` are skipped by name)."""
    ckpt = inception_conv.open_weights(path_safetensors)
    table = inception_conv.param_table()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), dtype=dtype)))
    variables = dict(nnx.to_flat_state(state))
    unfilled = sorted(".".join(map(str, p)) for p in set(variables) - {e.flax_path for e in table})
    if unfilled:  # a variable no tensor fills would silently keep its init
        raise ValueError(f"InceptionV3 variables with no checkpoint entry: {unfilled}")
    for entry in table:
        value = np.asarray(entry.to_flax(ckpt.load(entry.torch_key))).astype(dtype, copy=False)
        variables[entry.flax_path].set_value(jnp.asarray(value))
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


def jit_forward(model: InceptionV3, *, resize: bool = True) -> Callable[[jax.Array], jax.Array]:
    """A jitted `images -> (B, 2048)` over `model`'s current weights (split once, not traversed per call).

    `resize=False` jits `features_299` alone (inputs already 299x299 in [-1, 1]): one compile per batch shape.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state: nnx.State, x: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, state)
        return m(x) if resize else m.features_299(x)

    return lambda x: forward(state, x)
