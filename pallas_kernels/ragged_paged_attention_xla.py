"""Ragged paged attention, XLA path: what ``impl="xla"`` (the engine on CPU) runs.

Same inputs and result as ``ragged_paged_attention`` (see that module for the layout). A sequence's
queries are cut into chunks, and each chunk runs an online softmax over blocks of whole pages,
stopping at the last key its last query may see. Decode sequences (q_len 1) all go through one
batched pass instead, over fixed-size key chunks gathered straight from the pool (on CPU with float32
pages, through a C++ kernel: ``pallas_kernels/cpu_attention.cc``, ~3x faster at batch 1, where this
pass is a loop of small ops); steps with only decodes skip the per-sequence pass. Only one KV block (or chunk) is ever live, so memory stays
bounded no matter how long the contexts are. The decode pass is batch-invariant: a row's result is
bitwise the same whatever else the batch holds. int8 pages are dequantized per block, the per-token
scales folded into the score and probability columns (``q . (s_k k) = s_k (q . k)``,
``p @ (s_v v) = (p s_v) @ v``).

The lowest module of the family: the Pallas module imports MASK_VALUE and sequence_q_lens from here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import round_up

# Finite "minus infinity": exp(MASK_VALUE - m) underflows to 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# XLA path: chunk sizes the queries of a non-decode sequence are cut into, picked per sequence as
# the smallest one that holds all its queries (speculative verify -> 8 rows; long prefill -> 64).
# Decode sequences (q_len 1) skip this and go through one batched pass.
XLA_QUERY_CHUNKS = (8, 64)
# XLA path: tokens per KV block (rounded to whole pages). Bigger amortises loop overhead on CPU,
# smaller wastes less on short contexts.
XLA_BLOCK_K_TOKENS = 256
# XLA path: keys per chunk of the batched decode pass (rounded up to whole pages). A constant, never
# derived from the batch: every reduction in a chunk has this length whatever the batch holds, and
# chunks past a row's length are exact no-ops for it, so a decode row's bits never depend on the batch.
XLA_DECODE_CHUNK_TOKENS = 16


def sequence_q_lens(cu_q_lens, num_seqs):
    """Per-sequence query counts [S]; sequences at index >= num_seqs count as empty."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    return jnp.where(jnp.arange(q_lens.shape[0]) < num_seqs[0], q_lens, 0)


def _gather_kv_block(pages, scales, page_ids):
    """pages[:, page_ids] merged into one token axis, as float32, with the per-token scales (or None).

    pages [KVH, P, ps, hd], page_ids [..., n] -> ([KVH, ..., n * ps, hd] f32, [KVH, ..., n * ps] f32 | None).
    """
    block = pages[:, page_ids]
    block = block.reshape(block.shape[:-3] + (-1, block.shape[-1])).astype(jnp.float32)
    if scales is None:
        return block, None
    token_scales = scales[:, page_ids]
    return block, token_scales.reshape(token_scales.shape[:-2] + (-1,))


def _fixed_order_sum(x):
    """x [..., n] summed over its last axis as a tree of elementwise adds (halves, then quarters, ...).

    XLA:CPU's reduce orders its adds by the shape of the whole array (the same row of probabilities
    summed to different bits once the batch had 8 or more sequences); elementwise adds are done as
    written whatever the shape, so a row's sum depends only on the row.
    """
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        paired = x[..., :half] + x[..., half:2 * half]
        x = jnp.concatenate([paired, x[..., 2 * half:]], axis=-1) if x.shape[-1] % 2 else paired
    return x[..., 0]


def _online_softmax_init(stats_shape, head_dim):
    """(acc [*stats, hd], row_max [*stats], row_sum [*stats]) before the first KV block."""
    return (jnp.zeros(stats_shape + (head_dim,), jnp.float32), jnp.full(stats_shape, MASK_VALUE, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32))


def _online_softmax_step(carry, scores, allowed, v_block, v_scale, pv_einsum):
    """One KV block of the online softmax: scores [*stats, k] masked by `allowed`; probabilities times
    v_block via `pv_einsum`; v_scale (int8 pages, already broadcast to the probabilities) or None."""
    acc, row_max, row_sum = carry
    scores = jnp.where(allowed, scores, MASK_VALUE)
    new_max = jnp.maximum(row_max, scores.max(axis=-1))
    correction = jnp.exp(row_max - new_max)
    probs = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
    row_sum = row_sum * correction + _fixed_order_sum(probs)
    if v_scale is not None:
        probs = probs * v_scale
    acc = acc * correction[..., None] + jnp.einsum(pv_einsum, probs, v_block)
    return acc, new_max, row_sum


def _online_softmax_finish(acc, row_sum):
    """Normalised output; rows that saw no key (row_sum 0) stay zero."""
    return acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]


def _compact_pages(pages, scales, block_tables):
    """pages [KVH, P, ps, hd] -> [KVH, S * maxP, ps, hd]: the pages of block_tables [S, maxP] in table order."""
    flat_ids = block_tables.reshape(-1)
    return pages[:, flat_ids], (None if scales is None else scales[:, flat_ids])


def ragged_paged_attention_xla(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                               k_scales=None, v_scales=None, *, sm_scale, query_chunks=XLA_QUERY_CHUNKS,
                               block_k_tokens=XLA_BLOCK_K_TOKENS, decode_chunk_tokens=XLA_DECODE_CHUNK_TOKENS):
    page_size = k_pages.shape[2]
    q_lens = sequence_q_lens(cu_q_lens, num_seqs)
    if _cpu_decode_kernel_for(q, k_pages, k_scales):
        out = jax.ffi.ffi_call("ridgeline_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))(
            q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, sm_scale=np.float32(sm_scale))
    else:
        out = _batched_decode(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, q_lens, k_scales, v_scales,
                              sm_scale=sm_scale, chunk_pages=max(1, decode_chunk_tokens // page_size))
    # Steps where every sequence decodes (the steady state of a batch job) skip the per-sequence pass
    # and its page compaction altogether.
    return lax.cond(jnp.any(q_lens > 1),
                    functools.partial(_multi_query_sequences, sm_scale=sm_scale, query_chunks=query_chunks,
                                      block_k_tokens=block_k_tokens),
                    lambda out, *_: out,
                    out, q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, q_lens, num_seqs, k_scales, v_scales)


def _cpu_decode_kernel_for(q, k_pages, k_scales) -> bool:
    """Whether the decode rows go to the C++ kernel (pallas_kernels/cpu_attention.cc): on CPU, float32 pages
    and queries, when the CPU kernel library could be built (else this module's batched XLA pass)."""
    if jax.default_backend() != "cpu" or k_scales is not None or q.dtype != jnp.float32 or k_pages.dtype != jnp.float32:
        return False
    from pallas_kernels import cpu_quantized_matmul  # builds and registers the CPU kernel library

    return cpu_quantized_matmul.available()


def _multi_query_sequences(out, q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, q_lens, num_seqs,
                           k_scales, v_scales, *, sm_scale, query_chunks, block_k_tokens):
    """out [T, H, hd] with the rows of every sequence with more than one query (prefill, chunked prefill,
    speculative verify) filled in, one sequence at a time, in query chunks of `query_chunks` rows."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, pages_per_seq = block_tables.shape
    group = num_heads // num_kv_heads
    # Gather the batch's pages out of the pool once, up front, and renumber the block tables into that
    # compact copy. The loops below then never touch the (much larger, donated) pool, which would
    # otherwise make XLA copy the whole pool into every loop.
    k_pages, k_scales = _compact_pages(k_pages, k_scales, block_tables)
    v_pages, v_scales = _compact_pages(v_pages, v_scales, block_tables)
    block_tables = jnp.arange(max_seqs * pages_per_seq, dtype=block_tables.dtype).reshape(max_seqs, pages_per_seq)
    pages_per_block = max(1, min(block_k_tokens // page_size, pages_per_seq))
    block_k = pages_per_block * page_size
    # Pad so every block-table slice and every query chunk slice stays in bounds (page 0 is a
    # real page; whatever it holds is masked out).
    num_kv_blocks = pl.cdiv(pages_per_seq, pages_per_block)
    block_tables = jnp.pad(block_tables, ((0, 0), (0, num_kv_blocks * pages_per_block - pages_per_seq)))
    largest_chunk = max(query_chunks)
    q_padded = jnp.pad(q, ((0, largest_chunk), (0, 0), (0, 0)))

    def attend_chunk(chunk_size, seq, chunk_start, out):
        """Queries chunk_start..chunk_start+chunk_size of `seq` against its pages."""
        q_len, kv_len, row0 = q_lens[seq], kv_lens[seq], cu_q_lens[seq] + chunk_start
        q_chunk = lax.dynamic_slice_in_dim(q_padded, row0, chunk_size, axis=0)
        q_chunk = q_chunk.astype(jnp.float32).reshape(chunk_size, num_kv_heads, group, head_dim) * sm_scale
        offsets = chunk_start + jnp.arange(chunk_size)
        positions = kv_len - q_len + offsets  # [chunk]
        row_is_real = offsets < q_len
        keys_needed = jnp.minimum(kv_len, kv_len - q_len + chunk_start + chunk_size)
        pages = block_tables[seq]

        def kv_block(kj, carry):
            page_ids = lax.dynamic_slice_in_dim(pages, kj * pages_per_block, pages_per_block)
            k_block, k_scale = _gather_kv_block(k_pages, k_scales, page_ids)  # [KVH, block_k, hd], [KVH, block_k]
            v_block, v_scale = _gather_kv_block(v_pages, v_scales, page_ids)
            scores = jnp.einsum("chgd,hkd->hgck", q_chunk, k_block)
            if k_scale is not None:
                scores = scores * k_scale[:, None, None, :]
            kv_positions = kj * block_k + jnp.arange(block_k)
            allowed = (kv_positions[None, :] <= positions[:, None]) & (kv_positions[None, :] < kv_len)
            return _online_softmax_step(carry, scores, allowed, v_block,
                                        None if v_scale is None else v_scale[:, None, None, :], "hgck,hkd->hgcd")

        init = _online_softmax_init((num_kv_heads, group, chunk_size), head_dim)
        acc, _, row_sum = lax.fori_loop(0, pl.cdiv(jnp.maximum(keys_needed, 0), block_k), kv_block, init)
        result = _online_softmax_finish(acc, row_sum)
        result = jnp.transpose(result, (2, 0, 1, 3)).reshape(chunk_size, num_heads, head_dim).astype(out.dtype)
        # Rows past this sequence's queries belong to the next sequence (written later) or to
        # padding: keep whatever is there.
        previous = lax.dynamic_slice_in_dim(out, row0, chunk_size, axis=0)
        result = jnp.where(row_is_real[:, None, None], result, previous)
        return lax.dynamic_update_slice_in_dim(out, result, row0, axis=0)

    def attend_sequence(chunk_size, seq, out):
        num_chunks = pl.cdiv(q_lens[seq], chunk_size)
        return lax.fori_loop(0, num_chunks,
                             lambda c, out: attend_chunk(chunk_size, seq, c * chunk_size, out), out)

    branches = [functools.partial(attend_sequence, size) for size in query_chunks]

    def one_sequence(seq, out):
        # Decode sequences were done by the batched pass. Otherwise pick the smallest chunk
        # size that covers q_len (the largest one otherwise).
        branch = jnp.sum(q_lens[seq] > jnp.asarray(query_chunks[:-1]))
        return lax.cond(q_lens[seq] == 1, lambda s, out: out,
                        lambda s, out: lax.switch(branch, branches, s, out), seq, out)

    out = jnp.pad(out, ((0, largest_chunk), (0, 0), (0, 0)))
    out = lax.fori_loop(0, jnp.minimum(num_seqs[0], max_seqs), one_sequence, out)
    return out[:num_tokens]


def _batched_decode(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, q_lens, k_scales=None, v_scales=None, *,
                    sm_scale, chunk_pages):
    """Sequences with exactly one query, all at once: one loop over chunks of `chunk_pages` pages of every
    sequence, gathered straight from the pool. Returns [num_tokens, H, hd] with the decode rows filled
    and zeros elsewhere.

    A per-sequence loop would pay loop overhead per (sequence, block); decode-heavy batches are the
    engine's steady state, so they get big batched ops instead. Batch invariance: the chunk length is a
    constant, so every max, sum and dot a row goes through has a fixed length; the chunks run in table
    order, and one wholly past a row's length leaves its (acc, max, sum) exactly as they were (max
    unchanged, correction exp(0) = 1, nothing added). So a row's bits do not depend on how many chunks
    the longest sequence of the batch needs. Nor on how many sequences there are: the sums are fixed
    trees of adds (_fixed_order_sum), and XLA:CPU's batched dots give each (head, sequence) the same
    bits at any batch size (checked in tests/test_ragged_paged_attention.py, as that is XLA's choice).
    """
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, pages_per_seq = block_tables.shape
    group = num_heads // num_kv_heads
    chunk_tokens = chunk_pages * page_size
    # Whole chunks only: a clamped dynamic_slice at the table's end would shift pages.
    block_tables = jnp.pad(block_tables, ((0, 0), (0, round_up(pages_per_seq, chunk_pages) - pages_per_seq)))
    is_decode = q_lens == 1
    rows = jnp.where(is_decode, cu_q_lens[:-1], 0)
    decode_kv_lens = jnp.where(is_decode, kv_lens, 0)
    # Heads lead and sequences follow in every operand, as in the gathered chunks [KVH, S, chunk, hd]:
    # the dots are then plain batched matmuls, with no transposes of the KV chunks.
    q_decode = q[rows].astype(jnp.float32).reshape(max_seqs, num_kv_heads, group, head_dim) * sm_scale
    q_decode = jnp.transpose(q_decode, (1, 0, 2, 3))  # [KVH, S, G, hd]

    def kv_chunk(c, carry):
        page_ids = lax.dynamic_slice_in_dim(block_tables, c * chunk_pages, chunk_pages, axis=1)  # [S, chunk_pages]
        k_chunk, k_scale = _gather_kv_block(k_pages, k_scales, page_ids)  # [KVH, S, chunk, hd], [KVH, S, chunk]
        v_chunk, v_scale = _gather_kv_block(v_pages, v_scales, page_ids)
        scores = jnp.einsum("hsgd,hskd->hsgk", q_decode, k_chunk)  # [KVH, S, G, chunk]
        if k_scale is not None:
            scores = scores * k_scale[:, :, None, :]
        kv_positions = c * chunk_tokens + jnp.arange(chunk_tokens)
        allowed = (kv_positions[None, :] < decode_kv_lens[:, None])[None, :, None, :]  # [1, S, 1, chunk]
        v_scale = None if v_scale is None else v_scale[:, :, None, :]
        return _online_softmax_step(carry, scores, allowed, v_chunk, v_scale, "hsgk,hskd->hsgd")

    init = _online_softmax_init((num_kv_heads, max_seqs, group), head_dim)
    acc, _, row_sum = lax.fori_loop(0, pl.cdiv(jnp.max(decode_kv_lens), chunk_tokens), kv_chunk, init)
    result = _online_softmax_finish(acc, row_sum)  # [KVH, S, G, hd]
    result = jnp.transpose(result, (1, 0, 2, 3)).reshape(max_seqs, num_heads, head_dim)
    # Non-decode sequences scatter out of bounds, i.e. nowhere.
    target_rows = jnp.where(is_decode, rows, num_rows)
    out = jnp.zeros(q.shape, q.dtype)
    return out.at[target_rows].set(result.astype(q.dtype), mode="drop")
