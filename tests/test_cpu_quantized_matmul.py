"""The jax.ffi CPU quantized-matmul kernel (pallas_kernels/cpu_quantized_matmul.py) against its reference, its
dispatch from quantized_matmul(impl="auto"), and the XLA fallback when it cannot be built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.quantize import quantize_int4, quantize_int8, stack_quantized
from pallas_kernels import cpu_quantized_matmul as cpu
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")

FORMATS = {  # name -> quantizer of a float [K, N] weight
    "int8": lambda w: quantize_int8(w),
    "q8_0": lambda w: quantize_int8(w, group_size=32),
    "int4_g32": lambda w: quantize_int4(w, 32),
    "int4_g6": lambda w: quantize_int4(w, 6),  # a group that does not divide the kernel's 64-row K block
}


def _case(fmt, m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    return x, FORMATS[fmt](w)


def _assert_close(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
    if not cpu.available():
        pytest.skip(f"the CPU kernel could not be built here: {cpu._state['why']}")


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m,k,n", [(1, 96, 83), (3, 192, 200), (16, 96, 17), (5, 96, 1100), (2, 1536, 1100)])
def test_kernel_matches_reference(fmt, m, k, n):
    # N = 83, 17: a partial vector and scalar tail; 1100: many column panels; K = 96, 192: not multiples of the
    # 64-row K block; M = 3, 5, 16: the 4-, 2- and 1-row register tiles; 1536 x 1100: big enough (>= 768 KiB
    # stored) that two threads share it.
    if fmt == "int4_g6":
        k = 6 * (k // 6)
    x, qw = _case(fmt, m, k, n)
    got = cpu.cpu_quantized_matmul(x, qw)
    assert got.dtype == jnp.float32
    _assert_close(got, cpu.cpu_quantized_matmul_reference(x, qw))


@pytest.mark.parametrize("tile_vecs,max_threads", [(1, 1), (3, 0), (4, 2)])
def test_launch_configs_agree(tile_vecs, max_threads):
    x, qw = _case("int8", 2, 77, 300)  # K = 77: odd, per channel
    config = cpu.CpuMatmulConfig(tile_vecs=tile_vecs, max_threads=max_threads)
    _assert_close(cpu.cpu_quantized_matmul(x, qw, config=config), quantized_matmul_reference(x, qw))


def test_bfloat16_activations_and_scales():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48), dtype=np.float32)
    qw = quantize_int8(w, group_size=32, scale_dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    out = quantized_matmul(x, qw, impl="cpu_ffi")
    assert out.dtype == jnp.bfloat16
    _assert_close(out, quantized_matmul_reference(x, qw), rtol=1e-2)


def _custom_calls(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_auto_dispatches_small_m_to_the_kernel_and_large_m_to_xla():
    x, qw = _case("int4_g32", 3, 64, 40)
    auto = lambda x, w: quantized_matmul(x, w, impl="auto")  # noqa: E731
    assert "ridgeline_qmatmul_int4" in _custom_calls(auto, x, qw)
    _assert_close(auto(x, qw), quantized_matmul_reference(x, qw))
    big = jnp.tile(x, (cpu.MAX_ROWS[4] // 3 + 1, 1))  # M > MAX_ROWS
    assert "ridgeline_qmatmul" not in _custom_calls(auto, big, qw)


def test_inside_scan_over_stacked_layers():
    """Quantized models scan over layers: each step's weight is a slice of the stacked QuantizedWeight."""
    rng = np.random.default_rng(2)
    layers = [quantize_int8(rng.standard_normal((48, 48), dtype=np.float32) / 7) for _ in range(3)]
    stacked = stack_quantized(layers)
    x0 = jnp.asarray(rng.standard_normal((2, 48), dtype=np.float32))

    @jax.jit
    def run(x, w):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(quantized_matmul(h, wl)), None), x, w)[0]

    want = x0
    for w in layers:
        want = jnp.tanh(quantized_matmul_reference(want, w))
    assert "ridgeline_qmatmul_int8" in _custom_calls(run, x0, stacked)
    _assert_close(run(x0, stacked), want)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_layer_of_a_stack_read_in_place(fmt):
    """A layer index into stacked [L, K, N] weights gives that layer's product, on the kernel (read in place:
    the stacked operand goes to the custom call whole) and through quantized_matmul's other paths."""
    k, n = (96 if fmt != "int4_g6" else 90), 200
    rng = np.random.default_rng(3)
    layers = [FORMATS[fmt](rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)) for _ in range(3)]
    stacked = stack_quantized(layers)
    x = jnp.asarray(rng.standard_normal((3, k), dtype=np.float32))
    at = jax.jit(lambda x, w, i: cpu.cpu_quantized_matmul(x, w, i))
    calls = [line for line in at.lower(x, stacked, jnp.int32(1)).compile().as_text().splitlines()
             if 'custom_call_target="ridgeline_qmatmul' in line]
    assert len(calls) == 1 and f"8[3,{stacked.values.shape[1]},{n}]" in calls[0]  # s8 / u8, the whole stack
    for i, layer in enumerate(layers):
        want = quantized_matmul_reference(x, layer)
        np.testing.assert_array_equal(at(x, stacked, jnp.int32(i)), cpu.cpu_quantized_matmul(x, layer))
        _assert_close(quantized_matmul(x, stacked, jnp.int32(i), impl="xla"), want)
        _assert_close(quantized_matmul(x, stacked, jnp.int32(i), impl="auto"), want)


def test_layer_index_out_of_range_is_an_error():
    x, qw = _case("int8", 1, 64, 32)
    stacked = stack_quantized([qw, qw])
    with pytest.raises(Exception, match=r"layer=2 must be in \[0, 2\)"):
        jax.block_until_ready(cpu.cpu_quantized_matmul(x, stacked, jnp.int32(2)))
    with pytest.raises(ValueError, match=r"needs weights stacked \[L, K, N\]"):
        cpu.cpu_quantized_matmul(x, qw, jnp.int32(0))


@pytest.mark.parametrize("fmt", ["int8", "q8_0", "int4_g32"])
def test_a_rows_result_does_not_depend_on_the_other_rows(fmt):
    """Batch invariance: row r of an M-row product is bitwise the same as that row alone, for every M the
    kernel takes (the engine recomputes rolled-back decode rows in other batches and expects equal bits)."""
    rows = cpu.MAX_ROWS[FORMATS[fmt](np.zeros((32, 16), np.float32)).bits]
    x, qw = _case(fmt, rows, 1536, 1100, seed=4)  # big enough to be split over slices and threads
    alone = np.stack([np.asarray(cpu.cpu_quantized_matmul(x[r:r + 1], qw))[0] for r in range(rows)])
    for m in (2, 3, 5, 16, rows):
        np.testing.assert_array_equal(np.asarray(cpu.cpu_quantized_matmul(x[:m], qw)), alone[:m])


@pytest.mark.parametrize("fmt", ["q8_0", "int4_g32", "int4_g6"])
def test_dequantize_kernel_and_the_large_m_path(fmt):
    """cpu_dequantize gives dequantize_arrays' weight (a layer of a stack, read in place, or a 2-D weight), and
    quantized_matmul(impl="auto") with M above MAX_ROWS multiplies by it on XLA's dot."""
    from pallas_kernels.quantized_matmul import dequantize_arrays

    k, n = (96 if fmt != "int4_g6" else 90), 83
    rng = np.random.default_rng(5)
    layers = [FORMATS[fmt](rng.standard_normal((k, n), dtype=np.float32)) for _ in range(2)]
    stacked = stack_quantized(layers)
    for i, w in enumerate(layers):
        want = dequantize_arrays(w.values, w.scales, w.zeros, bits=w.bits, group_size=w.group_size)
        _assert_close(cpu.cpu_dequantize(stacked, jnp.int32(i)), want, rtol=1e-6)
        _assert_close(cpu.cpu_dequantize(w), want, rtol=1e-6)
    x = jnp.asarray(rng.standard_normal((cpu.MAX_ROWS[layers[0].bits] + 3, k), dtype=np.float32))
    auto = jax.jit(lambda x, w, i: quantized_matmul(x, w, i, impl="auto"))
    assert "ridgeline_dequant" in auto.lower(x, stacked, jnp.int32(1)).as_text()
    _assert_close(auto(x, stacked, jnp.int32(1)), quantized_matmul_reference(x, layers[1]))
    with pytest.raises(ValueError, match="grouped weights"):
        cpu.cpu_dequantize(quantize_int8(np.ones((32, 16), np.float32)))


@pytest.mark.parametrize("fmt", ["int8", "q8_0", "int4_g32"])
def test_padding_rows_are_skipped(fmt):
    """rows=r: the first r rows equal the full product's bits, the padding rows come out zero."""
    x, qw = _case(fmt, 8, 192, 200, seed=6)
    full = np.asarray(cpu.cpu_quantized_matmul(x, qw))
    at = jax.jit(lambda x, w, r: cpu.cpu_quantized_matmul(x, w, None, r))
    for r in (0, 1, 3, 8, 11):
        got = np.asarray(at(x, qw, jnp.int32(r)))
        np.testing.assert_array_equal(got[:r], full[:r])
        assert not got[r:].any()


def test_bad_inputs():
    x, qw = _case("int8", 2, 64, 32)
    with pytest.raises(ValueError, match=r"tile_vecs=5 must be an int in 1\.\.4"):
        cpu.CpuMatmulConfig(tile_vecs=5)
    with pytest.raises(ValueError, match=r"max_threads=-1"):
        cpu.CpuMatmulConfig(max_threads=-1)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 63\) must end in in_features K=64"):
        cpu.cpu_quantized_matmul(x[:, :63], qw)


@pytest.fixture
def fresh_verdict(monkeypatch, tmp_path):
    """A clean available() verdict and build cache for the test; the real verdict comes back afterwards."""
    monkeypatch.setenv("RIDGELINE_CACHE", str(tmp_path))
    cpu._reset_for_tests()
    jax.clear_caches()  # compiled programs remember which path they took
    yield
    monkeypatch.undo()
    cpu._reset_for_tests()
    jax.clear_caches()
    assert cpu.available()


def _falls_back_to_xla(x, qw):
    auto = lambda x, w: quantized_matmul(x, w, impl="auto")  # noqa: E731
    assert "ridgeline_qmatmul" not in _custom_calls(auto, x, qw)
    np.testing.assert_array_equal(auto(x, qw), quantized_matmul(x, qw, impl="xla"))


def test_fallback_without_a_compiler_warns_once(fresh_verdict, monkeypatch):
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    x, qw = _case("int8", 2, 64, 32)
    with pytest.warns(RuntimeWarning, match=r"unavailable \(no C\+\+ compiler found"):
        assert not cpu.available()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert not cpu.available()
        _falls_back_to_xla(x, qw)
    with pytest.raises(RuntimeError, match=r"unavailable: no C\+\+ compiler"):
        quantized_matmul(x, qw, impl="cpu_ffi")


def test_fallback_when_the_build_fails(fresh_verdict, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    x, qw = _case("q8_0", 2, 64, 32)
    with pytest.warns(RuntimeWarning, match=r"RuntimeError: .*false .* failed"):
        assert not cpu.available()
    _falls_back_to_xla(x, qw)


def test_disabled_by_env_var_without_warning(fresh_verdict, monkeypatch):
    monkeypatch.setenv(cpu.ENV_DISABLE, "0")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu.available()
        _falls_back_to_xla(*_case("int4_g32", 1, 64, 32))


def test_default_model_int8_decode_same_as_xla(default_model, monkeypatch):
    """The default model with int8 weights: decode steps (M = batch <= MAX_ROWS) on the kernel give the XLA
    path's greedy tokens (the two differ only in float32 summation order)."""
    from model.quantize import quantize_params
    from scripts.bench_quantization import greedy_tokens

    cfg, params, tok = default_model
    int8 = quantize_params(params, "int8")
    prompts = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):", "Water boils at")]
    kernel = greedy_tokens(int8, cfg, prompts, 12)
    monkeypatch.setenv(cpu.ENV_DISABLE, "0")
    cpu._reset_for_tests()
    jax.clear_caches()
    try:
        xla = greedy_tokens(int8, cfg, prompts, 12)
    finally:
        monkeypatch.undo()
        cpu._reset_for_tests()
        jax.clear_caches()
    np.testing.assert_array_equal(kernel, xla)
