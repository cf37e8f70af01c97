"""Ragged paged attention: decode, chunked prefill and speculative verification in one kernel.

Tokens of several sequences are concatenated along the first axis of ``q``: sequence s owns rows
``cu_q_lens[s]:cu_q_lens[s+1]`` (padded sequences have q_len 0; rows past
``cu_q_lens[num_seqs]`` are padding and come out as finite garbage, zeros here). Query i of
sequence s sits at absolute position ``kv_lens[s] - q_len[s] + i`` and attends causally to KV
positions ``0..that position``. KV position p of sequence s lives in page
``block_tables[s, p // page_size]`` at offset ``p % page_size`` of the shared page pool
``k_pages [num_kv_heads, num_pages, page_size, head_dim]``. Query head h reads KV head
``h // (num_heads // num_kv_heads)``.

Work decomposition shared by the XLA path and the Pallas kernel: a sequence's queries are cut into
chunks, and each chunk runs an online softmax over blocks of ``pages_per_block`` pages, stopping at
the last key its last query may see. Only one KV block per chunk is ever live, so memory stays
bounded no matter how long the contexts are.

The Pallas kernel packs a chunk as a tile of ``block_rows`` rows = (tokens x query heads of one
KV head) -- the GQA group shares every KV load, and a decode token still fills ``group`` rows of the
matmul. The wrapper gathers those tiles with plain XLA ops, so the kernel itself only does dense
block loads, a page gather through the block table, and two dots.

int8 KV pages (see ``kv_cache_update``): pass ``k_scales`` / ``v_scales`` [num_kv_heads, num_pages,
page_size] float32 with int8 pages. The kernel and the XLA path load the int8 block (a quarter of the
float32 bytes) and dequantize it on chip, folding the per-token scales into the score and probability
columns: ``q . (s_k k) = s_k (q . k)`` and ``p @ (s_v v) = (p s_v) @ v``, i.e. O(rows x block)
multiplies instead of O(block x head_dim). The reference dequantizes the whole pool first.
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
from pallas_kernels.kv_cache_update import check_kv_scales, dequantize_kv

# Finite "minus infinity": exp(MASK_VALUE - m) underflows to 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# XLA path: chunk sizes the queries of a non-decode sequence are cut into, picked per sequence as
# the smallest one that holds all its queries (speculative verify -> 8 rows; long prefill -> 64).
# Decode sequences (q_len 1) skip this and go through one batched pass.
XLA_QUERY_CHUNKS = (8, 64)
# XLA path: tokens per KV block (rounded to whole pages). Bigger amortises loop overhead on CPU,
# smaller wastes less on short contexts.
XLA_BLOCK_K_TOKENS = 256
# XLA path: float32 bytes of one batched-decode K block ([KVH, max_seqs, block, hd]); ~1 MiB keeps the
# gathered block in cache between the gather and the dots (measured faster than bigger blocks).
XLA_DECODE_BLOCK_BYTES = 1 << 20


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class RaggedPagedAttentionBlockSizes:
    """Tiling of the Pallas kernel.

    block_rows: rows of one query tile = tokens_per_tile * (num_heads // num_kv_heads); must hold at
        least one token's query-head group.
    block_k_tokens: KV tokens per inner step, rounded down to whole pages (at least one page).
    """

    block_rows: int = 32
    block_k_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if not _is_power_of_two(self.block_rows):
            raise ValueError(f"block_rows={self.block_rows} must be a power of two")
        if not _is_power_of_two(self.block_k_tokens):
            raise ValueError(f"block_k_tokens={self.block_k_tokens} must be a power of two")
        if not _is_power_of_two(self.num_warps):
            raise ValueError(f"num_warps={self.num_warps} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")

    def pages_per_block(self, page_size: int) -> int:
        return max(1, self.block_k_tokens // page_size)


def _sequence_q_lens(cu_q_lens, num_seqs):
    """Per-sequence query counts [S]; sequences at index >= num_seqs count as empty."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    return jnp.where(jnp.arange(q_lens.shape[0]) < num_seqs[0], q_lens, 0)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def ragged_paged_attention_reference(
    q,  # [num_tokens, num_heads, head_dim]
    k_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    kv_lens,  # [max_seqs] int32
    block_tables,  # [max_seqs, pages_per_seq] int32
    cu_q_lens,  # [max_seqs + 1] int32
    num_seqs,  # [1] int32
    k_scales=None,  # [num_kv_heads, num_pages, page_size] float32, only with int8 pages
    v_scales=None,
    *,
    sm_scale: float,
):
    """Gathers every sequence's whole KV and every token's full score row, in float32.

    int8 pages are dequantized (page * per-token scale) up front: the ground truth for the kernels.
    """
    if k_scales is not None:
        k_pages, v_pages = dequantize_kv(k_pages, k_scales), dequantize_kv(v_pages, v_scales)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, pages_per_seq = block_tables.shape
    group = num_heads // num_kv_heads
    max_kv = pages_per_seq * page_size

    # [S, max_kv, KVH, hd]: contiguous KV of every sequence.
    def contiguous(pages):
        gathered = pages[:, block_tables]  # [KVH, S, pages_per_seq, page_size, hd]
        return jnp.transpose(gathered, (1, 2, 3, 0, 4)).reshape(max_seqs, max_kv, num_kv_heads, head_dim)

    k_seq = contiguous(k_pages).astype(jnp.float32)
    v_seq = contiguous(v_pages).astype(jnp.float32)

    q_lens = _sequence_q_lens(cu_q_lens, num_seqs)
    tokens = jnp.arange(num_tokens)
    # Sequence of token t = number of sequences that end at or before t.
    seq_of_token = jnp.sum(cu_q_lens[None, 1:] <= tokens[:, None], axis=1)
    is_real = tokens < cu_q_lens[num_seqs[0]]
    seq_of_token = jnp.where(is_real, jnp.minimum(seq_of_token, max_seqs - 1), 0)
    position = kv_lens[seq_of_token] - q_lens[seq_of_token] + (tokens - cu_q_lens[seq_of_token])

    qf = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    keys = k_seq[seq_of_token]  # [T, max_kv, KVH, hd]
    values = v_seq[seq_of_token]
    scores = jnp.einsum("thgd,tkhd->thgk", qf, keys) * sm_scale
    allowed = jnp.arange(max_kv)[None, :] <= position[:, None]  # [T, max_kv]
    allowed = allowed & is_real[:, None]
    allowed = allowed[:, None, None, :]
    scores = jnp.where(allowed, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(allowed, jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("thgk,tkhd->thgd", weights, values)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# XLA (CPU) path
# --------------------------------------------------------------------------------------------
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
    row_sum = row_sum * correction + probs.sum(axis=-1)
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


def _ragged_paged_attention_xla(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                                k_scales=None, v_scales=None, *, sm_scale, query_chunks=XLA_QUERY_CHUNKS,
                                block_k_tokens=XLA_BLOCK_K_TOKENS, decode_block_bytes=XLA_DECODE_BLOCK_BYTES):
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
    q_lens = _sequence_q_lens(cu_q_lens, num_seqs)

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

    # The batched decode block holds every sequence's KV: size it to stay cache-resident.
    decode_pages_per_block = max(1, min(pages_per_block, decode_block_bytes // (
        max_seqs * num_kv_heads * page_size * head_dim * 4)))
    out = _batched_decode(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, q_lens, k_scales, v_scales,
                          sm_scale=sm_scale, pages_per_block=decode_pages_per_block)
    out = jnp.pad(out, ((0, largest_chunk), (0, 0), (0, 0)))
    out = lax.fori_loop(0, jnp.minimum(num_seqs[0], max_seqs), one_sequence, out)
    return out[:num_tokens]


def _batched_decode(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, q_lens, k_scales=None, v_scales=None, *,
                    sm_scale, pages_per_block):
    """Sequences with exactly one query, all at once: one loop over KV blocks for the whole batch.

    A per-sequence loop would pay loop overhead per (sequence, block); decode-heavy batches are
    the engine's steady state, so they get big batched ops instead. Returns [num_tokens(+pad), H, hd]
    with the decode rows filled and zeros elsewhere.
    """
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_seqs = kv_lens.shape[0]
    group = num_heads // num_kv_heads
    block_k = pages_per_block * page_size
    # Whole blocks only: a clamped dynamic_slice at the table's end would shift pages.
    padded_width = _round_up(block_tables.shape[1], pages_per_block)
    block_tables = jnp.pad(block_tables, ((0, 0), (0, padded_width - block_tables.shape[1])))
    is_decode = q_lens == 1
    rows = jnp.where(is_decode, cu_q_lens[:-1], 0)
    decode_kv_lens = jnp.where(is_decode, kv_lens, 0)
    q_decode = q[rows].astype(jnp.float32).reshape(max_seqs, num_kv_heads, group, head_dim) * sm_scale

    def kv_block(kj, carry):
        page_ids = lax.dynamic_slice_in_dim(block_tables, kj * pages_per_block, pages_per_block, axis=1)
        k_block, k_scale = _gather_kv_block(k_pages, k_scales, page_ids)  # [KVH, S, block_k, hd], [KVH, S, block_k]
        v_block, v_scale = _gather_kv_block(v_pages, v_scales, page_ids)
        scores = jnp.einsum("shgd,hskd->shgk", q_decode, k_block)
        if k_scale is not None:
            scores = scores * jnp.transpose(k_scale, (1, 0, 2))[:, :, None, :]
        kv_positions = kj * block_k + jnp.arange(block_k)
        allowed = (kv_positions[None, :] < decode_kv_lens[:, None])[:, None, None, :]  # [S, 1, 1, block_k]
        v_scale = None if v_scale is None else jnp.transpose(v_scale, (1, 0, 2))[:, :, None, :]
        return _online_softmax_step(carry, scores, allowed, v_block, v_scale, "shgk,hskd->shgd")

    init = _online_softmax_init((max_seqs, num_kv_heads, group), head_dim)
    num_blocks = pl.cdiv(jnp.max(decode_kv_lens), block_k)
    acc, _, row_sum = lax.fori_loop(0, num_blocks, kv_block, init)
    result = _online_softmax_finish(acc, row_sum).reshape(max_seqs, num_heads, head_dim)
    # Non-decode sequences scatter out of bounds, i.e. nowhere.
    target_rows = jnp.where(is_decode, rows, num_rows)
    out = jnp.zeros(q.shape, q.dtype)
    return out.at[target_rows].set(result.astype(q.dtype), mode="drop")


# --------------------------------------------------------------------------------------------
# Pallas kernel
# --------------------------------------------------------------------------------------------
def ragged_paged_attention_kernel(
    tile_seq_ref,  # [1] int32: sequence this tile belongs to
    tile_first_position_ref,  # [1] int32: absolute position of the tile's first token
    tile_num_tokens_ref,  # [1] int32: real tokens in this tile (0 for an idle tile)
    tile_kv_len_ref,  # [1] int32: the sequence's KV length
    block_tables_ref,  # [max_seqs, padded_pages_per_seq] int32
    q_ref,  # [block_rows, head_dim]: row r = token r // group, query head r % group
    k_pages_ref,  # [num_pages, page_size, head_dim] (this tile's KV head)
    v_pages_ref,  # [num_pages, page_size, head_dim]
    *refs,  # int8 pages: k_scales_ref, v_scales_ref [num_pages, page_size]; then o_ref [block_rows, head_dim]
    sm_scale: float,
    group: int,
    pages_per_block: int,
):
    *scale_refs, o_ref = refs
    quantized = bool(scale_refs)
    block_rows, head_dim = q_ref.shape
    page_size = k_pages_ref.shape[1]
    block_k = pages_per_block * page_size
    seq = tile_seq_ref[0]
    first_position = tile_first_position_ref[0]
    num_tokens = tile_num_tokens_ref[0]
    kv_len = tile_kv_len_ref[0]
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    token_in_tile = jnp.arange(block_rows) // group
    row_is_real = token_in_tile < num_tokens
    positions = first_position + token_in_tile  # [block_rows]
    # Causal: the tile's last real token sees the most keys. Idle tiles visit no block.
    keys_needed = jnp.where(num_tokens > 0, jnp.minimum(kv_len, first_position + num_tokens), 0)
    num_kv_blocks = pl.cdiv(keys_needed, block_k)
    q = q_ref[...]

    def kv_block(kj, carry):
        acc, row_max, row_sum = carry
        page_ids = block_tables_ref[seq, pl.ds(kj * pages_per_block, pages_per_block)]  # [pages_per_block]
        k = k_pages_ref[page_ids].reshape(block_k, head_dim)
        v = v_pages_ref[page_ids].reshape(block_k, head_dim)
        if quantized:
            # Dequantize on chip: int8 -> q's dtype is exact (|code| <= 127), and the per-token scales
            # go onto the score / probability columns instead of the [block_k, head_dim] tiles.
            k_scales_ref, v_scales_ref = scale_refs
            k_scale = k_scales_ref[page_ids].reshape(block_k)
            v_scale = v_scales_ref[page_ids].reshape(block_k)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        scores = jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32) * sm_scale
        if quantized:
            scores = scores * k_scale[None, :]
        kv_positions = kj * block_k + jnp.arange(block_k)
        allowed = (kv_positions[None, :] <= positions[:, None]) & (kv_positions[None, :] < kv_len)
        scores = jnp.where(allowed, scores, MASK_VALUE)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        correction = jnp.exp(row_max - new_max)
        probs = jnp.where(allowed, jnp.exp(scores - new_max[:, None]), 0.0)
        row_sum = row_sum * correction + jnp.sum(probs, axis=1)
        if quantized:
            probs = probs * v_scale[None, :]
        pv = jnp.dot(probs.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
        return acc * correction[:, None] + pv, new_max, row_sum

    init = (
        jnp.zeros((block_rows, head_dim), jnp.float32),
        jnp.full((block_rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_rows,), jnp.float32),
    )
    acc, _, row_sum = lax.fori_loop(0, num_kv_blocks, kv_block, init)
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]
    o_ref[...] = jnp.where(row_is_real[:, None], out, 0.0).astype(o_ref.dtype)


def _query_tiles(cu_q_lens, num_seqs, kv_lens, *, tokens_per_tile, num_tiles):
    """Splits every sequence's queries into tiles of tokens_per_tile tokens.

    Returns per-tile arrays [num_tiles]: sequence, first token row in q, real token count (0 for
    idle tiles past the last sequence's tiles), absolute position of the first token and the
    sequence's KV length.
    """
    max_seqs = kv_lens.shape[0]
    q_lens = _sequence_q_lens(cu_q_lens, num_seqs)
    tiles_per_seq = pl.cdiv(q_lens, tokens_per_tile)
    tile_ends = jnp.cumsum(tiles_per_seq)  # inclusive prefix sums
    tiles = jnp.arange(num_tiles)
    seq = jnp.minimum(jnp.searchsorted(tile_ends, tiles, side="right"), max_seqs - 1)
    is_active = tiles < tile_ends[-1]
    tile_in_seq = tiles - (tile_ends[seq] - tiles_per_seq[seq])
    offset = tile_in_seq * tokens_per_tile
    num_tokens = jnp.where(is_active, jnp.clip(q_lens[seq] - offset, 0, tokens_per_tile), 0)
    first_row = cu_q_lens[seq] + offset
    first_position = kv_lens[seq] - q_lens[seq] + offset
    return dict(seq=seq.astype(jnp.int32), first_row=first_row.astype(jnp.int32),
                num_tokens=num_tokens.astype(jnp.int32), first_position=first_position.astype(jnp.int32),
                kv_len=kv_lens[seq].astype(jnp.int32))


def _ragged_paged_attention_pallas(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, k_scales=None,
                                   v_scales=None, *, sm_scale, block_sizes, interpret, lowering):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    max_seqs, pages_per_seq = block_tables.shape
    group = num_heads // num_kv_heads
    block_rows = max(block_sizes.block_rows, 16)
    tokens_per_tile = block_rows // group
    # Sum over sequences of cdiv(q_len, tokens_per_tile) never exceeds this.
    num_tiles = pl.cdiv(num_tokens, tokens_per_tile) + max_seqs
    pages_per_block = min(block_sizes.pages_per_block(page_size), 1 << (pages_per_seq.bit_length() - 1))
    block_tables = jnp.pad(block_tables, ((0, 0), (0, _round_up(pages_per_seq, pages_per_block) - pages_per_seq)))

    tiles = _query_tiles(cu_q_lens, num_seqs, kv_lens, tokens_per_tile=tokens_per_tile, num_tiles=num_tiles)
    # Gather query tiles [KVH, num_tiles, block_rows, hd]: row r of a tile = token r // group of the
    # tile, query head (kv_head * group + r % group). Rows past the real tokens read row 0 and are
    # masked in the kernel.
    rows = jnp.arange(block_rows)
    token_in_tile = rows // group
    row_is_real = token_in_tile[None, :] < tiles["num_tokens"][:, None]  # [num_tiles, block_rows]
    token_rows = jnp.where(row_is_real, tiles["first_row"][:, None] + token_in_tile[None, :], 0)
    heads = jnp.arange(num_kv_heads)[:, None] * group + (rows % group)[None, :]  # [KVH, block_rows]
    q_tiles = q[token_rows[None, :, :], heads[:, None, :]]  # [KVH, num_tiles, block_rows, hd]

    kernel = functools.partial(ragged_paged_attention_kernel, sm_scale=sm_scale, group=group,
                               pages_per_block=pages_per_block)
    # Tiles on the first grid axis: CUDA allows 2**31 - 1 blocks there (65535 on the others), and
    # neighbouring programs then share a sequence's KV pages in L2.
    per_tile = pl.BlockSpec((1,), lambda i, h: (i,))
    scales = [] if k_scales is None else [k_scales, v_scales]
    scales_spec = pl.BlockSpec((None, num_pages, page_size), lambda i, h: (h, 0, 0))
    out_tiles = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads),
        in_specs=[
            per_tile,  # tile_seq
            per_tile,  # tile_first_position
            per_tile,  # tile_num_tokens
            per_tile,  # tile_kv_len
            pl.BlockSpec(block_tables.shape, lambda i, h: (0, 0)),  # block_tables
            pl.BlockSpec((None, None, block_rows, head_dim), lambda i, h: (h, i, 0, 0)),  # q tiles
            pl.BlockSpec((None, num_pages, page_size, head_dim), lambda i, h: (h, 0, 0, 0)),  # k_pages
            pl.BlockSpec((None, num_pages, page_size, head_dim), lambda i, h: (h, 0, 0, 0)),  # v_pages
            *[scales_spec] * len(scales),  # k_scales, v_scales (int8 pages only)
        ],
        out_specs=pl.BlockSpec((None, None, block_rows, head_dim), lambda i, h: (h, i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(q_tiles.shape, q.dtype),
        interpret=interpret,
        compiler_params=None if interpret else backend.gpu_compiler_params(
            lowering, num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        name=f"ragged_paged_attention_{block_rows=}_{pages_per_block=}" + ("_int8" if scales else ""),
    )(tiles["seq"], tiles["first_position"], tiles["num_tokens"], tiles["kv_len"], block_tables,
      q_tiles, k_pages, v_pages, *scales)

    # Scatter tiles back to [T, H, hd]: token t, head h -> tile of t, row (t - first_row) * group + h % group.
    tokens = jnp.arange(num_tokens)
    seq_of_token = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], tokens, side="right"), max_seqs - 1)
    offset = tokens - cu_q_lens[seq_of_token]
    q_lens = _sequence_q_lens(cu_q_lens, num_seqs)
    tiles_before = jnp.cumsum(pl.cdiv(q_lens, tokens_per_tile)) - pl.cdiv(q_lens, tokens_per_tile)
    tile_of_token = jnp.clip(tiles_before[seq_of_token] + offset // tokens_per_tile, 0, num_tiles - 1)
    row_of_token = (offset % tokens_per_tile) * group
    is_real = tokens < cu_q_lens[num_seqs[0]]
    head = jnp.arange(num_heads)
    out = out_tiles[head[None, :] // group, tile_of_token[:, None], row_of_token[:, None] + head[None, :] % group]
    return jnp.where(is_real[:, None, None], out, 0.0).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Public wrapper
# --------------------------------------------------------------------------------------------
def _validate(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, k_scales, v_scales, impl):
    if q.ndim != 3:
        raise ValueError(f"q.shape={q.shape} must be [num_tokens, num_heads, head_dim]")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages.shape={k_pages.shape} must be [num_kv_heads, num_pages, page_size, head_dim]")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages.shape={v_pages.shape} must equal k_pages.shape={k_pages.shape}")
    _, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, kv_head_dim = k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"k_pages.shape={k_pages.shape} head_dim must equal q.shape={q.shape} head_dim")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    page_dtypes = (jnp.int8,) if k_scales is not None else (jnp.float32, jnp.bfloat16, jnp.float16)
    for name, dtype, allowed in (("q", q.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)),
                                 ("k_pages", k_pages.dtype, page_dtypes), ("v_pages", v_pages.dtype, page_dtypes)):
        if dtype not in allowed:
            raise ValueError(f"{name}.dtype={dtype} must be "
                             + ("int8 (k_scales/v_scales given)" if allowed == (jnp.int8,)
                                else "float32, bfloat16 or float16"))
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages.dtype={k_pages.dtype} must equal v_pages.dtype={v_pages.dtype}")
    check_kv_scales(k_pages, k_scales, v_scales)
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables.shape={block_tables.shape} must be [max_seqs, pages_per_seq]")
    max_seqs = block_tables.shape[0]
    expected = {"kv_lens": (max_seqs,), "cu_q_lens": (max_seqs + 1,), "num_seqs": (1,)}
    for name, array in (("kv_lens", kv_lens), ("cu_q_lens", cu_q_lens), ("num_seqs", num_seqs)):
        if array.shape != expected[name]:
            raise ValueError(f"{name}.shape={array.shape} must be {expected[name]} "
                             f"for block_tables.shape={block_tables.shape}")
    for name, array in (("kv_lens", kv_lens), ("block_tables", block_tables), ("cu_q_lens", cu_q_lens),
                        ("num_seqs", num_seqs)):
        if array.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype={array.dtype} must be int32")
    if backend.is_pallas(impl) and not _is_power_of_two(page_size):
        raise ValueError(f"page_size={page_size} must be a power of two for the Pallas kernel")
    if impl == "pallas" and not (_is_power_of_two(head_dim) and head_dim >= 16):
        raise ValueError(f"head_dim={head_dim} must be a power of two >= 16 for the Pallas GPU kernel")


@functools.partial(jax.jit, static_argnames=("sm_scale", "impl", "block_sizes", "lowering"))
def _ragged_paged_attention_jit(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, k_scales,
                                v_scales, *, sm_scale, impl, block_sizes, lowering):
    args = (q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, k_scales, v_scales)
    if impl == "reference":
        return ragged_paged_attention_reference(*args, sm_scale=sm_scale)
    if impl == "xla":
        return _ragged_paged_attention_xla(*args, sm_scale=sm_scale, query_chunks=XLA_QUERY_CHUNKS,
                                           block_k_tokens=XLA_BLOCK_K_TOKENS)
    if k_scales is None and k_pages.dtype != q.dtype:  # the kernel's dots need one element type
        q = q.astype(k_pages.dtype)
    out = _ragged_paged_attention_pallas(q, *args[1:], sm_scale=sm_scale, block_sizes=block_sizes,
                                         interpret=impl == "pallas_interpret", lowering=lowering)
    return out.astype(args[0].dtype)


def ragged_paged_attention(
    q,  # [num_tokens, num_heads, head_dim]
    k_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    kv_lens,  # [max_seqs] int32: KV length after this step's tokens are written
    block_tables,  # [max_seqs, pages_per_seq] int32
    cu_q_lens,  # [max_seqs + 1] int32: prefix sums of per-sequence query counts
    num_seqs,  # [1] int32: real sequences (<= max_seqs)
    *,
    k_scales=None,  # [num_kv_heads, num_pages, page_size] float32: with int8 pages only
    v_scales=None,  # [num_kv_heads, num_pages, page_size] float32
    sm_scale: float | None = None,
    impl: str = "auto",
    block_sizes: RaggedPagedAttentionBlockSizes | None = None,
    lowering: str | None = None,
) -> jax.Array:  # [num_tokens, num_heads, head_dim], dtype of q
    """Causal attention of concatenated ragged queries against their sequences' KV pages.

    int8 pages need their per-token scales (k_scales, v_scales; see kv_cache_update.quantize_kv).
    sm_scale defaults to 1/sqrt(head_dim). ``lowering`` ("triton" | "mosaic", default from
    $RIDGELINE_PALLAS_LOWERING) only matters for impl="pallas".
    """
    impl = backend.resolve_impl(impl)
    _validate(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, k_scales, v_scales, impl)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if block_sizes is None:
        block_sizes = RaggedPagedAttentionBlockSizes()
    group = q.shape[1] // k_pages.shape[0]
    if backend.is_pallas(impl) and max(block_sizes.block_rows, 16) < group:
        raise ValueError(f"block_rows={block_sizes.block_rows} must be >= num_heads // num_kv_heads={group}")
    lowering = backend.kernel_lowering(impl, lowering, "ragged_paged_attention")
    return _ragged_paged_attention_jit(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, k_scales,
                                       v_scales, sm_scale=float(sm_scale), impl=impl, block_sizes=block_sizes,
                                       lowering=lowering)
