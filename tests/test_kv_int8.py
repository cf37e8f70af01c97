"""int8 KV cache: per-token quantization, the int8 update and attention paths (xla, pallas_interpret) against
the dequantize-then-reference path, error bounds against float pages, and the model on an int8 pool."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import PRESETS
from model.llama import StepInputs, init_cache, init_params, kv_bytes_per_token_elem, make_step_fn
from pallas_kernels import KVCacheUpdateBlockSizes, RaggedPagedAttentionBlockSizes, ragged_paged_attention
from pallas_kernels import update_kv_cache
from pallas_kernels.kv_cache_update import dequantize_kv, quantize_kv
from test_ragged_paged_attention import make_batch

IMPLS = ("xla", "pallas_interpret")
SMALL_BLOCKS = RaggedPagedAttentionBlockSizes(block_rows=16, block_k_tokens=16, split_k_tokens=16)
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def quantized_batch(*args, **kwargs):
    """make_batch with its float pages quantized: (q, k_int8, v_int8, ..., num_seqs), (k_scales, v_scales)."""
    batch = make_batch(*args, **kwargs)
    (k_q, k_s), (v_q, v_s) = quantize_kv(batch[1]), quantize_kv(batch[2])
    return (batch[0], k_q, v_q) + batch[3:], (k_s, v_s), batch


def real_rows(batch) -> int:
    return int(batch[5][int(batch[6][0])])


# ---------------------------------------------------------------------------------------------- quantize_kv


def test_quantize_kv_error_bound_and_codes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3, 64)).astype(np.float32) * rng.uniform(0.01, 100, (7, 3, 1)).astype(np.float32)
    x[2, 1] = 0.0  # an all-zero row: scale 0, codes 0, dequantizes to exactly 0
    q, s = quantize_kv(jnp.asarray(x))
    assert q.dtype == jnp.int8 and q.shape == x.shape and s.dtype == jnp.float32 and s.shape == x.shape[:2]
    np.testing.assert_allclose(np.asarray(s), np.abs(x).max(-1) / 127, rtol=1e-6)
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127  # absmax maps to +-127; -128 never used
    err = np.abs(np.asarray(dequantize_kv(q, s)) - x)
    assert np.all(err <= np.asarray(s)[..., None] * (0.5 + 1e-5))  # round to nearest: half a step
    assert float(s[2, 1]) == 0.0 and not np.any(np.asarray(q[2, 1]))


def test_quantize_kv_of_bfloat16_rows():
    x = jax.random.normal(jax.random.key(1), (5, 2, 16), jnp.bfloat16)
    q, s = quantize_kv(x)
    err = jnp.abs(dequantize_kv(q, s) - x.astype(jnp.float32))
    assert bool(jnp.all(err <= s[..., None] * (0.5 + 1e-5)))


# ---------------------------------------------------------------------------------------------- update


def make_update_inputs(num_tokens, *, num_kv_heads=2, num_pages=6, page_size=8, head_dim=16, dropped=(), seed=0):
    """int8 pages + scales holding junk (must survive where nothing is written), float new rows."""
    rng = np.random.default_rng(seed)
    pool = (num_kv_heads, num_pages, page_size, head_dim)
    k_pages, v_pages = (jnp.asarray(rng.integers(-127, 128, pool), jnp.int8) for _ in range(2))
    k_scales, v_scales = (jnp.asarray(rng.uniform(0.1, 1, pool[:3]), jnp.float32) for _ in range(2))
    k_new, v_new = (jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)) * 3, jnp.float32)
                    for _ in range(2))
    slots = rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int32)
    slots[list(dropped)] = -1
    return (k_pages, v_pages, k_new, v_new, jnp.asarray(slots)), dict(k_scales=k_scales, v_scales=v_scales)


def numpy_int8_update(k_pages, v_pages, k_new, v_new, slots, k_scales, v_scales):
    out = [np.array(a) for a in (k_pages, v_pages, k_scales, v_scales)]
    page_size = out[0].shape[2]
    for t, slot in enumerate(np.asarray(slots)):
        if slot < 0:
            continue
        page, offset = slot // page_size, slot % page_size
        for i, new in enumerate((k_new, v_new)):
            q, s = quantize_kv(new[t])
            out[i][:, page, offset] = np.asarray(q)
            out[2 + i][:, page, offset] = np.asarray(s)
    return out


def test_int8_update_reference_matches_numpy_loop():
    args, scales = make_update_inputs(11, dropped=(2, 7))
    got = update_kv_cache(*args, impl="reference", **scales)
    assert [a.dtype for a in got] == [jnp.int8, jnp.int8, jnp.float32, jnp.float32]
    for g, e in zip(got, numpy_int8_update(*args, **scales)):
        np.testing.assert_array_equal(np.asarray(g), e)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page_size", [8, 16])
def test_int8_update_matches_reference_bit_for_bit(impl, page_size):
    # Every path quantizes with the same quantize_kv, so codes and scales agree exactly.
    args, scales = make_update_inputs(13, page_size=page_size, num_pages=3, dropped=(0, 5, 12))
    expected = update_kv_cache(*args, impl="reference", **scales)
    got = update_kv_cache(*args, impl=impl, block_sizes=KVCacheUpdateBlockSizes(tokens_per_program=4), **scales)
    assert len(got) == 4
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


@pytest.mark.parametrize("impl", IMPLS)
def test_int8_update_in_place_when_donated(impl):
    args, scales = make_update_inputs(4, dropped=(1,))
    expected = numpy_int8_update(*args, **scales)
    inputs = [args[0], args[1], scales["k_scales"], scales["v_scales"]]
    pointers = [a.unsafe_buffer_pointer() for a in inputs]
    got = update_kv_cache(*args, impl=impl, donate=True, **scales)
    assert all(a.is_deleted() for a in inputs)
    assert [a.unsafe_buffer_pointer() for a in got] == pointers
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(g), e)


class TestInt8Validation:
    args, scales = make_update_inputs(4)

    def test_int8_pages_need_scales(self):
        with pytest.raises(ValueError, match=r"k_pages.dtype=int8 must be a floating point type \(or int8 with"):
            update_kv_cache(*self.args)

    def test_both_scales(self):
        with pytest.raises(ValueError, match=r"pass both k_scales and v_scales"):
            update_kv_cache(*self.args, k_scales=self.scales["k_scales"])

    def test_scales_with_float_pages(self):
        float_pages = self.args[0].astype(jnp.float32)
        with pytest.raises(ValueError, match=r"scales go with int8 pages"):
            update_kv_cache(float_pages, float_pages, *self.args[2:], **self.scales)

    def test_scale_shape_and_dtype(self):
        with pytest.raises(ValueError, match=r"k_scales.shape=\(2, 6\) must be \(2, 6, 8\)"):
            update_kv_cache(*self.args, k_scales=jnp.zeros((2, 6)), v_scales=self.scales["v_scales"])
        with pytest.raises(ValueError, match=r"v_scales.dtype=bfloat16 must be float32"):
            update_kv_cache(*self.args, k_scales=self.scales["k_scales"],
                            v_scales=self.scales["v_scales"].astype(jnp.bfloat16))

    def test_attention_checks_scales_too(self):
        batch, scales, _ = quantized_batch([2, 1], [4, 9])
        with pytest.raises(ValueError, match=r"k_pages.dtype=int8 must be float32, bfloat16 or float16"):
            ragged_paged_attention(*batch)
        with pytest.raises(ValueError, match=r"scales go with int8 pages|k_pages.dtype=float32 must be int8"):
            ragged_paged_attention(batch[0], batch[1].astype(jnp.float32), batch[2].astype(jnp.float32),
                                   *batch[3:], k_scales=scales[0], v_scales=scales[1])


# ---------------------------------------------------------------------------------------------- attention


def check_int8_attention(impl, *args, dtype=jnp.float32, block_sizes=SMALL_BLOCKS, **kwargs):
    """impl on int8 pages vs the float32 reference on the dequantized pages."""
    batch, (k_s, v_s), _ = quantized_batch(*args, dtype=dtype, **kwargs)
    dequantized = (batch[0], dequantize_kv(batch[1], k_s), dequantize_kv(batch[2], v_s)) + batch[3:]
    expected = ragged_paged_attention(*dequantized, impl="reference")
    got = ragged_paged_attention(*batch, k_scales=k_s, v_scales=v_s, impl=impl, block_sizes=block_sizes)
    assert got.shape == batch[0].shape and got.dtype == batch[0].dtype
    assert bool(jnp.all(jnp.isfinite(got)))
    rows = real_rows(batch)
    error = float(jnp.max(jnp.abs(got[:rows].astype(jnp.float32) - expected[:rows].astype(jnp.float32))))
    assert error <= TOLERANCE[dtype], f"{impl}: max abs error {error}"


def test_int8_reference_is_reference_on_dequantized_pages():
    batch, (k_s, v_s), _ = quantized_batch([1, 4, 0, 9], [7, 12, 3, 9], group=3)
    got = ragged_paged_attention(*batch, k_scales=k_s, v_scales=v_s, impl="reference")
    expected = ragged_paged_attention(batch[0], dequantize_kv(batch[1], k_s), dequantize_kv(batch[2], v_s),
                                      *batch[3:], impl="reference")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("impl", IMPLS)
def test_int8_decode_batch(impl):
    check_int8_attention(impl, [1, 1, 1, 1, 1], [1, 8, 9, 16, 23], page_size=8)


@pytest.mark.parametrize("impl", IMPLS)
def test_int8_mixed_decode_prefill_and_speculative_batch(impl):
    check_int8_attention(impl, [1, 3, 17, 0, 6], [30, 21, 17, 4, 40], page_size=8, group=2, padded_seqs=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 3])
def test_int8_gqa_ratios(impl, group):
    check_int8_attention(impl, [1, 5, 2], [12, 5, 19], group=group, page_size=8)


@pytest.mark.parametrize("impl", IMPLS)
def test_int8_pages_with_bfloat16_queries(impl):
    check_int8_attention(impl, [1, 7, 2], [9, 7, 30], dtype=jnp.bfloat16, group=2)


@pytest.mark.parametrize("impl", IMPLS)
def test_int8_head_dim_64_page_16_default_blocks(impl):
    check_int8_attention(impl, [3, 1], [40, 70], head_dim=64, page_size=16, group=4,
                         block_sizes=RaggedPagedAttentionBlockSizes())


@pytest.mark.parametrize("impl", ("reference",) + IMPLS)
def test_int8_attention_error_is_within_the_quantization_bound(impl):
    """Against the float pages: |out' - out| <= max s_v / 2 + (exp(2D) - 1) max|v'|, where
    D = sm_scale * ||q||_1 * max s_k / 2 bounds each score's error (scores move by <= D, so softmax
    weights by a factor in [exp(-2D), exp(2D)]; values move by <= s_v / 2)."""
    batch, (k_s, v_s), float_batch = quantized_batch([1, 3, 17, 6], [30, 21, 17, 40], page_size=8, group=2,
                                                      head_dim=32)
    exact = ragged_paged_attention(*float_batch, impl="reference")
    got = ragged_paged_attention(*batch, k_scales=k_s, v_scales=v_s, impl=impl, block_sizes=SMALL_BLOCKS)
    rows = real_rows(batch)
    sm_scale = 1 / math.sqrt(batch[0].shape[-1])
    drift = sm_scale * jnp.max(jnp.sum(jnp.abs(batch[0][:rows]), axis=-1), axis=-1) * jnp.max(k_s) / 2  # [rows]
    v_max = jnp.max(jnp.abs(dequantize_kv(batch[2], v_s)))
    bound = jnp.max(v_s) / 2 + jnp.expm1(2 * drift)[:, None, None] * v_max
    error = jnp.abs(got[:rows] - exact[:rows])
    assert bool(jnp.all(error <= bound)), float(jnp.max(error - bound))
    assert float(jnp.max(error)) < 0.05  # and small in practice: unit-normal K/V


def test_int8_xla_path_under_outer_jit():
    batch, (k_s, v_s), _ = quantized_batch([2, 1], [4, 9])
    fn = jax.jit(lambda *a: ragged_paged_attention(*a[:7], k_scales=a[7], v_scales=a[8], impl="xla"))
    got = fn(*batch, k_s, v_s)
    expected = ragged_paged_attention(*batch, k_scales=k_s, v_scales=v_s, impl="reference")
    assert float(jnp.max(jnp.abs(got[:3] - expected[:3]))) <= 1e-4


# ---------------------------------------------------------------------------------------------- Triton lowering


def lower_for_cuda(fn, *args, donate=()):
    from pallas_kernels.backend import abstract_cuda_device

    try:
        with abstract_cuda_device():  # JAX >= 0.11 needs a target GPU to lower for
            return jax.jit(fn, donate_argnums=donate).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as error:
        pytest.skip(f"cannot lower for CUDA here: {error}")


def test_int8_update_kernel_lowers_to_triton_with_aliasing():
    args, scales = make_update_inputs(13, head_dim=64)
    fn = lambda *a: update_kv_cache(*a[:5], impl="pallas", lowering="triton", k_scales=a[5], v_scales=a[6])  # noqa
    hlo = lower_for_cuda(fn, *args, scales["k_scales"], scales["v_scales"], donate=(0, 1, 5, 6))
    assert "__gpu$xla.gpu.triton" in hlo and "output_operand_aliases" in hlo


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_attention_kernel_lowers_to_triton(dtype):
    batch, (k_s, v_s), _ = quantized_batch([1, 5, 2], [12, 5, 19], head_dim=64, page_size=16, dtype=dtype)
    fn = lambda *a: ragged_paged_attention(*a[:7], k_scales=a[7], v_scales=a[8], impl="pallas",  # noqa: E731
                                           lowering="triton")
    assert "__gpu$xla.gpu.triton" in lower_for_cuda(fn, *batch, k_s, v_s)


# ---------------------------------------------------------------------------------------------- model


TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.key(0))


def test_init_cache_int8_layout():
    cache = init_cache(TINY, num_pages=5, page_size=8, dtype=jnp.int8)
    pool = (TINY.num_kv_heads, TINY.num_layers * 5, 8, TINY.head_dim)
    assert {k: (v.shape, v.dtype) for k, v in cache.items()} == {
        "k": (pool, jnp.int8), "v": (pool, jnp.int8),
        "k_scale": (pool[:3], jnp.float32), "v_scale": (pool[:3], jnp.float32)}
    assert set(init_cache(TINY, 5, 8, jnp.bfloat16)) == {"k", "v"}
    assert kv_bytes_per_token_elem(64, jnp.int8) == 1 + 4 / 64 and kv_bytes_per_token_elem(64, jnp.bfloat16) == 2
    with pytest.raises(ValueError, match=r"must be a float type or int8"):
        init_cache(TINY, 5, 8, jnp.int32)


def sequence_inputs(tokens, start, num_pages, page_size):
    n = len(tokens)
    positions = np.arange(start, start + n, dtype=np.int32)
    return StepInputs(
        tokens=jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(positions), cu_q_lens=jnp.asarray([0, n], jnp.int32),
        kv_lens=jnp.asarray([start + n], jnp.int32),
        block_tables=jnp.arange(num_pages, dtype=jnp.int32)[None, :], num_seqs=jnp.asarray([1], jnp.int32),
        logits_indices=jnp.arange(n, dtype=jnp.int32))


def run_prefill_then_decode(params, dtype, impl, prompt, decode_tokens, page_size=8):
    num_pages = -(-(len(prompt) + len(decode_tokens)) // page_size)
    cache = init_cache(TINY, num_pages, page_size, dtype)
    step = make_step_fn(TINY, impl)
    logits, cache = step(params, cache, sequence_inputs(prompt, 0, num_pages, page_size))
    out = [logits]
    for i, token in enumerate(decode_tokens):
        logits, cache = step(params, cache, sequence_inputs([token], len(prompt) + i, num_pages, page_size))
        out.append(logits)
    return jnp.concatenate(out), cache


@pytest.mark.parametrize("impl", IMPLS)
def test_model_on_int8_pool_tracks_float_pool(tiny_params, impl):
    prompt, decode = [5, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11], [12, 13, 14]
    float_logits, _ = run_prefill_then_decode(tiny_params, jnp.float32, "xla", prompt, decode)
    int8_logits, cache = run_prefill_then_decode(tiny_params, jnp.int8, impl, prompt, decode)
    assert cache["k"].dtype == jnp.int8 and cache["k_scale"].dtype == jnp.float32
    assert bool(jnp.any(cache["k_scale"] > 0))
    scale = float(jnp.max(jnp.abs(float_logits)))
    assert float(jnp.max(jnp.abs(int8_logits - float_logits))) < 0.02 * scale
    assert bool(jnp.all(jnp.argmax(int8_logits, -1) == jnp.argmax(float_logits, -1)))


def test_model_int8_pool_xla_matches_pallas_interpret(tiny_params):
    prompt, decode = [1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11]
    xla, xla_cache = run_prefill_then_decode(tiny_params, jnp.int8, "xla", prompt, decode)
    interp, interp_cache = run_prefill_then_decode(tiny_params, jnp.int8, "pallas_interpret", prompt, decode)
    assert float(jnp.max(jnp.abs(xla - interp))) < 1e-4
    # Same rows quantized the same way (K/V themselves may differ in the last float bits: codes by <= 1).
    for key in ("k", "v"):
        codes = np.abs(np.asarray(xla_cache[key], np.int32) - np.asarray(interp_cache[key], np.int32))
        assert codes.max() <= 1
        np.testing.assert_allclose(np.asarray(xla_cache[key + "_scale"]), np.asarray(interp_cache[key + "_scale"]),
                                   rtol=1e-5)


def test_dense_prefill_with_an_int8_pool(tiny_params):
    """The flash-attention prefill (LLM.score's path) attends to the fresh float K/V: an int8 pool only
    changes what is written, so logits equal the float pool's exactly."""
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    inputs = sequence_inputs(tokens, 0, 1, 8)
    logits = {}
    for dtype in (jnp.float32, jnp.int8):
        logits[dtype], cache = make_step_fn(TINY, "xla", 8)(tiny_params, init_cache(TINY, 1, 8, dtype), inputs)
    np.testing.assert_array_equal(np.asarray(logits[jnp.int8]), np.asarray(logits[jnp.float32]))
    assert bool(jnp.any(cache["k"] != 0))  # and the int8 pool was filled
