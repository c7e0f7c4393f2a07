"""Full bidirectional attention through the Pallas TPU splash (flash) attention kernel.

On TPU, XLA's attention materialises the `(T, T)` logits per head; at SD3's 4096 + 333 tokens that dominates memory
and time. Splash attention is blockwise (online softmax), so it never does, and it has its own backward kernels.

Splash needs sequence lengths that its blocks divide, but SD3's joint length is odd (e.g. 4429). We zero-pad to a
multiple of the block and keep the padding exact with segment ids: real tokens are segment 0 and padded ones
segment 1, so real queries never see padded keys. Padded queries (sliced off afterwards) see only padded keys, or
none when only q is padded; splash then averages over its masked logits, so their rows and gradients stay finite.

Run it at the default matmul precision: a process-wide "highest" asks Mosaic for fp32 products of bf16 operands,
which it cannot lower (tests/test_chips.py sets "default" around its TPU compile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

BATCH_AXES, HEAD_AXIS = ("data", "fsdp"), "tensor"


def _pad_and_segments(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Zero-pads `(B, T, N, H)` along T to a multiple of `block`; segment ids mark the padding."""
    t = x.shape[1]
    padded = -(-t // block) * block
    x = jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
    return x, (jnp.arange(padded) >= t).astype(jnp.int32)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, *, block: int, interpret: bool) -> jax.Array:
    """Unscaled attention on (local) `(B, T, N, H)` arrays, batch vmapped over the per-example kernel."""
    tq, heads = q.shape[1], q.shape[2]
    (q, q_seg), (k, kv_seg), (v, _) = (_pad_and_segments(x, block) for x in (q, k, v))
    # Built per call from local shapes, so inside shard_map it sees only this device's heads; the mask
    # processing is lru-cached on the (hashable) mask, so retracing is cheap.
    mask = mask_lib.MultiHeadMask(tuple(mask_lib.FullMask((q.shape[1], k.shape[1])) for _ in range(heads)))
    blocks = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    segment_ids = splash.SegmentIds(q=q_seg, kv=kv_seg)
    per_example = lambda q, k, v: kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), segment_ids)  # noqa: E731
    return jax.vmap(per_example)(q, k, v).swapaxes(1, 2)[:, :tq]


def _shard_axes(mesh: jax.sharding.AbstractMesh, names: tuple[str, ...], dim: int) -> tuple[str, ...]:
    """The mesh axes among `names` (> 1 device) whose combined size divides `dim`."""
    axes, size = [], 1
    for name in names:
        n = mesh.shape.get(name, 1)
        if n > 1 and dim % (size * n) == 0:
            axes.append(name)
            size *= n
    return tuple(axes)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
    block: int = 128,
) -> jax.Array:
    """Unmasked, non-causal attention with `jax.nn.dot_product_attention`'s `(B, T, N, H)` layout, via splash.

    `scale` defaults to `H ** -0.5`. `interpret=True` runs the Pallas kernels in interpret mode (CPU tests); on TPU
    leave it False. `block` is every splash block size; T is padded up to a multiple of it. Under `jax.set_mesh`
    with more than one device, runs in `shard_map` with batch over ("data", "fsdp") and heads over "tensor" (the
    axes that divide them); the sequence is never sharded, since every query needs every key.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Splash has no scale argument; scaling q is the same math and differentiates through it.
    q = q * jnp.asarray(scale, q.dtype)
    fn = lambda q, k, v: _splash(q, k, v, block=block, interpret=interpret).astype(v.dtype)  # noqa: E731
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v)
    batch = _shard_axes(mesh, BATCH_AXES, q.shape[0]) or None
    heads = _shard_axes(mesh, (HEAD_AXIS,), q.shape[2]) or None
    spec = P(batch, None, heads, None)
    if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        # Explicit-sharding shard_map takes its inputs as they are laid out; Auto meshes reshard implicitly.
        q, k, v = (jax.reshard(x, spec) for x in (q, k, v))
    # check_vma=False: splash's pallas_call output shapes declare no varying manual axes, which check_vma requires.
    return jax.shard_map(fn, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
