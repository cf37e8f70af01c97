"""ragged_paged_attention: xla and pallas_interpret paths against the float32 reference.

Tolerances: float32 within 1e-4 max abs, bfloat16 within 2e-2 max abs. The reference itself is
checked once against a per-token numpy loop.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import RaggedPagedAttentionBlockSizes, ragged_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
IMPLS = ("xla", "pallas_interpret")
# Small tiles so interpret mode exercises several tiles, KV blocks and splits even at tiny shapes.
SMALL_BLOCKS = RaggedPagedAttentionBlockSizes(block_rows=16, block_k_tokens=16, split_k_tokens=16)


def make_batch(q_lens, kv_lens, *, page_size=8, num_kv_heads=2, group=2, head_dim=16, dtype=jnp.float32,
               padded_seqs=1, padded_tokens=3, spare_pages=5, seed=0):
    """A ragged batch with shuffled, non-contiguous pages and padded sequence slots / token rows."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    max_seqs = num_seqs + padded_seqs
    pages_needed = [math.ceil(kv / page_size) for kv in kv_lens]
    pages_per_seq = max(max(pages_needed), 1) + 1  # one spare column: unused entries must be ignored
    num_pages = sum(pages_needed) + spare_pages
    page_order = rng.permutation(num_pages)
    block_tables = rng.integers(0, num_pages, size=(max_seqs, pages_per_seq)).astype(np.int32)  # junk
    used = 0
    for s, n in enumerate(pages_needed):
        block_tables[s, :n] = page_order[used:used + n]
        used += n
    cu_q_lens = np.zeros(max_seqs + 1, np.int32)
    cu_q_lens[1:num_seqs + 1] = np.cumsum(q_lens)
    cu_q_lens[num_seqs + 1:] = cu_q_lens[num_seqs]
    kv = np.zeros(max_seqs, np.int32)
    kv[:num_seqs] = kv_lens
    num_tokens = int(sum(q_lens)) + padded_tokens
    num_heads = num_kv_heads * group
    q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float32)
    k_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    return (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(kv),
            jnp.asarray(block_tables), jnp.asarray(cu_q_lens), jnp.asarray([num_seqs], jnp.int32))


def numpy_attention(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs):
    """One token, one head at a time, straight from the DESIGN.md definition."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    kv_lens, block_tables, cu_q_lens = np.asarray(kv_lens), np.asarray(block_tables), np.asarray(cu_q_lens)
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    out = np.zeros_like(q)
    for s in range(int(num_seqs[0])):
        q_len = cu_q_lens[s + 1] - cu_q_lens[s]
        for i in range(q_len):
            position = kv_lens[s] - q_len + i
            kv_positions = np.arange(position + 1)
            pages = block_tables[s, kv_positions // page_size]
            for h in range(num_heads):
                keys = k_pages[h // group, pages, kv_positions % page_size]
                values = v_pages[h // group, pages, kv_positions % page_size]
                scores = keys @ q[cu_q_lens[s] + i, h] / math.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                out[cu_q_lens[s] + i, h] = weights @ values / weights.sum()
    return out


def check_against_reference(batch, impl, dtype=jnp.float32, block_sizes=SMALL_BLOCKS):
    expected = ragged_paged_attention(*batch, impl="reference")
    got = ragged_paged_attention(*batch, impl=impl, block_sizes=block_sizes)
    assert got.shape == batch[0].shape and got.dtype == batch[0].dtype
    assert bool(jnp.all(jnp.isfinite(got))), "padding rows must be finite"
    real = int(batch[5][int(batch[6][0])])
    error = float(jnp.max(jnp.abs(got[:real].astype(jnp.float32) - expected[:real].astype(jnp.float32))))
    assert error <= TOLERANCE[dtype], f"{impl}: max abs error {error}"


def test_reference_matches_numpy_loop():
    batch = make_batch([1, 4, 0, 9], [7, 12, 3, 9], group=3, page_size=8)
    got = ragged_paged_attention_reference(*batch, sm_scale=1 / math.sqrt(16))
    real = int(batch[5][4])
    np.testing.assert_allclose(np.asarray(got)[:real], numpy_attention(*batch)[:real], atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_batch_with_empty_partial_and_full_pages(impl):
    # kv 1: one token on a page; 8/16: exactly full pages; 9: one token into a new page.
    batch = make_batch([1, 1, 1, 1, 1], [1, 8, 9, 16, 23], page_size=8)
    check_against_reference(batch, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_decode_prefill_and_speculative_batch(impl):
    # decode, speculative verify (3 queries on a long prefix), fresh prefill, padded seq, chunked prefill.
    batch = make_batch([1, 3, 17, 0, 6], [30, 21, 17, 4, 40], page_size=8, group=2, padded_seqs=2)
    check_against_reference(batch, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_gqa_ratios(impl, group):
    batch = make_batch([1, 5, 2, 11], [12, 5, 19, 30], num_kv_heads=2 if group < 8 else 1, group=group, page_size=8)
    block_sizes = RaggedPagedAttentionBlockSizes(block_rows=max(16, group), block_k_tokens=16, split_k_tokens=16)
    check_against_reference(batch, impl, block_sizes=block_sizes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page_size", [8, 16, 64])
def test_page_sizes(impl, page_size):
    batch = make_batch([1, 4, 1], [page_size, page_size + 3, 2 * page_size + 1], page_size=page_size)
    check_against_reference(batch, impl, block_sizes=RaggedPagedAttentionBlockSizes(16, page_size,
                                                                                    split_k_tokens=page_size))


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(impl):
    batch = make_batch([1, 7, 2], [9, 7, 30], dtype=jnp.bfloat16, group=2)
    check_against_reference(batch, impl, dtype=jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_dim_64_and_default_blocks(impl):
    # Default blocks: the 3-query and 1-query sequences take split-K tiles, the 12-query one a chunk tile.
    batch = make_batch([3, 1, 12], [40, 70, 12], head_dim=64, page_size=16, group=4)
    check_against_reference(batch, impl, block_sizes=RaggedPagedAttentionBlockSizes())


@pytest.mark.parametrize("impl", IMPLS)
def test_all_sequences_padded(impl):
    batch = make_batch([2], [5], padded_seqs=2)
    batch = batch[:6] + (jnp.zeros((1,), jnp.int32),)  # num_seqs = 0: everything is padding
    got = ragged_paged_attention(*batch, impl=impl, block_sizes=SMALL_BLOCKS)
    assert bool(jnp.all(jnp.isfinite(got)))


@pytest.mark.parametrize("group", [4, 8])
def test_speculative_verify_across_split_boundaries(group):
    """Verify windows (q_len 2-5) that straddle a 16-token split, where the later split holds no key of
    the early drafts, and one that starts exactly on a split."""
    batch = make_batch([2, 3, 4, 5, 5], [17, 34, 50, 67, 85], num_kv_heads=1, group=group, page_size=8)
    check_against_reference(batch, "pallas_interpret")


@pytest.mark.parametrize("block_sizes", [
    RaggedPagedAttentionBlockSizes(16, 16, split_max_q_len=0),  # everything in chunk tiles
    RaggedPagedAttentionBlockSizes(16, 16, split_max_q_len=64, split_k_tokens=32),  # everything split, 2 blocks each
    RaggedPagedAttentionBlockSizes(32, 8, split_block_rows=32, split_k_tokens=8),  # one page per block and split
    RaggedPagedAttentionBlockSizes(16, 8, split_k_tokens=8, max_splits=2),  # 6-page tables: 2 splits of 3 pages
], ids=["chunk_only", "split_only", "page_splits", "capped_splits"])
def test_split_and_chunk_tiles_each_match_reference(block_sizes):
    batch = make_batch([1, 3, 17, 0, 6, 2], [30, 21, 17, 4, 40, 9], page_size=8, group=3, padded_seqs=2)
    check_against_reference(batch, "pallas_interpret", block_sizes=block_sizes)


def alone(batch, seq):
    """The batch cut down to sequence `seq` (same pool, same block-table width)."""
    q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, _ = batch
    start, stop = int(cu_q_lens[seq]), int(cu_q_lens[seq + 1])
    return (q[start:stop], k_pages, v_pages, kv_lens[seq:seq + 1], block_tables[seq:seq + 1],
            jnp.asarray([0, stop - start], jnp.int32), jnp.ones((1,), jnp.int32))


def test_pallas_output_is_batch_invariant():
    """Each sequence's rows are bitwise the same computed alone as inside a mixed batch (decode,
    speculative verify, prefill chunk): tiles and splits depend only on the sequence itself."""
    batch = make_batch([1, 4, 13, 1, 2], [37, 21, 29, 5, 50], page_size=8, group=4, head_dim=32)
    together = np.asarray(ragged_paged_attention(*batch, impl="pallas_interpret", block_sizes=SMALL_BLOCKS))
    cu_q_lens = np.asarray(batch[5])
    for seq in range(3):  # decode over 3 splits, verify, chunk
        by_itself = ragged_paged_attention(*alone(batch, seq), impl="pallas_interpret", block_sizes=SMALL_BLOCKS)
        np.testing.assert_array_equal(together[cu_q_lens[seq]:cu_q_lens[seq + 1]], np.asarray(by_itself),
                                      err_msg=f"sequence {seq}")


def test_long_sequences_xla():
    # 513 new tokens after a 511-token prefix, next to decodes; page_size 16.
    batch = make_batch([513, 1, 127, 1], [1024, 300, 127, 1], page_size=16, group=3, head_dim=32)
    check_against_reference(batch, "xla")


@pytest.mark.slow
def test_long_sequences_interpret():
    batch = make_batch([513, 1, 127], [1024, 300, 127], page_size=16, group=3, head_dim=32)
    check_against_reference(batch, "pallas_interpret", block_sizes=RaggedPagedAttentionBlockSizes(64, 64))


def test_xla_path_is_memory_bounded():
    """512 tokens against 4096-token contexts: temporaries stay far below a [T, max_kv] KV gather."""
    num_tokens, num_heads, num_kv_heads, head_dim, page_size, max_seqs = 512, 8, 2, 64, 16, 4
    pages_per_seq = 4096 // page_size
    f32 = jnp.float32
    shapes = (
        jax.ShapeDtypeStruct((num_tokens, num_heads, head_dim), f32),
        jax.ShapeDtypeStruct((num_kv_heads, max_seqs * pages_per_seq, page_size, head_dim), f32),
        jax.ShapeDtypeStruct((num_kv_heads, max_seqs * pages_per_seq, page_size, head_dim), f32),
        jax.ShapeDtypeStruct((max_seqs,), jnp.int32),
        jax.ShapeDtypeStruct((max_seqs, pages_per_seq), jnp.int32),
        jax.ShapeDtypeStruct((max_seqs + 1,), jnp.int32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    compiled = jax.jit(lambda *a: ragged_paged_attention(*a, impl="xla")).lower(*shapes).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    per_token_kv_gather = num_tokens * 4096 * num_kv_heads * head_dim * 4
    # The one allowed big temporary: the batch's own pages, compacted out of the pool once (K and V,
    # [S, max_kv] -- per sequence, never per token).
    compacted_batch_kv = 2 * max_seqs * 4096 * num_kv_heads * head_dim * 4
    assert temp_bytes < per_token_kv_gather / 50 + compacted_batch_kv, f"{temp_bytes=} vs {per_token_kv_gather=}"


def test_auto_resolves_to_xla_on_cpu():
    batch = make_batch([2, 1], [4, 9])
    np.testing.assert_array_equal(np.asarray(ragged_paged_attention(*batch)),
                                  np.asarray(ragged_paged_attention(*batch, impl="xla")))


def test_works_under_outer_jit():
    batch = make_batch([2, 1], [4, 9])
    got = jax.jit(lambda *a: ragged_paged_attention(*a, impl="xla"))(*batch)
    expected = ragged_paged_attention(*batch, impl="reference")
    assert float(jnp.max(jnp.abs(got[:3] - expected[:3]))) <= 1e-4


class TestValidation:
    batch = make_batch([2, 1], [4, 9], group=3)

    def call(self, *replacements, **kwargs):
        args = list(self.batch)
        for index, value in replacements:
            args[index] = value
        return ragged_paged_attention(*args, **kwargs)

    def test_heads_not_multiple_of_kv_heads(self):
        q = jnp.zeros((6, 5, 16), jnp.float32)
        with pytest.raises(ValueError, match=r"num_heads=5 must be a multiple of num_kv_heads=2"):
            self.call((0, q))

    def test_q_rank(self):
        with pytest.raises(ValueError, match=r"q.shape=\(6, 96\)"):
            self.call((0, jnp.zeros((6, 96), jnp.float32)))

    def test_head_dim_mismatch(self):
        with pytest.raises(ValueError, match=r"head_dim"):
            self.call((0, jnp.zeros((6, 6, 8), jnp.float32)))

    def test_v_pages_shape(self):
        with pytest.raises(ValueError, match=r"v_pages.shape=.* must equal k_pages.shape"):
            self.call((2, self.batch[2][:, :1]))

    def test_int_dtype_q(self):
        with pytest.raises(ValueError, match=r"q.dtype=int32"):
            self.call((0, self.batch[0].astype(jnp.int32)))

    def test_lengths_dtype(self):
        with pytest.raises(ValueError, match=r"kv_lens.dtype=int64|kv_lens.dtype=float32"):
            self.call((3, self.batch[3].astype(jnp.float32)))

    def test_cu_q_lens_shape(self):
        with pytest.raises(ValueError, match=r"cu_q_lens.shape=\(3,\) must be \(4,\)"):
            self.call((5, self.batch[5][:3]))

    def test_num_seqs_shape(self):
        with pytest.raises(ValueError, match=r"num_seqs.shape=\(\) must be \(1,\)"):
            self.call((6, jnp.int32(2)))

    def test_page_size_power_of_two_for_pallas(self):
        k_pages = jnp.zeros((2, 4, 6, 16), jnp.float32)
        with pytest.raises(ValueError, match=r"page_size=6 must be a power of two"):
            self.call((1, k_pages), (2, k_pages), impl="pallas_interpret")

    def test_block_rows_hold_a_head_group(self):
        batch = make_batch([1], [3], num_kv_heads=1, group=32)
        with pytest.raises(ValueError, match=r"block_rows=16 must be >= num_heads // num_kv_heads=32"):
            ragged_paged_attention(*batch, impl="pallas_interpret",
                                   block_sizes=RaggedPagedAttentionBlockSizes(block_rows=16))

    def test_unknown_impl(self):
        with pytest.raises(ValueError, match=r"impl='cuda' is not one of"):
            self.call(impl="cuda")

    def test_block_sizes_validated(self):
        with pytest.raises(ValueError, match=r"block_rows=24 must be a power of two"):
            RaggedPagedAttentionBlockSizes(block_rows=24)
        with pytest.raises(ValueError, match=r"block_k_tokens=0 must be a power of two"):
            RaggedPagedAttentionBlockSizes(block_k_tokens=0)
        with pytest.raises(ValueError, match=r"split_k_tokens=96 must be a power of two"):
            RaggedPagedAttentionBlockSizes(split_k_tokens=96)
        with pytest.raises(ValueError, match=r"split_max_q_len=-1 must be >= 0"):
            RaggedPagedAttentionBlockSizes(split_max_q_len=-1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_kernel_lowers_to_triton(dtype):
    """The Pallas -> Triton lowering runs without a GPU when lowering for the CUDA platform."""
    batch = make_batch([1, 3, 17, 0, 6], [30, 21, 17, 4, 40], page_size=16, group=4, head_dim=64, dtype=dtype)
    fn = lambda *a: ragged_paged_attention(*a, impl="pallas", lowering="triton")  # noqa: E731
    from pallas_kernels.backend import abstract_cuda_device

    try:
        with abstract_cuda_device():  # JAX >= 0.11 needs a target GPU to lower for
            hlo = jax.jit(fn).trace(*batch).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as error:
        pytest.skip(f"cannot lower for CUDA here: {error}")
    assert "__gpu$xla.gpu.triton" in hlo


@pytest.fixture(params=["cpu_kernel", "xla_pass"])
def decode_path(request, monkeypatch):
    """The XLA path's decode rows through the C++ kernel (pallas_kernels/cpu_attention.cc, on CPU with float32
    pages) or through its batched XLA pass (the fallback, and int8 pages)."""
    import importlib

    from pallas_kernels import cpu_quantized_matmul as cpu
    module = importlib.import_module("pallas_kernels.ragged_paged_attention_xla")
    if request.param == "xla_pass":
        monkeypatch.setattr(module, "_cpu_decode_kernel_for", lambda *a: False)
    elif jax.default_backend() != "cpu" or not cpu.available():
        pytest.skip("the CPU kernel library is not available here")
    jax.clear_caches()  # the jitted wrappers remember which path they traced
    yield request.param
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.parametrize("group,head_dim", [(4, 64), (5, 64), (3, 128), (2, 32)])
def test_cpu_decode_kernel_equals_the_reference_beside_prefill_rows(decode_path, group, head_dim):
    """Decode rows (GQA groups of 2-5, odd lengths, shuffled pages, an empty slot) next to prefill sequences: the
    C++ kernel (in the compiled program; head_dim 64 / 128 take its register-blocked value sums, 4 / 2 heads at a
    time, other sizes the plain loop) and the XLA pass both equal the reference."""
    import importlib
    module = importlib.import_module("pallas_kernels.ragged_paged_attention_xla")
    batch = make_batch([1, 7, 1, 0, 1, 19], [1, 30, 77, 4, 40, 19], page_size=16, group=group, head_dim=head_dim)
    fn = jax.jit(functools.partial(module.ragged_paged_attention_xla, sm_scale=0.125))
    assert ("ridgeline_decode_attention" in fn.lower(*batch).as_text()) == (decode_path == "cpu_kernel")
    got, expected = fn(*batch), ragged_paged_attention_reference(*batch, sm_scale=0.125)
    assert float(jnp.max(jnp.abs(got[:29] - expected[:29]))) <= 1e-4


@pytest.mark.parametrize("decode_chunk_tokens", [8, 32])
def test_xla_decode_chunks_smaller_than_prefill_blocks(decode_chunk_tokens, monkeypatch):
    """Batched-decode key chunks of 1 and 4 pages against 6-page tables (not a multiple of 4)."""
    import importlib
    module = importlib.import_module("pallas_kernels.ragged_paged_attention_xla")
    monkeypatch.setattr(module, "_cpu_decode_kernel_for", lambda *a: False)  # the XLA pass's chunks
    batch = make_batch([1, 1, 2, 1], [40, 33, 9, 17], page_size=8, group=2)  # 5 + 1 spare pages per seq
    got = jax.jit(functools.partial(module.ragged_paged_attention_xla, sm_scale=0.25, block_k_tokens=64,
                                    decode_chunk_tokens=decode_chunk_tokens))(*batch)
    expected = ragged_paged_attention_reference(*batch, sm_scale=0.25)
    assert float(jnp.max(jnp.abs(got[:5] - expected[:5]))) <= 1e-4


@pytest.mark.parametrize("einsum,shapes", [
    ("hsgd,hskd->hsgk", ((3, 3, 64), (3, 16, 64))),  # scores of one decode chunk
    ("hsgk,hskd->hsgd", ((3, 3, 16), (3, 16, 64))),  # probabilities @ values
], ids=["scores", "values"])
def test_xla_batched_dots_give_each_sequence_the_same_bits_at_any_batch_size(einsum, shapes):
    """What the decode pass's batch invariance rests on besides its own fixed-order sums: XLA:CPU's
    dot_general over a [heads, sequences] batch computes sequence 0 bitwise alike for 1 to 64 sequences."""
    rng = np.random.default_rng(0)
    first = [rng.standard_normal((s[0], 1) + s[1:]).astype(np.float32) for s in shapes]
    fn = jax.jit(lambda a, b: jnp.einsum(einsum, a, b))
    alone = np.asarray(fn(*first))
    for num_seqs in (2, 3, 8, 17, 64):
        operands = [np.concatenate([x, rng.standard_normal((s[0], num_seqs - 1) + s[1:]).astype(np.float32)], axis=1)
                    for x, s in zip(first, shapes)]
        np.testing.assert_array_equal(np.asarray(fn(*operands))[:, :1], alone, err_msg=f"{num_seqs=}")


def decode_batch(kv_lens, pages_per_seq, first_query, *, max_seqs=None, seed=0, kv_dtype=jnp.float32):
    """A decode-only batch over one fixed pool (default-model heads: 3 KV heads x 3, hd 64, page 16) whose
    first sequence is always the same row: query `first_query` over pages 0.. of the pool."""
    rng = np.random.default_rng(seed)
    pool = np.random.default_rng(1234)  # the same pool in every batch
    k_pages = pool.standard_normal((3, 200, 16, 64)).astype(np.float32)
    v_pages = pool.standard_normal((3, 200, 16, 64)).astype(np.float32)
    num_seqs = len(kv_lens)
    max_seqs = max_seqs or num_seqs
    block_tables = rng.integers(1, 200, (max_seqs, pages_per_seq)).astype(np.int32)
    block_tables[0] = np.arange(pages_per_seq)
    lens = np.zeros(max_seqs, np.int32)
    lens[:num_seqs] = kv_lens
    cu_q_lens = np.minimum(np.arange(max_seqs + 1), num_seqs).astype(np.int32)
    q = rng.standard_normal((max_seqs, 9, 64)).astype(np.float32)
    q[0] = first_query
    k, v = jnp.asarray(k_pages), jnp.asarray(v_pages)
    scales = {}
    if kv_dtype == jnp.int8:
        from pallas_kernels.kv_cache_update import quantize_kv
        k, k_scales = quantize_kv(k)
        v, v_scales = quantize_kv(v)
        scales = dict(k_scales=k_scales, v_scales=v_scales)
    return (jnp.asarray(q), k, v, jnp.asarray(lens), jnp.asarray(block_tables), jnp.asarray(cu_q_lens),
            jnp.asarray([num_seqs], jnp.int32)), scales


@pytest.mark.parametrize("kv_dtype", [jnp.float32, jnp.int8])
def test_xla_decode_row_is_batch_invariant(kv_dtype, decode_path):
    """A decode row's output is bitwise the same computed alone as in batches of other sizes, table widths
    and context mixes (shorter and much longer neighbours, padded sequence slots, prefill next to it):
    what the engine needs to recompute a rolled-back step in a different batch."""
    first_query = np.random.default_rng(7).standard_normal((9, 64)).astype(np.float32)
    kv_len = 77  # 5 pages, the last one partial
    alone_args, scales = decode_batch([kv_len], 5, first_query, kv_dtype=kv_dtype)
    alone = np.asarray(ragged_paged_attention(*alone_args, impl="xla", **scales)[0])
    expected = ragged_paged_attention(*alone_args, impl="reference", **scales)[0]
    assert float(jnp.max(jnp.abs(alone - expected))) <= 1e-4
    rng = np.random.default_rng(3)
    for max_seqs, pages_per_seq, others in [
            (4, 8, [3, 120]), (8, 16, [200] * 7), (16, 32, list(rng.integers(1, 512, 12))),
            (64, 8, [80] * 63), (64, 64, list(rng.integers(1, 1024, 60)))]:
        args, scales = decode_batch([kv_len, *others], pages_per_seq, first_query, max_seqs=max_seqs, seed=max_seqs,
                                    kv_dtype=kv_dtype)
        together = np.asarray(ragged_paged_attention(*args, impl="xla", **scales)[0])
        np.testing.assert_array_equal(together, alone, err_msg=f"{max_seqs=} {pages_per_seq=}")
    # Next to a prefill chunk (the per-sequence pass runs too): q_len 1 for row 0, 20 queries after it.
    args, scales = decode_batch([kv_len, 300], 32, first_query, kv_dtype=kv_dtype)
    q = jnp.concatenate([args[0][:1], jnp.asarray(rng.standard_normal((20, 9, 64)), jnp.float32)])
    args = (q, *args[1:5], jnp.asarray([0, 1, 21], jnp.int32), args[6])
    together = np.asarray(ragged_paged_attention(*args, impl="xla", **scales)[0])
    np.testing.assert_array_equal(together, alone, err_msg="next to a prefill")
