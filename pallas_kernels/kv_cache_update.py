"""Writes a step's new K/V rows into the paged cache, in place.

Token t's rows ``k_new[t]`` / ``v_new[t]`` ([num_kv_heads, head_dim]) go to flat slot
``slot_mapping[t] = page * page_size + offset`` of every KV head; slot -1 (padding) writes nothing.
Slots are expected to be unique among real tokens (the block allocator guarantees it).

"In place" means: when the caller donates the page buffers (the model's jitted step does, or pass
``donate=True`` here) XLA reuses them for the result, so a step costs O(tokens), not O(cache).
The XLA path is one scatter with mode="drop"; the Pallas kernel aliases the page buffers to its
outputs (``input_output_aliases``) and stores only the new rows.

int8 pages: pass ``k_scales`` / ``v_scales`` (float32 [num_kv_heads, num_pages, page_size], one scale per
token per KV head) with int8 pages; every path then quantizes each new row on the way in
(``quantize_kv``: symmetric absmax, ``row ~= q * scale``), writes the int8 row and its scale, and returns
the four updated arrays. Per-token (not per-page) scales make a row's encoding independent of its
neighbours: a page can be filled token by token, and prefix-cached pages stay bit-identical.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend

KV_INT8_MAX = 127.0  # symmetric: codes -127..127 (-128 unused, so negation is exact)


def quantize_kv(x):  # [..., head_dim] float -> (int8 [..., head_dim], float32 [...])
    """Symmetric absmax int8 of every row: x ~= q * scale with |x - q * scale| <= scale / 2.

    One function for every path (reference, XLA, inside the Pallas kernel), so they agree bit for bit.
    Rounds with floor(y + 0.5): Pallas Triton has no round_p lowering. All-zero rows get scale 0.
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / KV_INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.floor(x / safe[..., None] + 0.5), -KV_INT8_MAX, KV_INT8_MAX)
    return q.astype(jnp.int8), scale


def dequantize_kv(q, scale, dtype=jnp.float32):  # int8 [..., head_dim], float32 [...] -> [..., head_dim]
    """q * scale per row (the inverse of quantize_kv, up to its rounding)."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


@dataclasses.dataclass(frozen=True)
class KVCacheUpdateBlockSizes:
    """tokens_per_program: new rows each kernel program writes (one loop iteration per row)."""

    tokens_per_program: int = 16
    num_warps: int = 1

    def __post_init__(self):
        if self.tokens_per_program < 1:
            raise ValueError(f"tokens_per_program={self.tokens_per_program} must be >= 1")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps={self.num_warps} must be a power of two")


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def update_kv_cache_reference(
    k_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    k_new,  # [num_tokens, num_kv_heads, head_dim]
    v_new,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping,  # [num_tokens] int32, -1 = drop
    k_scales=None,  # [num_kv_heads, num_pages, page_size] float32, only with int8 pages
    v_scales=None,
):
    """Compares every cache slot with every token's slot: obviously right, O(tokens x slots)."""
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    slots = jnp.arange(num_pages * page_size)
    hits = slot_mapping[:, None] == slots[None, :]  # [T, slots]; -1 never matches
    written = jnp.any(hits, axis=0)  # [slots]
    writer = jnp.argmax(hits, axis=0)  # token writing each slot (meaningless where not written)

    def apply(pages, new):  # pages [KVH, P, ps, ...], new [T, KVH, ...]
        flat = pages.reshape(num_kv_heads, num_pages * page_size, *pages.shape[3:])
        incoming = jnp.moveaxis(new, 0, 1)[:, writer].astype(pages.dtype)  # [KVH, slots, ...]
        mask = written.reshape((1, -1) + (1,) * (flat.ndim - 2))
        return jnp.where(mask, incoming, flat).reshape(pages.shape)

    if k_scales is None:
        return apply(k_pages, k_new), apply(v_pages, v_new)
    (k_q, k_s), (v_q, v_s) = quantize_kv(k_new), quantize_kv(v_new)
    return apply(k_pages, k_q), apply(v_pages, v_q), apply(k_scales, k_s), apply(v_scales, v_s)


# --------------------------------------------------------------------------------------------
# XLA path
# --------------------------------------------------------------------------------------------
def _update_kv_cache_xla(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales=None, v_scales=None):
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    if slot_mapping.shape[0] == 1:
        # XLA lowers a one-row scatter to a dynamic-update-slice guarded by a whole-pool select (for the
        # drop mode), which copies the pool. A second, dropped row keeps it a real in-place scatter.
        slot_mapping = jnp.pad(slot_mapping, (0, 1), constant_values=-1)
        k_new, v_new = (jnp.pad(x, ((0, 1),) + ((0, 0),) * (x.ndim - 1)) for x in (k_new, v_new))
    # -1 would wrap around to the last page under numpy indexing: send it out of bounds instead.
    page = jnp.where(slot_mapping < 0, num_pages, slot_mapping // page_size)
    offset = slot_mapping % page_size

    def apply(pages, new):  # pages [KVH, P, ps, ...], new [T, KVH, ...]
        # Index the 4-D pool directly: reshaping it flat first makes XLA copy the whole pool.
        return pages.at[:, page, offset].set(jnp.moveaxis(new, 0, 1).astype(pages.dtype), mode="drop")

    if k_scales is None:
        return apply(k_pages, k_new), apply(v_pages, v_new)
    (k_q, k_s), (v_q, v_s) = quantize_kv(k_new), quantize_kv(v_new)
    return apply(k_pages, k_q), apply(v_pages, v_q), apply(k_scales, k_s), apply(v_scales, v_s)


# --------------------------------------------------------------------------------------------
# Pallas kernel
# --------------------------------------------------------------------------------------------
def kv_cache_update_kernel(
    slot_mapping_ref,  # [tokens_per_program] int32
    k_new_ref,  # [tokens_per_program, head_dim] (this program's KV head)
    v_new_ref,  # [tokens_per_program, head_dim]
    *cache_refs,
):
    """cache_refs: the aliased inputs, then the outputs, each (k_pages, v_pages) [num_pages, page_size,
    head_dim], followed for int8 pages by (k_scales, v_scales) [num_pages, page_size]."""
    # The inputs are the same buffers as the outputs; only new rows are stored.
    out_refs = cache_refs[len(cache_refs) // 2:]
    k_pages_ref, v_pages_ref = out_refs[:2]
    quantized = len(out_refs) == 4
    tokens_per_program = slot_mapping_ref.shape[0]
    page_size = k_pages_ref.shape[1]

    def write_row(i, carry):
        slot = slot_mapping_ref[i]

        @pl.when(slot >= 0)
        def _():
            page, offset = slot // page_size, slot % page_size
            if quantized:  # quantize in registers: the float row never reaches the cache
                k_scales_ref, v_scales_ref = out_refs[2:]
                k_q, k_s = quantize_kv(k_new_ref[i, :])
                v_q, v_s = quantize_kv(v_new_ref[i, :])
                k_pages_ref[page, offset, :] = k_q
                v_pages_ref[page, offset, :] = v_q
                k_scales_ref[page, offset] = k_s
                v_scales_ref[page, offset] = v_s
            else:
                k_pages_ref[page, offset, :] = k_new_ref[i, :].astype(k_pages_ref.dtype)
                v_pages_ref[page, offset, :] = v_new_ref[i, :].astype(v_pages_ref.dtype)

        return carry

    lax.fori_loop(0, tokens_per_program, write_row, 0)


def _update_kv_cache_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales=None, v_scales=None, *,
                            block_sizes, interpret, lowering):
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_tokens = k_new.shape[0]
    tokens_per_program = min(block_sizes.tokens_per_program, num_tokens)
    padded = pl.cdiv(num_tokens, tokens_per_program) * tokens_per_program
    if padded != num_tokens:  # padding rows are dropped like any other slot -1
        slot_mapping = jnp.pad(slot_mapping, (0, padded - num_tokens), constant_values=-1)
        k_new = jnp.pad(k_new, ((0, padded - num_tokens), (0, 0), (0, 0)))
        v_new = jnp.pad(v_new, ((0, padded - num_tokens), (0, 0), (0, 0)))

    cache = [k_pages, v_pages] + ([] if k_scales is None else [k_scales, v_scales])
    pages_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda h, i: (h, 0, 0, 0))
    scales_spec = pl.BlockSpec((None, num_pages, page_size), lambda h, i: (h, 0, 0))
    cache_specs = [pages_spec, pages_spec, scales_spec, scales_spec][:len(cache)]
    rows_spec = pl.BlockSpec((tokens_per_program, None, head_dim), lambda h, i: (i, h, 0))
    return pl.pallas_call(
        kv_cache_update_kernel,
        grid=(num_kv_heads, padded // tokens_per_program),
        in_specs=[
            pl.BlockSpec((tokens_per_program,), lambda h, i: (i,)),  # slot_mapping
            rows_spec,  # k_new
            rows_spec,  # v_new
            *cache_specs,  # k_pages, v_pages[, k_scales, v_scales] (aliased)
        ],
        out_specs=cache_specs,
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in cache],
        input_output_aliases={3 + j: j for j in range(len(cache))},
        interpret=interpret,
        compiler_params=None if interpret else backend.gpu_compiler_params(
            lowering, num_warps=block_sizes.num_warps, num_stages=1),
        name=f"kv_cache_update_{tokens_per_program=}" + ("_int8" if k_scales is not None else ""),
    )(slot_mapping, k_new, v_new, *cache)


# --------------------------------------------------------------------------------------------
# Public wrapper
# --------------------------------------------------------------------------------------------
def _validate(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales):
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages.shape={k_pages.shape} must be [num_kv_heads, num_pages, page_size, head_dim]")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages.shape={v_pages.shape} must equal k_pages.shape={k_pages.shape}")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages.dtype={k_pages.dtype} must equal v_pages.dtype={v_pages.dtype}")
    num_kv_heads, _, _, head_dim = k_pages.shape
    if k_new.ndim != 3 or k_new.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k_new.shape={k_new.shape} must be [num_tokens, {num_kv_heads}, {head_dim}] "
                         f"for k_pages.shape={k_pages.shape}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new.shape={v_new.shape} must equal k_new.shape={k_new.shape}")
    if slot_mapping.shape != (k_new.shape[0],):
        raise ValueError(f"slot_mapping.shape={slot_mapping.shape} must be ({k_new.shape[0]},) (one slot per token)")
    if slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping.dtype={slot_mapping.dtype} must be int32")
    for name, dtype in (("k_new", k_new.dtype), ("v_new", v_new.dtype)):
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={dtype} must be a floating point type")
    check_kv_scales(k_pages, k_scales, v_scales)


def check_kv_scales(k_pages, k_scales, v_scales):
    """int8 pages need both scale arrays [KVH, P, ps] float32; float pages take none."""
    if (k_scales is None) != (v_scales is None):
        raise ValueError("pass both k_scales and v_scales (int8 pages) or neither (float pages)")
    if k_scales is None:
        if not jnp.issubdtype(k_pages.dtype, jnp.floating):
            raise ValueError(f"k_pages.dtype={k_pages.dtype} must be a floating point type "
                             f"(or int8 with k_scales/v_scales)")
        return
    if k_pages.dtype != jnp.int8:
        raise ValueError(f"k_scales/v_scales given but k_pages.dtype={k_pages.dtype}: scales go with int8 pages")
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if scales.shape != k_pages.shape[:3]:
            raise ValueError(f"{name}.shape={scales.shape} must be {k_pages.shape[:3]} "
                             f"([num_kv_heads, num_pages, page_size] of k_pages.shape={k_pages.shape})")
        if scales.dtype != jnp.float32:
            raise ValueError(f"{name}.dtype={scales.dtype} must be float32")


def _update_kv_cache_impl(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales, *, impl, block_sizes,
                          lowering):
    args = (k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales)
    if impl == "reference":
        return update_kv_cache_reference(*args)
    if impl == "xla":
        return _update_kv_cache_xla(*args)
    return tuple(_update_kv_cache_pallas(*args, block_sizes=block_sizes, interpret=impl == "pallas_interpret",
                                         lowering=lowering))


_STATIC = ("impl", "block_sizes", "lowering")
_update_kv_cache_jit = jax.jit(_update_kv_cache_impl, static_argnames=_STATIC)
_update_kv_cache_donating_jit = jax.jit(_update_kv_cache_impl, static_argnames=_STATIC,
                                        donate_argnums=(0, 1, 5, 6))


def update_kv_cache(
    k_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    k_new,  # [num_tokens, num_kv_heads, head_dim]
    v_new,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping,  # [num_tokens] int32: page * page_size + offset, -1 = drop
    impl: str = "auto",
    *,
    k_scales=None,  # [num_kv_heads, num_pages, page_size] float32: with int8 pages only
    v_scales=None,  # [num_kv_heads, num_pages, page_size] float32
    donate: bool = False,
    block_sizes: KVCacheUpdateBlockSizes | None = None,
    lowering: str | None = None,
) -> tuple[jax.Array, ...]:  # (k_pages, v_pages), or (k_pages, v_pages, k_scales, v_scales) for int8 pages
    """Scatters new K/V rows into their cache slots; returns the updated (k_pages, v_pages).

    With int8 pages and k_scales/v_scales, the rows are quantized per token and head (``quantize_kv``)
    and the updated (k_pages, v_pages, k_scales, v_scales) are returned.
    Inside a jitted step whose cache argument is donated the update happens in place. Called
    eagerly, ``donate=True`` hands the cache arrays over (they are deleted) to get the same.
    """
    impl = backend.resolve_impl(impl)
    _validate(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales)
    if block_sizes is None:
        block_sizes = KVCacheUpdateBlockSizes()
    lowering = backend.kernel_lowering(impl, lowering, "update_kv_cache")
    fn = _update_kv_cache_donating_jit if donate else _update_kv_cache_jit
    return fn(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales, impl=impl, block_sizes=block_sizes,
              lowering=lowering)
