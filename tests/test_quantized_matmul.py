"""Fused dequantizing matmul: Pallas kernel (interpret mode) and XLA path vs the float32 reference.

Tolerances (max |out - ref| relative to max |ref|): float32 activations 1e-4 (the only differences are
summation order); bfloat16 activations 2e-2 (x and the dequantized weight tile are rounded to bf16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.quantize import QuantizedWeight, dense, dequantize, quantize_int4, quantize_int8
from pallas_kernels.quantized_matmul import (
    QuantizedMatmulBlockSizes,
    quantized_matmul,
    quantized_matmul_reference,
)

F32_TOL, BF16_TOL = 1e-4, 2e-2
FORMATS = [(8, None), (8, 32), (4, 32), (4, 64)]  # (bits, group_size); (8, None) = per channel


def _weight(bits, group_size, k, n, seed=0) -> QuantizedWeight:
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return quantize_int8(w, group_size=group_size) if bits == 8 else quantize_int4(w, group_size)


def _x(shape, dtype=jnp.float32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _assert_close(out, ref, tol):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    err, scale = np.max(np.abs(out - ref)), max(1.0, np.max(np.abs(ref)))
    assert err <= tol * scale, f"max abs err {err} > {tol} * {scale}"


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("m,k,n", [(1, 128, 96), (7, 192, 64), (33, 256, 160)])
def test_matches_reference_f32(impl, bits, group_size, m, k, n):
    qw = _weight(bits, group_size, k, n)
    x = _x((m, k))
    out = quantized_matmul(x, qw, impl=impl)
    assert out.dtype == jnp.float32 and out.shape == (m, n)
    _assert_close(out, quantized_matmul_reference(x, qw), F32_TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_matches_reference_bf16(impl, bits, group_size):
    qw = _weight(bits, group_size, 128, 64)
    x = _x((5, 128), jnp.bfloat16)
    out = quantized_matmul(x, qw, impl=impl)
    assert out.dtype == jnp.bfloat16
    _assert_close(out, quantized_matmul_reference(x, qw), BF16_TOL)


@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("blocks", [
    QuantizedMatmulBlockSizes(block_m=16, block_n=32, block_k=64),   # several K steps, several N tiles
    QuantizedMatmulBlockSizes(block_m=32, block_n=64, block_k=256),  # one K step, M padded 19 -> 32
    QuantizedMatmulBlockSizes(block_m=16, block_n=32, block_k=64, k_splits=2),  # 2 K steps per split
])
def test_explicit_block_sizes(bits, group_size, blocks):
    qw = _weight(bits, group_size, 256, 128)
    x = _x((19, 256))
    out = quantized_matmul(x, qw, impl="pallas_interpret", block_sizes=blocks)
    _assert_close(out, quantized_matmul_reference(x, qw), F32_TOL)


@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_k_splits_bf16_decode(bits, group_size):
    # Odd K step count (3) split 3 ways, bf16 activations: partial sums are f32, the output bf16.
    qw = _weight(bits, group_size, 192, 64, seed=2)
    x = _x((5, 192), jnp.bfloat16)
    blocks = QuantizedMatmulBlockSizes(block_m=16, block_n=32, block_k=64, k_splits=3)
    out = quantized_matmul(x, qw, impl="pallas_interpret", block_sizes=blocks)
    assert out.dtype == jnp.bfloat16
    _assert_close(out, quantized_matmul_reference(x, qw), BF16_TOL)


@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_default_decode_blocks_split_k_to_fill_an_h100(k, n):
    # 264 programs = 2 per SM on 132 SMs; the split must not depend on the decode batch size.
    splits = set()
    for m in (1, 5, 16, 64):
        b = QuantizedMatmulBlockSizes.get_default(m=m, k=k, n=n, bits=8, group_size=32)
        assert (n // b.block_n) * b.k_splits >= 264
        splits.add(b.k_splits)
    assert len(splits) == 1
    assert QuantizedMatmulBlockSizes.get_default(m=512, k=k, n=n, bits=8, group_size=32).k_splits == 1


def test_leading_batch_dims_and_impls_agree():
    qw = _weight(4, 32, 64, 32)
    x = _x((2, 3, 64))
    ref = quantized_matmul_reference(x, qw)
    assert ref.shape == (2, 3, 32)
    for impl in ("reference", "xla", "pallas_interpret", "auto"):
        _assert_close(quantized_matmul(x, qw, impl=impl), ref, F32_TOL)


def test_reference_is_dequantize_then_matmul():
    qw = _weight(4, 32, 64, 48)
    x = _x((3, 64))
    np.testing.assert_allclose(quantized_matmul_reference(x, qw),
                               np.asarray(x) @ np.asarray(dequantize(qw)), rtol=1e-5, atol=1e-5)


def test_inside_outer_jit():
    qw = _weight(8, None, 64, 32)
    x = _x((4, 64))
    f = jax.jit(lambda x, w: quantized_matmul(x, w, impl="pallas_interpret") * 2.0)
    _assert_close(f(x, qw), 2.0 * quantized_matmul_reference(x, qw), F32_TOL)


def test_dense_dispatches_on_weight_type():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    x = _x((2, 5, 64))
    np.testing.assert_allclose(dense(x, jnp.asarray(w)), np.asarray(x) @ w, rtol=1e-5, atol=1e-4)
    assert dense(x.astype(jnp.bfloat16), jnp.asarray(w)).dtype == jnp.bfloat16
    qw = quantize_int8(w)
    _assert_close(dense(x, qw, impl="pallas_interpret"), quantized_matmul_reference(x, qw), F32_TOL)
    with pytest.raises(ValueError, match=r"w\.shape=\(32, 64\)"):
        dense(x, jnp.asarray(w.T))


def test_default_block_sizes_fit_model_shapes():
    # SmolLM2: K = 576 = 64 * 9 has no power-of-two divisor above 64.
    b = QuantizedMatmulBlockSizes.get_default(m=1, k=576, n=192, bits=4, group_size=64)
    assert (b.block_m, b.block_n, b.block_k) == (16, 32, 64)  # decode: narrow N tiles for more programs
    b = QuantizedMatmulBlockSizes.get_default(m=300, k=1536, n=576, bits=8, group_size=None)
    assert (b.block_m, b.block_n, b.block_k) == (64, 64, 128)
    b = QuantizedMatmulBlockSizes.get_default(m=8, k=512, n=256, bits=4, group_size=256)
    assert b.block_k == 256


def test_auto_falls_back_to_xla_when_no_tile_fits(monkeypatch):
    import pallas_kernels.quantized_matmul as qmm

    # Pretend "auto" resolved to a Pallas path (as on GPU); N = 40 has no power-of-two tile >= 16.
    monkeypatch.setattr(qmm, "_resolve_impl", lambda impl: "pallas_interpret" if impl == "auto" else impl)
    qw = _weight(8, 32, 64, 40)
    x = _x((3, 64))
    _assert_close(quantized_matmul(x, qw, impl="auto"), quantized_matmul_reference(x, qw), F32_TOL)
    with pytest.raises(ValueError, match=r"no power-of-two block_n >= 16 divides out_features N=40"):
        quantized_matmul(x, qw, impl="pallas_interpret")


@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("k_splits", [1, 2])
def test_kernel_lowers_to_triton_without_a_gpu(bits, group_size, k_splits):
    # Cross-lowering for CUDA runs every Pallas->Triton lowering rule the kernel body needs
    # (reshapes, nibble shifts, dots); it does not compile PTX.
    from pallas_kernels.backend import abstract_cuda_device
    from pallas_kernels.quantized_matmul import _pallas_matmul

    qw = _weight(bits, group_size, 256, 128)
    blocks = QuantizedMatmulBlockSizes(block_m=16, block_n=64, block_k=64, k_splits=k_splits)
    f = jax.jit(lambda x, w: _pallas_matmul(x, w, blocks, interpret=False))
    try:
        with abstract_cuda_device():
            text = f.trace(jnp.ones((16, 256), jnp.bfloat16), qw).lower(lowering_platforms=("cuda",)).as_text()
    except (ImportError, NotImplementedError) as e:  # a jaxlib without the Triton bindings
        pytest.skip(f"cannot cross-lower for cuda here: {e}")
    assert "triton" in text.lower()


def test_public_wrapper_lowers_for_cuda_only_when_targeting_a_gpu():
    # impl="pallas" refuses a CPU backend, but lowers under the abstract H100 that cross-lowering installs.
    from pallas_kernels.backend import abstract_cuda_device

    qw = _weight(8, 32, 256, 128)
    f = jax.jit(lambda x, w: quantized_matmul(x, w, impl="pallas"))
    x = jnp.ones((3, 256), jnp.bfloat16)
    try:
        with abstract_cuda_device():
            text = f.trace(x, qw).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as e:  # a jaxlib without the Triton bindings
        pytest.skip(f"cannot cross-lower for cuda here: {e}")
    assert "__gpu$xla.gpu.triton" in text
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"impl='pallas' needs a GPU"):
            f.trace(x, qw)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------

def test_block_size_errors():
    with pytest.raises(ValueError, match=r"block_n=48 must be a power of two >= 16"):
        QuantizedMatmulBlockSizes(block_n=48)
    with pytest.raises(ValueError, match=r"block_m=8 must be a power of two >= 16"):
        QuantizedMatmulBlockSizes(block_m=8)
    with pytest.raises(ValueError, match=r"num_warps=0 must be a positive int"):
        QuantizedMatmulBlockSizes(num_warps=0)
    with pytest.raises(ValueError, match=r"k_splits=0 must be a positive int"):
        QuantizedMatmulBlockSizes(k_splits=0)
    with pytest.raises(ValueError, match=r"k_splits=3 must divide the K=256 // block_k=64 = 4 K steps"):
        QuantizedMatmulBlockSizes(block_k=64, k_splits=3).validate(k=256, n=64, bits=8, group_size=None)
    blocks = QuantizedMatmulBlockSizes(block_m=16, block_n=32, block_k=32)
    with pytest.raises(ValueError, match=r"block_k=32 must be a multiple of group_size=64"):
        blocks.validate(k=128, n=64, bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"int4 needs block_k=16 >= 32"):
        QuantizedMatmulBlockSizes(block_k=16).validate(k=128, n=64, bits=4, group_size=16)
    with pytest.raises(ValueError, match=r"in_features K=96 must be a multiple of block_k=64"):
        QuantizedMatmulBlockSizes(block_k=64).validate(k=96, n=64, bits=8, group_size=None)
    with pytest.raises(ValueError, match=r"out_features N=48 must be a multiple of block_n=32"):
        QuantizedMatmulBlockSizes(block_n=32).validate(k=128, n=48, bits=8, group_size=None)
    with pytest.raises(ValueError, match=r"no power-of-two block_n >= 16 divides out_features N=40"):
        QuantizedMatmulBlockSizes.get_default(m=1, k=64, n=40, bits=8, group_size=None)
    # Passed through the wrapper.
    qw = _weight(4, 64, 128, 64)
    with pytest.raises(ValueError, match=r"block_k=32 must be a multiple of group_size=64"):
        quantized_matmul(_x((2, 128)), qw, impl="pallas_interpret", block_sizes=blocks)


def test_input_errors():
    qw = _weight(8, None, 64, 32)
    with pytest.raises(ValueError, match=r"x\.dtype=int32 must be float32, bfloat16 or float16"):
        quantized_matmul(jnp.ones((2, 64), jnp.int32), qw, impl="xla")
    with pytest.raises(ValueError, match=r"x\.shape=\(2, 48\) must end in in_features K=64"):
        quantized_matmul(_x((2, 48)), qw, impl="xla")
    with pytest.raises(ValueError, match=r"impl='cuda' is not one of"):
        quantized_matmul(_x((2, 64)), qw, impl="cuda")
    stacked = quantize_int8(np.ones((3, 64, 32), np.float32))
    with pytest.raises(ValueError, match=r"stacked values\.shape=\(3, 64, 32\)"):
        quantized_matmul(_x((2, 64)), stacked, impl="xla")
    bad = QuantizedWeight(qw.values.astype(jnp.int32), qw.scales, None, 8, None, 64, 32)
    with pytest.raises(ValueError, match=r"int8 values must be int8 \(64, 32\), got int32"):
        quantized_matmul(_x((2, 64)), bad, impl="xla")
    bad = QuantizedWeight(qw.values, qw.scales[:16], None, 8, None, 64, 32)
    with pytest.raises(ValueError, match=r"scales must be float \(32,\), got float32 \(16,\)"):
        quantized_matmul(_x((2, 64)), bad, impl="xla")
    with pytest.raises(ValueError, match=r"expected a QuantizedWeight"):
        quantized_matmul(_x((2, 64)), jnp.ones((64, 32)), impl="xla")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"impl='pallas' needs a GPU"):
            quantized_matmul(_x((2, 64)), qw, impl="pallas")
