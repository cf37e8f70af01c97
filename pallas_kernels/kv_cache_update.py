"""Writes a step's new K/V rows into the paged cache, in place.

Token t's rows ``k_new[t]`` / ``v_new[t]`` ([num_kv_heads, head_dim]) go to flat slot
``slot_mapping[t] = page * page_size + offset`` of every KV head; slot -1 (padding) writes nothing.
Slots are expected to be unique among real tokens (the block allocator guarantees it).

"In place" means: when the caller donates the page buffers (the model's jitted step does, or pass
``donate=True`` here) XLA reuses them for the result, so a step costs O(tokens), not O(cache).
The XLA path is one scatter with mode="drop"; the Pallas kernel aliases the page buffers to its
outputs (``input_output_aliases``) and stores only the new rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend


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
):
    """Compares every cache slot with every token's slot: obviously right, O(tokens x slots)."""
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    slots = jnp.arange(num_pages * page_size)
    hits = slot_mapping[:, None] == slots[None, :]  # [T, slots]; -1 never matches
    written = jnp.any(hits, axis=0)  # [slots]
    writer = jnp.argmax(hits, axis=0)  # token writing each slot (meaningless where not written)

    def apply(pages, new):
        flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
        incoming = jnp.transpose(new, (1, 0, 2))[:, writer].astype(pages.dtype)  # [KVH, slots, hd]
        flat = jnp.where(written[None, :, None], incoming, flat)
        return flat.reshape(pages.shape)

    return apply(k_pages, k_new), apply(v_pages, v_new)


# --------------------------------------------------------------------------------------------
# XLA path
# --------------------------------------------------------------------------------------------
def _update_kv_cache_xla(k_pages, v_pages, k_new, v_new, slot_mapping):
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_slots = num_pages * page_size
    # -1 would wrap around to the last slot under numpy indexing: send it out of bounds instead.
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)

    def apply(pages, new):
        flat = pages.reshape(num_kv_heads, num_slots, head_dim)
        flat = flat.at[:, slots].set(jnp.transpose(new, (1, 0, 2)).astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return apply(k_pages, k_new), apply(v_pages, v_new)


# --------------------------------------------------------------------------------------------
# Pallas kernel
# --------------------------------------------------------------------------------------------
def kv_cache_update_kernel(
    slot_mapping_ref,  # [tokens_per_program] int32
    k_new_ref,  # [tokens_per_program, head_dim] (this program's KV head)
    v_new_ref,  # [tokens_per_program, head_dim]
    k_pages_in_ref,  # [num_pages, page_size, head_dim], aliased to k_pages_ref
    v_pages_in_ref,  # [num_pages, page_size, head_dim], aliased to v_pages_ref
    k_pages_ref,  # [num_pages, page_size, head_dim] (output)
    v_pages_ref,  # [num_pages, page_size, head_dim] (output)
):
    del k_pages_in_ref, v_pages_in_ref  # same buffers as the outputs; only new rows are stored
    tokens_per_program = slot_mapping_ref.shape[0]
    page_size = k_pages_ref.shape[1]

    def write_row(i, carry):
        slot = slot_mapping_ref[i]

        @pl.when(slot >= 0)
        def _():
            page, offset = slot // page_size, slot % page_size
            k_pages_ref[page, offset, :] = k_new_ref[i, :].astype(k_pages_ref.dtype)
            v_pages_ref[page, offset, :] = v_new_ref[i, :].astype(v_pages_ref.dtype)

        return carry

    lax.fori_loop(0, tokens_per_program, write_row, 0)


def _update_kv_cache_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, *, block_sizes, interpret, lowering):
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    num_tokens = k_new.shape[0]
    tokens_per_program = min(block_sizes.tokens_per_program, num_tokens)
    padded = pl.cdiv(num_tokens, tokens_per_program) * tokens_per_program
    if padded != num_tokens:  # padding rows are dropped like any other slot -1
        slot_mapping = jnp.pad(slot_mapping, (0, padded - num_tokens), constant_values=-1)
        k_new = jnp.pad(k_new, ((0, padded - num_tokens), (0, 0), (0, 0)))
        v_new = jnp.pad(v_new, ((0, padded - num_tokens), (0, 0), (0, 0)))

    pages_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda h, i: (h, 0, 0, 0))
    rows_spec = pl.BlockSpec((tokens_per_program, None, head_dim), lambda h, i: (i, h, 0))
    return pl.pallas_call(
        kv_cache_update_kernel,
        grid=(num_kv_heads, padded // tokens_per_program),
        in_specs=[
            pl.BlockSpec((tokens_per_program,), lambda h, i: (i,)),  # slot_mapping
            rows_spec,  # k_new
            rows_spec,  # v_new
            pages_spec,  # k_pages (aliased)
            pages_spec,  # v_pages (aliased)
        ],
        out_specs=[pages_spec, pages_spec],
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        compiler_params=None if interpret else backend.gpu_compiler_params(
            lowering, num_warps=block_sizes.num_warps, num_stages=1),
        name=f"kv_cache_update_{tokens_per_program=}",
    )(slot_mapping, k_new, v_new, k_pages, v_pages)


# --------------------------------------------------------------------------------------------
# Public wrapper
# --------------------------------------------------------------------------------------------
def _validate(k_pages, v_pages, k_new, v_new, slot_mapping):
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
    for name, dtype in (("k_pages", k_pages.dtype), ("k_new", k_new.dtype), ("v_new", v_new.dtype)):
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={dtype} must be a floating point type")


def _update_kv_cache_impl(k_pages, v_pages, k_new, v_new, slot_mapping, *, impl, block_sizes, lowering):
    if impl == "reference":
        return update_kv_cache_reference(k_pages, v_pages, k_new, v_new, slot_mapping)
    if impl == "xla":
        return _update_kv_cache_xla(k_pages, v_pages, k_new, v_new, slot_mapping)
    return tuple(_update_kv_cache_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, block_sizes=block_sizes,
                                         interpret=impl == "pallas_interpret", lowering=lowering))


_STATIC = ("impl", "block_sizes", "lowering")
_update_kv_cache_jit = jax.jit(_update_kv_cache_impl, static_argnames=_STATIC)
_update_kv_cache_donating_jit = jax.jit(_update_kv_cache_impl, static_argnames=_STATIC, donate_argnums=(0, 1))


def update_kv_cache(
    k_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    k_new,  # [num_tokens, num_kv_heads, head_dim]
    v_new,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping,  # [num_tokens] int32: page * page_size + offset, -1 = drop
    impl: str = "auto",
    *,
    donate: bool = False,
    block_sizes: KVCacheUpdateBlockSizes | None = None,
    lowering: str | None = None,
) -> tuple[jax.Array, jax.Array]:  # (k_pages, v_pages) with the new rows written
    """Scatters new K/V rows into their cache slots; returns the updated (k_pages, v_pages).

    Inside a jitted step whose cache argument is donated the update happens in place. Called
    eagerly, ``donate=True`` hands k_pages/v_pages over (they are deleted) to get the same.
    """
    impl = backend.resolve_impl(impl)
    _validate(k_pages, v_pages, k_new, v_new, slot_mapping)
    if block_sizes is None:
        block_sizes = KVCacheUpdateBlockSizes()
    lowering = backend.kernel_lowering(impl, lowering, "update_kv_cache")
    fn = _update_kv_cache_donating_jit if donate else _update_kv_cache_jit
    return fn(k_pages, v_pages, k_new, v_new, slot_mapping, impl=impl, block_sizes=block_sizes, lowering=lowering)
