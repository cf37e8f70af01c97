"""Ragged paged attention: decode, chunked prefill and speculative verification in one call.

Tokens of several sequences are concatenated along the first axis of ``q``: sequence s owns rows
``cu_q_lens[s]:cu_q_lens[s+1]`` (padded sequences have q_len 0; rows past
``cu_q_lens[num_seqs]`` are padding and come out as finite garbage, zeros here). Query i of
sequence s sits at absolute position ``kv_lens[s] - q_len[s] + i`` and attends causally to KV
positions ``0..that position``. KV position p of sequence s lives in page
``block_tables[s, p // page_size]`` at offset ``p % page_size`` of the shared page pool
``k_pages [num_kv_heads, num_pages, page_size, head_dim]``. Query head h reads KV head
``h // (num_heads // num_kv_heads)``.

The Pallas kernel packs a sequence's queries into tiles of rows = (tokens x query heads of one KV
head): the GQA group shares every KV load. A tile runs an online softmax over KV blocks of whole
pages (gathered through the block table), stopping at the last key its last query may see; only
blocks that reach past the tile's first query position -- the causal diagonal and the KV tail --
are masked. Two launches cover a step, and which one a sequence takes depends on its own q_len:

- split-K tiles, for decode and speculative verify (q_len <= ``split_max_q_len``): small tiles
  (``split_block_rows``) and the KV range cut into fixed splits of ``split_k_tokens``, one program
  each, so that a batch-1 decode at long context still fills every SM. A split writes its
  normalised partial output and log-sum-exp; a second small kernel merges a tile's splits.
- chunk tiles, for prefill chunks: ``block_rows`` rows (>= 64 so the dots compile to Hopper wgmma),
  one program per tile and KV head over the whole KV range.

Tile boundaries and split points depend only on a sequence's own q_len and kv_len (and static
shapes), never on the rest of the batch: a sequence's output is bitwise the same batched or alone.
The wrapper gathers the query tiles and scatters the results with plain XLA ops, so the kernel
itself only does dense loads, a page gather through the block table, and two dots (bf16 inputs,
float32 accumulation).

int8 KV pages (see ``kv_cache_update``): pass ``k_scales`` / ``v_scales`` [num_kv_heads, num_pages,
page_size] float32 with int8 pages. The kernel loads the int8 block (a quarter of the float32
bytes) and dequantizes it on chip, folding the per-token scales into the score and probability
columns: ``q . (s_k k) = s_k (q . k)`` and ``p @ (s_v v) = (p s_v) @ v``, i.e. O(rows x block)
multiplies instead of O(block x head_dim). The reference dequantizes the whole pool first. The XLA
path (``impl="xla"``) lives in ``ragged_paged_attention_xla``.
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
from pallas_kernels.ragged_paged_attention_xla import MASK_VALUE, ragged_paged_attention_xla, sequence_q_lens


@dataclasses.dataclass(frozen=True)
class RaggedPagedAttentionBlockSizes:
    """Tiling of the Pallas kernel.

    block_rows: rows of a prefill-chunk tile = tokens_per_tile * (num_heads // num_kv_heads); must hold
        at least one token's query-head group. >= 64 rows compile to wgmma on Hopper.
    block_k_tokens: KV tokens per inner step, rounded down to whole pages (at least one page).
    num_warps, num_stages: Triton launch parameters of the chunk tiles.
    split_max_q_len: sequences with 1..split_max_q_len queries (decode, speculative verify) take the
        split-K tiles; 0 sends everything through chunk tiles.
    split_block_rows: rows of a split-K tile (raised to the next power of two >= the head group).
    split_k_tokens: KV tokens per split, one program each (at least one KV block).
    max_splits: splits per sequence at most; block tables longer than max_splits * split_k_tokens get
        longer splits (bounds the [KVH, tiles, splits, rows, head_dim] partial outputs).
    split_num_warps, split_num_stages: Triton launch parameters of the split-K tiles.
    """

    # Defaults from compiling for sm_90 (scripts/check_gpu_kernels.py): chunk tiles of 128 rows x 64 keys
    # with 8 warps use wgmma and no spills at head_dim 128, bf16 and int8; split-K tiles of 16 rows with
    # 4 warps; 128-token splits give a batch-1 8k decode 64 programs per KV head.
    block_rows: int = 128
    block_k_tokens: int = 64
    num_warps: int = 8
    num_stages: int = 2
    split_max_q_len: int = 8
    split_block_rows: int = 16
    split_k_tokens: int = 128
    split_num_warps: int = 4
    split_num_stages: int = 2
    max_splits: int = 64

    def __post_init__(self):
        for name in ("block_rows", "block_k_tokens", "num_warps", "split_block_rows", "split_k_tokens",
                     "split_num_warps"):
            if not backend.is_power_of_two(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be a power of two")
        for name in ("num_stages", "split_num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_splits < 1:
            raise ValueError(f"max_splits={self.max_splits} must be >= 1")
        if self.split_max_q_len < 0:
            raise ValueError(f"split_max_q_len={self.split_max_q_len} must be >= 0")


def _pages_per_block(block_k_tokens: int, page_size: int, pages_per_seq: int) -> int:
    """Whole pages per KV block: block_k_tokens worth, at least one, at most the table (power of two)."""
    return max(1, min(block_k_tokens // page_size, 1 << (pages_per_seq.bit_length() - 1)))


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

    q_lens = sequence_q_lens(cu_q_lens, num_seqs)
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
# Pallas kernel
# --------------------------------------------------------------------------------------------
def _keys_needed(first_position, num_tokens, kv_len):
    """Keys a tile attends to: causal, so its last real token sees the most. 0 for an idle tile."""
    return jnp.where(num_tokens > 0, jnp.minimum(kv_len, first_position + num_tokens), 0)


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
    # and, split-K only, lse_ref [block_rows] float32
    sm_scale: float,
    group: int,
    pages_per_block: int,
    blocks_per_split: int | None,  # None: the program visits the tile's whole KV range
):
    split = blocks_per_split is not None
    if split:
        *scale_refs, o_ref, lse_ref = refs
    else:
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
    first_block, end_block = 0, pl.cdiv(_keys_needed(first_position, num_tokens, kv_len), block_k)
    if split:
        first_block = pl.program_id(2) * blocks_per_split
        end_block = jnp.minimum(end_block, first_block + blocks_per_split)
    # Blocks that end at or before the first token's position hold only keys every row may see
    # (position < kv_len): no mask there.
    mask_from = jnp.clip((first_position + 1) // block_k, first_block, end_block)

    def kv_block(kj, carry, *, q, masked):
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
        if masked:
            # Keys past a row's position (which also covers the KV tail: positions < kv_len).
            allowed = (kj * block_k + jnp.arange(block_k))[None, :] <= positions[:, None]
            scores = jnp.where(allowed, scores, MASK_VALUE)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        correction = jnp.exp(row_max - new_max)
        probs = jnp.exp(scores - new_max[:, None])
        if masked:  # a row with no allowed key yet has new_max == MASK_VALUE and exp(0) == 1 there
            probs = jnp.where(allowed, probs, 0.0)
        row_sum = row_sum * correction + jnp.sum(probs, axis=1)
        if quantized:
            probs = probs * v_scale[None, :]
        pv = jnp.dot(probs.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
        return acc * correction[:, None] + pv, new_max, row_sum

    # Idle programs (padding tiles, splits past the sequence's keys) exit at once: nothing is loaded or
    # stored; the wrapper knows which ones they are.
    @pl.when(first_block < end_block)
    def _attend():
        init = (jnp.zeros((block_rows, head_dim), jnp.float32), jnp.full((block_rows,), MASK_VALUE, jnp.float32),
                jnp.zeros((block_rows,), jnp.float32))
        q = q_ref[...]
        carry = lax.fori_loop(first_block, mask_from, functools.partial(kv_block, q=q, masked=False), init)
        acc, row_max, row_sum = lax.fori_loop(mask_from, end_block, functools.partial(kv_block, q=q, masked=True),
                                              carry)
        # A row can see no key of a split (speculative verify: the split starts past its position).
        seen = row_sum > 0
        safe_sum = jnp.where(seen, row_sum, 1.0)
        out = acc / safe_sum[:, None]
        if split:
            o_ref[...] = out.astype(o_ref.dtype)
            lse_ref[...] = jnp.where(seen, row_max + jnp.log(safe_sum), MASK_VALUE)
        else:
            o_ref[...] = jnp.where(row_is_real[:, None], out, 0.0).astype(o_ref.dtype)


def _tile_layout(q_lens, cu_q_lens, kv_lens, seq_of_token, *, tokens_per_tile, num_tiles):
    """Cuts every sequence's q_lens[s] queries into tiles of tokens_per_tile tokens, in sequence order.

    Returns per-tile arrays [num_tiles] (sequence, first token row in q, real token count -- 0 for idle
    tiles past the last one --, absolute position of the first token, the sequence's KV length) and,
    per token [num_tokens], its tile and its token slot in that tile (meaningless for tokens of
    sequences with q_lens 0 here).
    """
    max_seqs = kv_lens.shape[0]
    tiles_per_seq = pl.cdiv(q_lens, tokens_per_tile)
    tile_ends = jnp.cumsum(tiles_per_seq)  # inclusive prefix sums
    tiles_before = tile_ends - tiles_per_seq
    tiles = jnp.arange(num_tiles)
    seq = jnp.minimum(jnp.searchsorted(tile_ends, tiles, side="right"), max_seqs - 1)
    offset = (tiles - tiles_before[seq]) * tokens_per_tile
    num_tokens = jnp.where(tiles < tile_ends[-1], jnp.clip(q_lens[seq] - offset, 0, tokens_per_tile), 0)
    token_offset = jnp.arange(seq_of_token.shape[0]) - cu_q_lens[seq_of_token]
    return dict(
        seq=seq.astype(jnp.int32), first_row=(cu_q_lens[seq] + offset).astype(jnp.int32),
        num_tokens=num_tokens.astype(jnp.int32),
        first_position=(kv_lens[seq] - q_lens[seq] + offset).astype(jnp.int32), kv_len=kv_lens[seq].astype(jnp.int32),
        tile_of_token=jnp.clip(tiles_before[seq_of_token] + token_offset // tokens_per_tile, 0, num_tiles - 1),
        slot_of_token=token_offset % tokens_per_tile)


def _attend_tiles(q, k_pages, v_pages, block_tables, scales, layout, *, block_rows, block_k_tokens, split_k_tokens,
                  max_splits, num_warps, num_stages, sm_scale, interpret, lowering):
    """One launch over the tiles of `layout`; split_k_tokens=None: no split. Returns [num_tokens, H, hd]
    (rows of tokens outside this layout's sequences are garbage)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    group = num_heads // num_kv_heads
    num_tiles = layout["seq"].shape[0]
    pages_per_block = _pages_per_block(min(block_k_tokens, split_k_tokens or block_k_tokens), page_size, pages_per_seq)
    block_k = pages_per_block * page_size
    num_kv_blocks = pl.cdiv(pages_per_seq, pages_per_block)
    block_tables = jnp.pad(block_tables, ((0, 0), (0, num_kv_blocks * pages_per_block - pages_per_seq)))
    blocks_per_split, num_splits = None, 1
    if split_k_tokens is not None:
        # Longer splits for tables too long for max_splits: bounds the partial outputs' memory; depends on
        # the table width only (static), so a sequence splits the same way in any batch.
        blocks_per_split = max(1, split_k_tokens // block_k, pl.cdiv(num_kv_blocks, max_splits))
        num_splits = pl.cdiv(num_kv_blocks, blocks_per_split)

    # Gather query tiles [KVH, num_tiles, block_rows, hd]: row r of a tile = token r // group of the
    # tile, query head (kv_head * group + r % group). Rows past the real tokens read row 0.
    rows = jnp.arange(block_rows)
    token_in_tile = rows // group
    row_is_real = token_in_tile[None, :] < layout["num_tokens"][:, None]  # [num_tiles, block_rows]
    token_rows = jnp.where(row_is_real, layout["first_row"][:, None] + token_in_tile[None, :], 0)
    heads = jnp.arange(num_kv_heads)[:, None] * group + (rows % group)[None, :]  # [KVH, block_rows]
    q_tiles = q[token_rows[None, :, :], heads[:, None, :]]  # [KVH, num_tiles, block_rows, hd]

    kernel = functools.partial(ragged_paged_attention_kernel, sm_scale=sm_scale, group=group,
                               pages_per_block=pages_per_block, blocks_per_split=blocks_per_split)
    # Tiles on the first grid axis: CUDA allows 2**31 - 1 blocks there (65535 on the others), and
    # neighbouring programs then share a sequence's KV pages in L2.
    grid = (num_tiles, num_kv_heads, num_splits)
    per_tile = pl.BlockSpec((1,), lambda i, h, j: (i,))
    scales_spec = pl.BlockSpec((None, num_pages, page_size), lambda i, h, j: (h, 0, 0))
    pages_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda i, h, j: (h, 0, 0, 0))
    if split_k_tokens is None:
        out_shape = jax.ShapeDtypeStruct(q_tiles.shape, q.dtype)
        out_specs = pl.BlockSpec((None, None, block_rows, head_dim), lambda i, h, j: (h, i, 0, 0))
    else:  # per split: normalised partial output (q's dtype) and its log-sum-exp
        out_shape = (jax.ShapeDtypeStruct((num_kv_heads, num_tiles, num_splits, block_rows, head_dim), q.dtype),
                     jax.ShapeDtypeStruct((num_kv_heads, num_tiles, num_splits, block_rows), jnp.float32))
        out_specs = (pl.BlockSpec((None, None, None, block_rows, head_dim), lambda i, h, j: (h, i, j, 0, 0)),
                     pl.BlockSpec((None, None, None, block_rows), lambda i, h, j: (h, i, j, 0)))
    result = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            per_tile,  # tile_seq
            per_tile,  # tile_first_position
            per_tile,  # tile_num_tokens
            per_tile,  # tile_kv_len
            pl.BlockSpec(block_tables.shape, lambda i, h, j: (0, 0)),  # block_tables
            pl.BlockSpec((None, None, block_rows, head_dim), lambda i, h, j: (h, i, 0, 0)),  # q tiles
            pages_spec,  # k_pages
            pages_spec,  # v_pages
            *[scales_spec] * len(scales),  # k_scales, v_scales (int8 pages only)
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else backend.gpu_compiler_params(
            lowering, num_warps=num_warps, num_stages=num_stages),
        name=(f"ragged_paged_attention_chunk_{block_rows=}_{pages_per_block=}" if split_k_tokens is None else
              f"ragged_paged_attention_split_k_{block_rows=}_{pages_per_block=}_{blocks_per_split=}")
        + ("_int8" if scales else ""),
    )(layout["seq"], layout["first_position"], layout["num_tokens"], layout["kv_len"], block_tables,
      q_tiles, k_pages, v_pages, *scales)

    if split_k_tokens is None:
        out_tiles = result
    else:
        keys_needed = _keys_needed(layout["first_position"], layout["num_tokens"], layout["kv_len"])
        tile_num_splits = pl.cdiv(pl.cdiv(keys_needed, block_k), blocks_per_split).astype(jnp.int32)
        out_tiles = _combine_splits(*result, tile_num_splits, interpret=interpret, lowering=lowering)
    # Token t, head h -> tile of t, row slot * group + h % group.
    head = jnp.arange(num_heads)
    row_of_token = layout["slot_of_token"] * group
    return out_tiles[head[None, :] // group, layout["tile_of_token"][:, None], row_of_token[:, None] + head % group]


def split_combine_kernel(
    tile_num_splits_ref,  # [1] int32: splits the attention kernel ran for this tile (the rest hold no data)
    partial_ref,  # [num_splits, block_rows, head_dim]: each split's output, normalised over its own keys
    lse_ref,  # [num_splits, block_rows] float32: each split's log-sum-exp of scores
    o_ref,  # [block_rows, head_dim]
):
    """Log-sum-exp merge of a tile's splits, in split order. A kernel rather than XLA ops so that the
    arithmetic is per tile and cannot depend on how many other tiles the batch has."""
    num_splits = tile_num_splits_ref[0]
    block_rows, head_dim = o_ref.shape
    lse_max = lax.fori_loop(0, num_splits, lambda j, m: jnp.maximum(m, lse_ref[j]),
                            jnp.full((block_rows,), MASK_VALUE, jnp.float32))

    def add_split(j, carry):
        acc, weight_sum = carry
        weight = jnp.exp(lse_ref[j] - lse_max)  # the largest split weighs 1
        return acc + weight[:, None] * partial_ref[j].astype(jnp.float32), weight_sum + weight

    acc, weight_sum = lax.fori_loop(0, num_splits, add_split, (jnp.zeros((block_rows, head_dim), jnp.float32),
                                                                jnp.zeros((block_rows,), jnp.float32)))
    o_ref[...] = (acc / jnp.where(weight_sum > 0, weight_sum, 1.0)[:, None]).astype(o_ref.dtype)


def _combine_splits(partial_out, lse, tile_num_splits, *, interpret, lowering):
    """partial_out [KVH, tiles, splits, rows, hd], lse [KVH, tiles, splits, rows] -> [KVH, tiles, rows, hd]."""
    num_kv_heads, num_tiles, num_splits, block_rows, head_dim = partial_out.shape
    return pl.pallas_call(
        split_combine_kernel,
        grid=(num_tiles, num_kv_heads),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h: (i,)),  # tile_num_splits
            pl.BlockSpec((None, None, num_splits, block_rows, head_dim), lambda i, h: (h, i, 0, 0, 0)),
            pl.BlockSpec((None, None, num_splits, block_rows), lambda i, h: (h, i, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, block_rows, head_dim), lambda i, h: (h, i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_kv_heads, num_tiles, block_rows, head_dim), partial_out.dtype),
        interpret=interpret,
        compiler_params=None if interpret else backend.gpu_compiler_params(lowering, num_warps=4, num_stages=1),
        name=f"ragged_paged_attention_split_k_combine_{block_rows=}",
    )(tile_num_splits, partial_out, lse)


def _ragged_paged_attention_pallas(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, k_scales=None,
                                   v_scales=None, *, sm_scale, block_sizes, interpret, lowering):
    num_tokens, num_heads, _ = q.shape
    num_kv_heads = k_pages.shape[0]
    max_seqs = block_tables.shape[0]
    group = num_heads // num_kv_heads
    q_lens = sequence_q_lens(cu_q_lens, num_seqs)
    tokens = jnp.arange(num_tokens)
    seq_of_token = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], tokens, side="right"), max_seqs - 1)
    is_real = tokens < cu_q_lens[num_seqs[0]]
    # Decided per sequence by its own q_len only (batch invariance).
    takes_split = q_lens <= block_sizes.split_max_q_len
    launch = functools.partial(_attend_tiles, q, k_pages, v_pages, block_tables,
                               [] if k_scales is None else [k_scales, v_scales], sm_scale=sm_scale,
                               block_k_tokens=block_sizes.block_k_tokens, max_splits=block_sizes.max_splits,
                               interpret=interpret, lowering=lowering)
    outputs = []
    # Static bounds on each launch's tiles: a tile holds >= 1 token, and a sequence's tiles number
    # cdiv(q_len, tokens_per_tile) <= q_len / tokens_per_tile + 1.
    if block_sizes.split_max_q_len > 0:
        rows = max(block_sizes.split_block_rows, backend.next_power_of_two(group))
        tokens_per_tile = rows // group
        num_tiles = min(num_tokens, pl.cdiv(num_tokens, tokens_per_tile) + max_seqs,
                        max_seqs * pl.cdiv(block_sizes.split_max_q_len, tokens_per_tile))
        layout = _tile_layout(jnp.where(takes_split, q_lens, 0), cu_q_lens, kv_lens, seq_of_token,
                              tokens_per_tile=tokens_per_tile, num_tiles=num_tiles)
        outputs.append((takes_split, launch(layout, block_rows=rows, split_k_tokens=block_sizes.split_k_tokens,
                                            num_warps=block_sizes.split_num_warps,
                                            num_stages=block_sizes.split_num_stages)))
    max_chunk_seqs = min(max_seqs, num_tokens // (block_sizes.split_max_q_len + 1))
    if max_chunk_seqs > 0:
        rows = max(block_sizes.block_rows, 16)
        tokens_per_tile = rows // group
        layout = _tile_layout(jnp.where(takes_split, 0, q_lens), cu_q_lens, kv_lens, seq_of_token,
                              tokens_per_tile=tokens_per_tile,
                              num_tiles=pl.cdiv(num_tokens, tokens_per_tile) + max_chunk_seqs)
        outputs.append((~takes_split, launch(layout, block_rows=rows, split_k_tokens=None,
                                             num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages)))
    out = jnp.zeros(q.shape, q.dtype)
    for taken, launch_out in outputs:
        out = jnp.where(taken[seq_of_token][:, None, None], launch_out.astype(q.dtype), out)
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
    if backend.is_pallas(impl) and not backend.is_power_of_two(page_size):
        raise ValueError(f"page_size={page_size} must be a power of two for the Pallas kernel")
    if impl == "pallas" and not (backend.is_power_of_two(head_dim) and head_dim >= 16):
        raise ValueError(f"head_dim={head_dim} must be a power of two >= 16 for the Pallas GPU kernel")


@functools.partial(jax.jit, static_argnames=("sm_scale", "impl", "block_sizes", "lowering"))
def _ragged_paged_attention_jit(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, k_scales,
                                v_scales, *, sm_scale, impl, block_sizes, lowering):
    args = (q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, k_scales, v_scales)
    if impl == "reference":
        return ragged_paged_attention_reference(*args, sm_scale=sm_scale)
    if impl == "xla":
        return ragged_paged_attention_xla(*args, sm_scale=sm_scale)
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
