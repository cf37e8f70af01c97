"""Model forward on tiny random configs: the ragged paged step must equal the plain full-sequence
computation, whatever the batching, page size, page order or attention path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference.simple import prompt_logits, single_sequence_inputs
from model.config import PRESETS, LlamaConfig
from model.llama import StepInputs, init_cache, init_params, make_step_fn

TINY = PRESETS["tiny"]


def dense_reference_logits(params, cfg: LlamaConfig, ids):
    """Plain causal transformer in float32 numpy-style jnp: no cache, no pages, no kernels."""
    x = params["embed"][jnp.asarray(ids)]
    T = len(ids)
    pos = jnp.arange(T, dtype=jnp.float32)
    inv = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)
    ang = pos[:, None] * inv[None]
    cos, sin = jnp.cos(ang), jnp.sin(ang)

    def rope(t):
        h = t.shape[-1] // 2
        a, b = t[..., :h], t[..., h:]
        return jnp.concatenate([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def norm(v, w):
        return v / jnp.sqrt(jnp.mean(v * v, -1, keepdims=True) + cfg.rms_norm_eps) * w

    L = params["layers"]
    for i in range(cfg.num_layers):
        h = norm(x, L["attn_norm"][i])
        q = (h @ L["wq"][i]).reshape(T, cfg.num_heads, cfg.head_dim)
        k = (h @ L["wk"][i]).reshape(T, cfg.num_kv_heads, cfg.head_dim)
        v = (h @ L["wv"][i]).reshape(T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.attention_bias:
            q = q + L["bq"][i].reshape(cfg.num_heads, cfg.head_dim)
            k = k + L["bk"][i].reshape(cfg.num_kv_heads, cfg.head_dim)
            v = v + L["bv"][i].reshape(cfg.num_kv_heads, cfg.head_dim)
        q, k = rope(q), rope(k)
        k = jnp.repeat(k, cfg.q_per_kv, axis=1)
        v = jnp.repeat(v, cfg.q_per_kv, axis=1)
        s = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim)
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool))[None], s, -jnp.inf)
        o = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s, -1), v).reshape(T, -1)
        x = x + o @ L["wo"][i]
        h = norm(x, L["mlp_norm"][i])
        x = x + (jax.nn.silu(h @ L["w_gate"][i]) * (h @ L["w_up"][i])) @ L["w_down"][i]
    x = norm(x, params["final_norm"])
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return np.asarray(x @ head)


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.key(0))


@pytest.mark.parametrize("cfg", [
    TINY,
    dataclasses.replace(TINY, tie_word_embeddings=True, num_kv_heads=4, name="tied-mha"),
    dataclasses.replace(TINY, attention_bias=True, num_kv_heads=1, architecture="qwen2", name="qwen-bias-mqa"),
])
def test_prefill_matches_dense_reference(cfg):
    params = init_params(cfg, jax.random.key(1))
    ids = list(np.random.default_rng(0).integers(0, cfg.vocab_size, 13))
    got = prompt_logits(params, cfg, ids, page_size=8, attn_impl="xla")
    want = dense_reference_logits(params, cfg, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_incremental_decode_matches_prefill(tiny_params):
    """Prefill 7 tokens then decode 6 one at a time == one prefill of all 13 (cache correctness)."""
    ids = list(np.random.default_rng(1).integers(0, TINY.vocab_size, 13))
    want = dense_reference_logits(tiny_params, TINY, ids)
    page_size, num_pages = 4, 4
    cache = init_cache(TINY, num_pages, page_size)
    step = make_step_fn(TINY, "xla")
    logits, cache = step(tiny_params, cache, single_sequence_inputs(ids[:7], 0, page_size, num_pages))
    np.testing.assert_allclose(np.asarray(logits[0]), want[6], atol=1e-4, rtol=1e-4)
    for t in range(7, 13):
        logits, cache = step(tiny_params, cache, single_sequence_inputs(ids[t:t + 1], t, page_size, num_pages))
        np.testing.assert_allclose(np.asarray(logits[0]), want[t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("page_size,impl", [(1, "xla"), (4, "xla"), (16, "xla"), (8, "pallas_interpret")])
def test_ragged_batch_with_shuffled_pages(tiny_params, page_size, impl):
    """Three sequences in one ragged step (one decode with a cached prefix, one chunked prefill continuing
    a cached prefix, one fresh prompt) over shuffled physical pages, plus padding rows."""
    rng = np.random.default_rng(page_size)
    seqs = [list(rng.integers(0, TINY.vocab_size, n)) for n in (9, 11, 5)]
    cached = [8, 6, 0]  # tokens already in the cache from an earlier step
    max_pages = -(-max(len(s) for s in seqs) // page_size)
    num_pages = 3 * max_pages + 2
    perm = rng.permutation(num_pages)
    tables = np.stack([perm[i * max_pages:(i + 1) * max_pages] for i in range(3)]).astype(np.int32)
    cache = init_cache(TINY, num_pages, page_size)
    step = make_step_fn(TINY, impl)

    def slots(s, positions):
        return [int(tables[s, p // page_size]) * page_size + p % page_size for p in positions]

    def run(parts, cache):
        tokens, positions, slot_ids, cu, kv_lens, last = [], [], [], [0], [], []
        for s, (start, stop) in enumerate(parts):
            tokens += seqs[s][start:stop]
            positions += list(range(start, stop))
            slot_ids += slots(s, range(start, stop))
            cu.append(len(tokens))
            kv_lens.append(stop)
            last.append(len(tokens) - 1)
        pad = 3
        inputs = StepInputs(
            tokens=jnp.asarray(tokens + [0] * pad, jnp.int32),
            positions=jnp.asarray(positions + [0] * pad, jnp.int32),
            slot_mapping=jnp.asarray(slot_ids + [-1] * pad, jnp.int32),
            cu_q_lens=jnp.asarray(cu + [cu[-1]], jnp.int32),  # one padded sequence with q_len 0
            kv_lens=jnp.asarray(kv_lens + [0], jnp.int32),
            block_tables=jnp.asarray(np.concatenate([tables, tables[:1]]), jnp.int32),
            num_seqs=jnp.asarray([3], jnp.int32),
            logits_indices=jnp.asarray(last, jnp.int32))
        return step(tiny_params, cache, inputs)

    # Step 1 fills the cached prefixes (sequence 2 has none: q_len 0 this step).
    _, cache = run([(0, cached[0]), (0, cached[1]), (0, 0)], cache)
    logits, cache = run([(cached[s], len(seqs[s])) for s in range(3)], cache)
    for s in range(3):
        want = dense_reference_logits(tiny_params, TINY, seqs[s])[-1]
        np.testing.assert_allclose(np.asarray(logits[s]), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_dense_prefill_path_matches_ragged(tiny_params, impl):
    """The flash-attention prefill path (fresh prompts padded to a dense block) equals the ragged path,
    on the XLA path and on the Pallas kernels (interpret mode)."""
    rng = np.random.default_rng(3)
    lens, Tpad, page_size = [5, 8], 8, 4
    seqs = [list(rng.integers(0, TINY.vocab_size, n)) for n in lens]
    num_pages = 4
    tables = np.array([[0, 1], [2, 3]], np.int32)
    tokens, positions, slots, cu, last = [], [], [], [0], []
    for s, ids in enumerate(seqs):
        n = len(ids)
        tokens += ids + [0] * (Tpad - n)
        positions += list(range(n)) + [0] * (Tpad - n)
        slots += [int(tables[s, p // page_size]) * page_size + p % page_size for p in range(n)] + [-1] * (Tpad - n)
        last.append(s * Tpad + n - 1)
    cu = [0, lens[0], lens[0] + lens[1]]
    # Dense layout: sequence s occupies rows [s*Tpad, s*Tpad + len); cu_q_lens still give the lengths.
    dense_inputs = StepInputs(
        tokens=jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions, jnp.int32),
        slot_mapping=jnp.asarray(slots, jnp.int32), cu_q_lens=jnp.asarray(cu, jnp.int32),
        kv_lens=jnp.asarray(lens, jnp.int32), block_tables=jnp.asarray(tables),
        num_seqs=jnp.asarray([2], jnp.int32), logits_indices=jnp.asarray(last, jnp.int32))
    logits, cache = make_step_fn(TINY, impl, Tpad)(tiny_params, init_cache(TINY, num_pages, page_size), dense_inputs)
    for s in range(2):
        want = dense_reference_logits(tiny_params, TINY, seqs[s])[-1]
        np.testing.assert_allclose(np.asarray(logits[s]), want, atol=1e-4, rtol=1e-4)
    # The pages written by the dense path serve a following decode step.
    nxt = 7
    dec = StepInputs(
        tokens=jnp.asarray([nxt], jnp.int32), positions=jnp.asarray([lens[0]], jnp.int32),
        slot_mapping=jnp.asarray([int(tables[0, lens[0] // page_size]) * page_size + lens[0] % page_size], jnp.int32),
        cu_q_lens=jnp.asarray([0, 1], jnp.int32), kv_lens=jnp.asarray([lens[0] + 1], jnp.int32),
        block_tables=jnp.asarray(tables[:1]), num_seqs=jnp.asarray([1], jnp.int32),
        logits_indices=jnp.asarray([0], jnp.int32))
    logits, _ = make_step_fn(TINY, impl)(tiny_params, cache, dec)
    want = dense_reference_logits(tiny_params, TINY, seqs[0] + [nxt])[-1]
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_changes_low_frequencies_only():
    cfg = PRESETS["llama3-1b"]
    base = dataclasses.replace(cfg, rope_scaling=None).rope_inv_freq()
    scaled = cfg.rope_inv_freq()
    assert np.allclose(scaled[:4], base[:4])  # high frequencies kept
    assert np.allclose(scaled[-4:], base[-4:] / cfg.rope_scaling.factor)  # low frequencies divided


@pytest.mark.parametrize("kwargs,match", [
    (dict(architecture="gpt-neox"), "architecture='gpt-neox'"),
    (dict(num_heads=4, num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(hidden_size=0), "hidden_size=0"),
])
def test_config_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **kwargs)


def test_unstacked_layers_equal_scan(tiny_params):
    """The unrolled per-layer path (used on CPU) computes exactly what the lax.scan path does."""
    from model.llama import unstack_layers

    ids = list(np.random.default_rng(4).integers(0, TINY.vocab_size, 9))
    stacked = prompt_logits(tiny_params, TINY, ids, page_size=4, attn_impl="xla")
    unstacked = prompt_logits(unstack_layers(tiny_params), TINY, ids, page_size=4, attn_impl="xla")
    np.testing.assert_allclose(unstacked, stacked, atol=1e-5)


# ----- int8 KV pools and the Triton lowering's 32-bit offsets -----
# One int8 pool array holds every layer. The Pallas Triton lowering indexes an array with i32 element offsets
# unless it exceeds 2**32 bytes, so int8 pools of 2-4 GiB would wrap: init_cache refuses them and the engine's
# budget sizing caps below. Llama-3-8B's KV shape per device at TP 1: 8 KV heads, 32 layers, head_dim 128.
LLAMA8B_KV = dataclasses.replace(TINY, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, name="llama8b-kv")
PAGE = 16
I32_LAST_SAFE_PAGES = 2**31 // (8 * 32 * PAGE * 128)       # 4096: exactly 2**31 int8 elements
I64_FIRST_PAGES = 2**32 // (8 * 32 * PAGE * 128) + 1       # 8193: just over 2**32 bytes


def test_int8_pool_sizes_never_land_where_offsets_wrap():
    from model.llama import pool_offsets_wrap, safe_pool_pages

    def wraps(pages, heads=8, dtype=jnp.int8):
        return pool_offsets_wrap((heads, 32 * pages, PAGE, 128), dtype)

    assert not wraps(I32_LAST_SAFE_PAGES) and wraps(I32_LAST_SAFE_PAGES + 1)
    assert wraps(I64_FIRST_PAGES - 1) and not wraps(I64_FIRST_PAGES)
    assert not wraps(I64_FIRST_PAGES - 1, dtype=jnp.bfloat16)  # 2-byte elements: i64 before 2**31 elements
    for pages in (1, 1000, I32_LAST_SAFE_PAGES, I32_LAST_SAFE_PAGES + 1, 6000, I64_FIRST_PAGES - 1,
                  I64_FIRST_PAGES, 20000):
        got = safe_pool_pages(LLAMA8B_KV, pages, PAGE, jnp.int8, 8)
        assert got <= pages and not wraps(got)
        assert got == (pages if not wraps(pages) else I32_LAST_SAFE_PAGES)
    # Per device under TP: 2 KV heads per device hold 4x the pages before the range begins.
    assert safe_pool_pages(LLAMA8B_KV, 4 * I32_LAST_SAFE_PAGES + 1, PAGE, jnp.int8, 2) == 4 * I32_LAST_SAFE_PAGES
    with pytest.raises(ValueError, match=r"num_pages=6000 .*use num_pages <= 4096 or >= 8193"):
        init_cache(LLAMA8B_KV, 6000, PAGE, jnp.int8)  # refused before anything is allocated


def test_engine_budget_caps_int8_pool_below_wrapping_range():
    from inference.engine import Engine, EngineConfig

    engine = Engine.__new__(Engine)  # only the sizing: no weights, no pool
    engine.cfg = dataclasses.replace(LLAMA8B_KV, max_position_embeddings=1 << 20)
    bytes_per_page = 2 * 8 * 32 * PAGE * 128 * (1 + 4 / 128)  # K and V, int8 plus per-token f32 scales
    for budget_pages, want in ((3000, 3000), (6000, I32_LAST_SAFE_PAGES), (9000, 9000)):
        engine.engine_cfg = EngineConfig(page_size=PAGE, kv_cache_memory_bytes=int(budget_pages * bytes_per_page) + 1,
                                         max_num_seqs=64, max_model_len=1 << 20)
        assert engine._pages_from_budget(jnp.int8) == want, budget_pages


def _triton_pool_offset_types(lower) -> set:
    """Offset types of the int8 pool's pointer arithmetic in the Triton IR the lowering builds."""
    import re

    tl = pytest.importorskip("jax._src.pallas.triton.lowering")  # private: skip cleanly if it moves
    if not hasattr(tl, "lower_jaxpr_to_triton_module"):
        pytest.skip("jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module moved")
    modules, original = [], tl.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module.operation.get_asm())
        return result

    tl.lower_jaxpr_to_triton_module = capture
    try:
        lower()
    finally:
        tl.lower_jaxpr_to_triton_module = original
    assert modules
    return {m for ir in modules for m in re.findall(r"tt\.addptr [^:]*: \S*!tt\.ptr<i8>>?, (?:tensor<[\dx]*)?(i\d+)", ir)}


@pytest.mark.parametrize("pages, offsets", [(I32_LAST_SAFE_PAGES, {"i32"}), (I32_LAST_SAFE_PAGES + 1, {"i32"}),
                                            (I64_FIRST_PAGES, {"i64"})])
def test_triton_lowering_offsets_at_the_int8_pool_boundary(pages, offsets):
    """KV update and ragged attention lowered for CUDA (no GPU needed) on int8 pools of Llama-3-8B's shape:
    i32 offsets up to 2**32 bytes -- fine at 2**31 elements, wrapping just past it (the sizes the pool
    sizing avoids) -- and i64 once the array exceeds 2**32 bytes."""
    from pallas_kernels import ragged_paged_attention, update_kv_cache

    S = jax.ShapeDtypeStruct
    pool, scales = S((8, 32 * pages, PAGE, 128), jnp.int8), S((8, 32 * pages, PAGE), jnp.float32)
    rows, slots, q = S((16, 8, 128), jnp.bfloat16), S((16,), jnp.int32), S((16, 32, 128), jnp.bfloat16)
    meta = (S((4,), jnp.int32), S((4, 8), jnp.int32), S((5,), jnp.int32), S((1,), jnp.int32))

    def lower():
        update = lambda k, v, ks, vs, kn, vn, sl: update_kv_cache(k, v, kn, vn, sl, impl="pallas", k_scales=ks,  # noqa
                                                                   v_scales=vs)
        jax.jit(update).trace(pool, pool, scales, scales, rows, rows, slots).lower(lowering_platforms=("cuda",))
        attend = lambda q, k, v, ks, vs, *m: ragged_paged_attention(q, k, v, *m, k_scales=ks, v_scales=vs,  # noqa
                                                                    impl="pallas")
        jax.jit(attend).trace(q, pool, pool, scales, scales, *meta).lower(lowering_platforms=("cuda",))

    assert _triton_pool_offset_types(lower) == offsets
