"""Flash attention for prefill on padded dense batches (causal, GQA, per-sequence lengths).

Sequence b has ``q_lens[b]`` real queries and ``kv_lens[b]`` real keys; query i sits at absolute
position ``kv_lens[b] - q_lens[b] + i`` (so a plain prefill has q_len == kv_len and a chunked
prefill continues after an existing prefix) and, when causal, attends to key positions
``0..that position``. Rows past ``q_lens[b]`` come out as zeros. Query head h reads KV head
``h // (num_heads // num_kv_heads)``.

Implementations (see ``backend.py``): a float32 reference, an XLA path tiled over query and key
blocks with an online softmax (the score matrix only ever exists one tile at a time), and a
Pallas kernel with the same tiling, shaped for Hopper: one program per (KV head, query block,
sequence) whose score-tile rows are (token, query head) pairs of one GQA group, so each K/V tile
is loaded once for the group; 128-row tiles with 8 warps and 3 stages (bf16); the causal mask
only on the diagonal and kv_len-tail key blocks. ``flash_attention_mosaic.py`` holds the Mosaic
GPU version (``lowering="mosaic"``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend

# Finite "minus infinity": exp(MASK_VALUE - m) underflows to 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class FlashAttentionBlockSizes:
    """Tile sizes of the Pallas kernel and its launch shape.

    block_q is the number of rows of the score tile: (query token, query head) pairs, since the
    heads of a GQA group share one program and its K/V tiles (block_q // heads tokens per program).
    block_k keys are streamed per step. The kernel shrinks a block to the (power-of-two-rounded)
    sequence length when the sequence is shorter, so small inputs do not pay for a large tile.
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not backend.is_power_of_two(value):
                raise ValueError(f"{name}={value} must be a power of two")
            if value < 16:
                raise ValueError(f"{name}={value} must be >= 16 (the smallest Triton dot tile)")
        if not backend.is_power_of_two(self.num_warps):
            raise ValueError(f"num_warps={self.num_warps} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")

    @classmethod
    def for_head_dim(cls, head_dim: int, dtype) -> FlashAttentionBlockSizes:
        """Hopper tiles (checked for spills, shared memory and wgmma by compiling for sm_90)."""
        if jnp.dtype(dtype) == jnp.float32:  # IEEE f32 dots (no wgmma): tiles small enough not to spill
            if head_dim <= 64:
                return cls(block_q=64, block_k=32, num_warps=8, num_stages=2)
            return cls(block_q=16, block_k=16, num_warps=4, num_stages=1)
        if head_dim <= 64:
            return cls(block_q=128, block_k=128, num_warps=8, num_stages=2)
        return cls(block_q=128, block_k=64, num_warps=8, num_stages=3)


# XLA path tiles (it runs on CPU): the score tile is batch * heads * XLA_BLOCK_Q * XLA_BLOCK_K floats.
# Small enough to stay in cache and to skip most masked work under the causal mask; measured 3-4x
# faster than 256 x 512 for 512-1024 token prefills.
XLA_BLOCK_Q = 64
XLA_BLOCK_K = 256


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def flash_attention_reference(
    q,  # [batch, q_len, num_heads, head_dim]
    k,  # [batch, kv_len, num_kv_heads, head_dim]
    v,  # [batch, kv_len, num_kv_heads, head_dim]
    q_lens,  # [batch] int32
    kv_lens,  # [batch] int32
    *,
    causal: bool,
    sm_scale: float,
):
    """Materialises the full [batch, heads, q_len, kv_len] score matrix in float32."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    qf = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32)) * sm_scale

    q_positions = (kv_lens - q_lens)[:, None] + jnp.arange(q_len)[None, :]  # [batch, q_len]
    kv_positions = jnp.arange(kv_len)
    allowed = kv_positions[None, None, :] < kv_lens[:, None, None]  # [batch, 1, kv_len]
    if causal:
        allowed = allowed & (kv_positions[None, None, :] <= q_positions[:, :, None])
    allowed = allowed[:, None, None, :, :]  # [batch, 1, 1, q_len, kv_len]

    scores = jnp.where(allowed, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(allowed, jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v.astype(jnp.float32))
    out = out.reshape(batch, q_len, num_heads, head_dim)
    valid_row = jnp.arange(q_len)[None, :] < q_lens[:, None]
    return jnp.where(valid_row[:, :, None, None], out, 0.0).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# XLA (CPU) path
# --------------------------------------------------------------------------------------------
def _flash_attention_xla(q, k, v, q_lens, kv_lens, *, causal, sm_scale, block_q, block_k):
    """Query blocks mapped one after another; each runs an online softmax over key blocks.

    Key blocks past the last key any query of the block may see (causal) or past the longest
    sequence are never visited.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    block_q = min(block_q, q_len)
    block_k = min(block_k, kv_len)
    num_q_blocks = pl.cdiv(q_len, block_q)
    num_k_blocks = pl.cdiv(kv_len, block_k)
    q = jnp.pad(q, ((0, 0), (0, num_q_blocks * block_q - q_len), (0, 0), (0, 0)))
    kv_pad = ((0, 0), (0, num_k_blocks * block_k - kv_len), (0, 0), (0, 0))
    k, v = jnp.pad(k, kv_pad), jnp.pad(v, kv_pad)
    q_blocks = q.reshape(batch, num_q_blocks, block_q, num_kv_heads, group, head_dim)
    first_q_position = kv_lens - q_lens  # [batch]

    def one_query_block(qi):
        q_block = q_blocks[:, qi].astype(jnp.float32) * sm_scale  # [batch, block_q, KVH, group, hd]
        rows = qi * block_q + jnp.arange(block_q)
        q_positions = first_q_position[:, None] + rows[None, :]  # [batch, block_q]
        if causal:  # the last row of the block sees the most keys
            keys_needed = jnp.minimum(kv_lens, first_q_position + (qi + 1) * block_q)
        else:
            keys_needed = kv_lens
        # Sequences whose rows in this block are all padding need no keys.
        keys_needed = jnp.max(jnp.where(qi * block_q < q_lens, keys_needed, 0))
        num_blocks = jnp.clip(pl.cdiv(keys_needed, block_k), 0, num_k_blocks)

        def key_block(kj, carry):
            acc, row_max, row_sum = carry
            k_block = lax.dynamic_slice_in_dim(k, kj * block_k, block_k, axis=1).astype(jnp.float32)
            v_block = lax.dynamic_slice_in_dim(v, kj * block_k, block_k, axis=1).astype(jnp.float32)
            scores = jnp.einsum("bqhgd,bkhd->bhgqk", q_block, k_block)
            kv_positions = kj * block_k + jnp.arange(block_k)
            allowed = kv_positions[None, None, :] < kv_lens[:, None, None]  # [batch, 1, block_k]
            if causal:
                allowed = allowed & (kv_positions[None, None, :] <= q_positions[:, :, None])
            allowed = allowed[:, None, None]  # [batch, 1, 1, block_q, block_k]
            scores = jnp.where(allowed, scores, MASK_VALUE)
            new_max = jnp.maximum(row_max, scores.max(axis=-1))
            correction = jnp.exp(row_max - new_max)
            probs = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
            row_sum = row_sum * correction + probs.sum(axis=-1)
            acc = acc * correction[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", probs, v_block)
            return acc, new_max, row_sum

        stats_shape = (batch, num_kv_heads, group, block_q)
        init = (
            jnp.zeros(stats_shape + (head_dim,), jnp.float32),
            jnp.full(stats_shape, MASK_VALUE, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
        )
        acc, _, row_sum = lax.fori_loop(0, num_blocks, key_block, init)
        out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
        out = jnp.transpose(out, (0, 3, 1, 2, 4))  # [batch, block_q, KVH, group, hd]
        valid_row = rows[None, :] < q_lens[:, None]
        return jnp.where(valid_row[:, :, None, None, None], out, 0.0).astype(q.dtype)

    out = lax.map(one_query_block, jnp.arange(num_q_blocks))  # [nq, batch, block_q, KVH, group, hd]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_q_blocks * block_q, num_heads, head_dim)
    return out[:, :q_len]


# --------------------------------------------------------------------------------------------
# Pallas kernel (Triton lowering)
# --------------------------------------------------------------------------------------------
def _heads_per_program(group: int, block_q: int) -> int:
    """Query heads of one GQA group that share a program (and its K/V tiles).

    The largest power of two dividing the group (Triton tiles are powers of two), at most block_q.
    A group of 3 is not padded to 4: at a fixed row tile the K/V bytes streamed per row are the same
    either way, and padding would spend a quarter of the tensor-core work on rows thrown away.
    """
    heads = group & -group
    while heads > block_q:
        heads //= 2
    return heads


def _online_softmax_step(q, k, v, carry, *, scale_log2, precision, allowed=None):
    """One key block of the online softmax in base 2; ``allowed`` is None on unmasked blocks."""
    acc, row_max, row_sum = carry
    scores = jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32) * scale_log2
    if allowed is not None:
        scores = jnp.where(allowed, scores, MASK_VALUE)
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
    correction = jnp.exp2(row_max - new_max)
    probs = jnp.exp2(scores - new_max[:, None])
    if allowed is not None:  # a row with no allowed key yet has new_max == MASK_VALUE: exp2(0) == 1
        probs = jnp.where(allowed, probs, 0.0)
    row_sum = row_sum * correction + jnp.sum(probs, axis=1)
    pv = jnp.dot(probs.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    return acc * correction[:, None] + pv, new_max, row_sum


def flash_attention_kernel(
    q_lens_ref,  # [1] int32: this sequence's query count
    kv_lens_ref,  # [1] int32: this sequence's key count
    q_ref,  # [block_tokens, heads_per_program, head_dim]
    k_ref,  # [padded_kv_len, head_dim] (this program's KV head)
    v_ref,  # [padded_kv_len, head_dim]
    o_ref,  # [block_tokens, heads_per_program, head_dim]
    *,
    sm_scale: float,
    causal: bool,
    block_k: int,
    num_q_blocks: int,
):
    """Rows of the score tile are (token, head) pairs, so a GQA group's heads share each K/V tile.

    Key blocks every row sees in full run without a mask; only the diagonal and the kv_len tail
    are masked, and blocks past the block's last visible key are never visited.
    """
    block_tokens, heads, head_dim = q_ref.shape
    rows = block_tokens * heads
    # Heaviest (last) query blocks launch first so the causal tail does not straggle.
    q_block_index = num_q_blocks - 1 - pl.program_id(1)
    q_len = q_lens_ref[0]
    kv_len = kv_lens_ref[0]
    # f32 dots must not silently drop to TF32 on the Triton lowering.
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    first_token = q_block_index * block_tokens
    first_position = kv_len - q_len + first_token  # absolute position of the block's first query
    row_positions = first_position + jnp.arange(rows) // heads  # [rows]
    if causal:
        keys_needed = jnp.minimum(kv_len, first_position + block_tokens)
        full_blocks = (first_position + 1) // block_k  # blocks ending at or before the first query
    else:
        keys_needed = kv_len
        full_blocks = kv_len
    # A block made only of padding rows visits nothing.
    keys_needed = jnp.where(first_token < q_len, jnp.maximum(keys_needed, 0), 0)
    num_key_blocks = pl.cdiv(keys_needed, block_k)
    full_blocks = jnp.clip(full_blocks, 0, jnp.minimum(kv_len // block_k, num_key_blocks))

    q = q_ref[...].reshape(rows, head_dim)
    step = functools.partial(_online_softmax_step, q, scale_log2=sm_scale * math.log2(math.e),
                             precision=precision)

    def load(kj):
        start = pl.multiple_of(kj * block_k, block_k)
        return start, k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :]

    def full_block(kj, carry):
        _, k, v = load(kj)
        return step(k, v, carry)

    def masked_block(kj, carry):
        start, k, v = load(kj)
        kv_positions = start + jnp.arange(block_k)
        allowed = kv_positions[None, :] < kv_len
        if causal:
            allowed = allowed & (kv_positions[None, :] <= row_positions[:, None])
        return step(k, v, carry, allowed=allowed)

    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    carry = lax.fori_loop(0, full_blocks, full_block, carry)
    acc, _, row_sum = lax.fori_loop(full_blocks, num_key_blocks, masked_block, carry)
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]
    out = jnp.where((first_token + jnp.arange(rows) // heads < q_len)[:, None], out, 0.0)
    o_ref[...] = out.reshape(block_tokens, heads, head_dim).astype(o_ref.dtype)


def _flash_attention_pallas(q, k, v, q_lens, kv_lens, *, causal, sm_scale, block_sizes, interpret, lowering):
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    heads = _heads_per_program(group, block_sizes.block_q)
    head_blocks = group // heads
    # Shrink tiles for short inputs but keep >= 16 rows and keys, the smallest Triton dot tile.
    block_tokens = min(block_sizes.block_q // heads, backend.next_power_of_two(q_len))
    block_tokens = max(block_tokens, 16 // heads)
    block_k = min(block_sizes.block_k, max(16, backend.next_power_of_two(kv_len)))
    padded_q_len = backend.round_up(q_len, block_tokens)
    padded_kv_len = backend.round_up(kv_len, block_k)
    if padded_q_len != q_len:
        q = jnp.pad(q, ((0, 0), (0, padded_q_len - q_len), (0, 0), (0, 0)))
    if padded_kv_len != kv_len:
        kv_pad = ((0, 0), (0, padded_kv_len - kv_len), (0, 0), (0, 0))
        k, v = jnp.pad(k, kv_pad), jnp.pad(v, kv_pad)
    q = q.reshape(batch, padded_q_len, num_kv_heads, group, head_dim)  # free: heads of a group are adjacent

    num_q_blocks = padded_q_len // block_tokens
    kernel = functools.partial(flash_attention_kernel, sm_scale=sm_scale, causal=causal, block_k=block_k,
                               num_q_blocks=num_q_blocks)
    # Grid (head block, query block, batch): the first axis varies fastest on launch.
    grid = (num_kv_heads * head_blocks, num_q_blocks, batch)

    def q_index(h, i, b):
        return b, num_q_blocks - 1 - i, h // head_blocks, h % head_blocks, 0

    def kv_index(h, i, b):
        return b, 0, h // head_blocks, 0

    q_spec = pl.BlockSpec((None, block_tokens, None, heads, head_dim), q_index)
    kv_spec = pl.BlockSpec((None, padded_kv_len, None, head_dim), kv_index)
    lens_spec = pl.BlockSpec((1,), lambda h, i, b: (b,))
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[lens_spec, lens_spec, q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        compiler_params=None if interpret else backend.gpu_compiler_params(
            lowering, num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        name=f"flash_attention_rows{block_tokens * heads}_{block_k=}",
    )(q_lens, kv_lens, q, k, v)
    return out.reshape(batch, padded_q_len, num_heads, head_dim)[:, :q_len]


# --------------------------------------------------------------------------------------------
# Public wrapper
# --------------------------------------------------------------------------------------------
def _validate(q, k, v, q_lens, kv_lens, impl):
    if q.ndim != 4:
        raise ValueError(f"q.shape={q.shape} must be [batch, q_len, num_heads, head_dim]")
    if k.ndim != 4:
        raise ValueError(f"k.shape={k.shape} must be [batch, kv_len, num_kv_heads, head_dim]")
    if v.shape != k.shape:
        raise ValueError(f"v.shape={v.shape} must equal k.shape={k.shape}")
    batch, _, num_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k.shape={k.shape} does not match q.shape={q.shape} in batch or head_dim")
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    for name, dtype in (("q", q.dtype), ("k", k.dtype), ("v", v.dtype)):
        if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"{name}.dtype={dtype} must be float32, bfloat16 or float16")
    if k.dtype != v.dtype:
        raise ValueError(f"k.dtype={k.dtype} must equal v.dtype={v.dtype}")
    for name, lens in (("q_lens", q_lens), ("kv_lens", kv_lens)):
        if lens.shape != (batch,):
            raise ValueError(f"{name}.shape={lens.shape} must be ({batch},) (one length per sequence)")
        if lens.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype={lens.dtype} must be int32")
    if impl == "pallas" and not (backend.is_power_of_two(head_dim) and head_dim >= 16):
        raise ValueError(f"head_dim={head_dim} must be a power of two >= 16 for the Pallas GPU kernel")


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "impl", "block_sizes", "lowering"))
def _flash_attention_jit(q, k, v, q_lens, kv_lens, *, causal, sm_scale, impl, block_sizes, lowering):
    if impl == "reference":
        return flash_attention_reference(q, k, v, q_lens, kv_lens, causal=causal, sm_scale=sm_scale)
    if impl == "xla":
        return _flash_attention_xla(q, k, v, q_lens, kv_lens, causal=causal, sm_scale=sm_scale,
                                    block_q=XLA_BLOCK_Q, block_k=XLA_BLOCK_K)
    if k.dtype != q.dtype:  # the kernel's dots need one element type
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    if lowering == "mosaic":
        from pallas_kernels.flash_attention_mosaic import flash_attention_mosaic

        return flash_attention_mosaic(q, k, v, q_lens, kv_lens, causal=causal, sm_scale=sm_scale,
                                      block_sizes=block_sizes)
    return _flash_attention_pallas(q, k, v, q_lens, kv_lens, causal=causal, sm_scale=sm_scale,
                                   block_sizes=block_sizes, interpret=impl == "pallas_interpret",
                                   lowering=lowering)


def flash_attention(
    q,  # [batch, q_len, num_heads, head_dim]
    k,  # [batch, kv_len, num_kv_heads, head_dim]
    v,  # [batch, kv_len, num_kv_heads, head_dim]
    q_lens,  # [batch] int32
    kv_lens,  # [batch] int32
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    impl: str = "auto",
    block_sizes: FlashAttentionBlockSizes | None = None,
    lowering: str | None = None,
) -> jax.Array:  # [batch, q_len, num_heads, head_dim], dtype of q
    """Attention of padded dense batches; query i of sequence b sits at kv_lens[b] - q_lens[b] + i.

    sm_scale defaults to 1/sqrt(head_dim). ``lowering`` ("triton" | "mosaic", default from
    $RIDGELINE_PALLAS_LOWERING) only matters for impl="pallas"; "mosaic" (opt-in) takes bf16/f16
    with head_dim 64 or 128 and block sizes as ``flash_attention_mosaic.validate_block_sizes`` says.
    """
    impl = backend.resolve_impl(impl)
    _validate(q, k, v, q_lens, kv_lens, impl)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    lowering = backend.kernel_lowering(impl, lowering, "flash_attention", implemented=("triton", "mosaic"))
    if lowering == "mosaic":  # imported only when chosen: CPU installs never load Mosaic GPU
        from pallas_kernels import flash_attention_mosaic

        if block_sizes is None:
            block_sizes = flash_attention_mosaic.default_block_sizes(q.shape[-1])
        flash_attention_mosaic.validate_block_sizes(block_sizes, q.shape[-1], q.dtype)
    elif block_sizes is None:
        block_sizes = FlashAttentionBlockSizes.for_head_dim(q.shape[-1], q.dtype)
    return _flash_attention_jit(q, k, v, q_lens, kv_lens, causal=causal, sm_scale=float(sm_scale),
                                impl=impl, block_sizes=block_sizes, lowering=lowering)
