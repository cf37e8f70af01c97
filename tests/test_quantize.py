"""QuantizedWeight pytree, int8/int4 quantizers, quantize_params, and the direct GGUF mappings."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.quantize import (
    PROJECTION_KEYS,
    QuantizedWeight,
    dense,
    dequantize,
    from_gguf_q4_0,
    from_gguf_q4_1,
    from_gguf_q8_0,
    from_gguf_tensor,
    permute_out_features,
    quantize_int4,
    quantize_int8,
    quantize_params,
    quantized_logical_axes,
    stack_quantized,
)
from pallas_kernels.quantized_matmul import pack_int4, quantized_matmul, quantized_matmul_reference, unpack_int4

gguf = pytest.importorskip("gguf")
GGUF_FILE = Path("/root/.cache/ridgeline/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def _w(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Quantizers: layout and error bounds
# ---------------------------------------------------------------------------------------------------

def test_int8_per_channel_error_bound():
    w = _w((96, 40))
    w[:, 3] = 0.0  # an all-zero channel must stay exactly zero (scale 0, no division by zero)
    qw = quantize_int8(w)
    assert qw.values.dtype == jnp.int8 and qw.values.shape == (96, 40)
    assert qw.scales.shape == (40,) and qw.zeros is None and qw.group_size is None
    np.testing.assert_allclose(qw.scales, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    err = np.abs(np.asarray(dequantize(qw)) - w)
    assert np.all(err <= np.asarray(qw.scales)[None, :] / 2 * (1 + 1e-5))
    assert np.all(np.asarray(dequantize(qw))[:, 3] == 0)


def test_int8_grouped_error_bound():
    w = _w((128, 24))
    qw = quantize_int8(w, group_size=32)
    assert qw.scales.shape == (4, 24)
    err = np.abs(np.asarray(dequantize(qw)) - w).reshape(4, 32, 24)
    assert np.all(err <= np.asarray(qw.scales)[:, None, :] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("group_size", [16, 64])
def test_int4_error_bound_and_layout(group_size):
    w = _w((128, 24)) + 0.7  # skewed groups: where asymmetric min/scale pays off
    w[:group_size, 5] = 1.25  # a constant group: scale 0, exact
    qw = quantize_int4(w, group_size)
    g = 128 // group_size
    assert qw.values.dtype == jnp.uint8 and qw.values.shape == (64, 24)
    assert qw.scales.shape == qw.zeros.shape == (g, 24) and qw.bits == 4
    deq = np.asarray(dequantize(qw))
    err = np.abs(deq - w).reshape(g, group_size, 24)
    assert np.all(err <= np.asarray(qw.scales)[:, None, :] / 2 + 1e-6)
    np.testing.assert_array_equal(deq[:group_size, 5], 1.25)
    # The group min/max are representable (q = 0 and q = 15).
    np.testing.assert_allclose(deq.reshape(g, group_size, 24).min(1), w.reshape(g, group_size, 24).min(1),
                               atol=1e-6)


def test_int4_pack_layout_is_half_split_per_group():
    q = np.arange(64 * 3, dtype=np.uint8).reshape(64, 3) % 16
    packed = np.asarray(pack_int4(q, 32))
    # Packed row j of group 0 holds input row j (low nibble) and row 16 + j (high nibble).
    np.testing.assert_array_equal(packed[5] & 0xF, q[5])
    np.testing.assert_array_equal(packed[5] >> 4, q[21])
    np.testing.assert_array_equal(packed[16 + 2] & 0xF, q[32 + 2])  # group 1
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, 32)), q)


def test_bf16_scales():
    qw = quantize_int4(_w((64, 16)), 32, scale_dtype=jnp.bfloat16)
    assert qw.scales.dtype == qw.zeros.dtype == jnp.bfloat16
    assert np.abs(np.asarray(dequantize(qw)) - _w((64, 16))).max() < 0.5
    qw8 = quantize_int8(_w((64, 16)), scale_dtype=jnp.bfloat16)
    assert qw8.scales.dtype == jnp.bfloat16


def test_quantizer_errors():
    with pytest.raises(ValueError, match=r"group_size=48 must be an even positive divisor of in_features=64"):
        quantize_int4(_w((64, 8)), 48)
    with pytest.raises(ValueError, match=r"group_size=3 must be an even positive divisor"):
        quantize_int4(_w((6, 8)), 3)
    with pytest.raises(ValueError, match=r"group_size=24 must be a positive divisor of in_features=64"):
        quantize_int8(_w((64, 8)), group_size=24)
    with pytest.raises(ValueError, match=r"w\.shape=\(64,\) must be \[\.\.\., in, out\]"):
        quantize_int8(_w((64,)))
    with pytest.raises(ValueError, match=r"w\.dtype=int32 must be floating"):
        quantize_int8(np.ones((4, 4), np.int32))


# ---------------------------------------------------------------------------------------------------
# Pytree behaviour: stacked layers, lax.scan, jit
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [quantize_int8, lambda w: quantize_int4(w, 32)], ids=["int8", "int4"])
def test_stacked_weight_in_lax_scan(quantize):
    L, d = 3, 64
    w = _w((L, d, d), seed=2) * 0.2
    qw = quantize(w)
    assert qw.shape == (L, d, d) and qw.values.shape[0] == L
    # Stacked quantization is per layer: identical to quantizing each layer alone.
    one = quantize(w[1])
    np.testing.assert_array_equal(np.asarray(qw.values[1]), np.asarray(one.values))
    x0 = jnp.asarray(_w((4, d), seed=3))

    def body(x, layer_w):
        assert isinstance(layer_w, QuantizedWeight) and layer_w.shape == (d, d)  # valid per-layer weight
        return jnp.tanh(dense(x, layer_w, impl="xla")), None

    out, _ = jax.jit(lambda x, w: jax.lax.scan(body, x, w))(x0, qw)
    expected = x0
    for layer in range(L):
        expected = jnp.tanh(quantized_matmul_reference(expected, jax.tree.map(lambda a: a[layer], qw)))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_pytree_leaves_and_metadata():
    qw = quantize_int4(_w((64, 32)), 32)
    leaves, treedef = jax.tree.flatten(qw)
    assert len(leaves) == 3  # values, scales, zeros; metadata is static
    again = jax.tree.unflatten(treedef, leaves)
    assert (again.bits, again.group_size, again.in_features, again.out_features) == (4, 32, 64, 32)
    assert len(jax.tree.leaves(quantize_int8(_w((64, 32))))) == 2  # zeros None: no leaf
    assert qw.nbytes == 32 * 32 + 2 * 2 * 32 * 4


def test_logical_axes_match_the_arrays():
    axes = ("layers", "embed", "mlp")
    for qw in (quantize_int8(_w((2, 64, 32))), quantize_int4(_w((2, 64, 32)), 32)):
        named = quantized_logical_axes(qw, axes)
        pairs = jax.tree.map(lambda a, ax: (a.ndim, len(ax)), qw, named,
                             is_leaf=lambda a: isinstance(a, tuple))
        assert all(nd == n for nd, n in jax.tree.leaves(pairs, is_leaf=lambda a: isinstance(a, tuple)))
    assert quantized_logical_axes(quantize_int8(_w((2, 64, 32))), axes).scales == ("layers", "mlp")
    with pytest.raises(ValueError, match=r"must name all 3 dims"):
        quantized_logical_axes(qw, ("embed", "mlp"))


# ---------------------------------------------------------------------------------------------------
# quantize_params
# ---------------------------------------------------------------------------------------------------

def _params(L=2, d=64, f=96, vocab=40, lm_head=True):
    layers = {k: _w((L, d, d), i) for i, k in enumerate(("wq", "wk", "wv", "wo"))}
    layers.update(w_gate=_w((L, d, f), 5), w_up=_w((L, d, f), 6), w_down=_w((L, f, d), 7),
                  attn_norm=np.ones((L, d), np.float32), mlp_norm=np.ones((L, d), np.float32))
    params = {"embed": _w((vocab, d), 8), "layers": layers, "final_norm": np.ones((d,), np.float32)}
    if lm_head:
        params["lm_head"] = _w((d, vocab), 9)
    return params


@pytest.mark.parametrize("mode,group_size", [("int8", 64), ("int4", 32)])
def test_quantize_params(mode, group_size):
    params = _params()
    q = quantize_params(params, mode, group_size)
    for key in PROJECTION_KEYS:
        qw = q["layers"][key]
        assert isinstance(qw, QuantizedWeight) and qw.bits == int(mode[3:])
        assert qw.shape == params["layers"][key].shape
        err = np.abs(np.asarray(dequantize(qw)) - params["layers"][key]).max()
        assert err < (0.03 if mode == "int8" else 0.4)
    for key in ("attn_norm", "mlp_norm"):
        assert q["layers"][key] is params["layers"][key]
    assert q["embed"] is params["embed"] and q["final_norm"] is params["final_norm"]
    assert q["lm_head"] is params["lm_head"]  # flag off by default
    assert isinstance(params["layers"]["wq"], np.ndarray)  # input untouched
    # With the flag the head is int8 with groups of 32 inputs in either mode: an untied head is replaced, a
    # tied model keeps its float embedding and gains a quantized copy of embed.T.
    tied_params = _params(lm_head=False)
    assert "lm_head" not in quantize_params(tied_params, mode, group_size)
    for p, head in ((params, params["lm_head"]), (tied_params, tied_params["embed"].T)):
        qh = quantize_params(p, mode, group_size, quantize_lm_head=True)["lm_head"]
        assert isinstance(qh, QuantizedWeight) and qh.bits == 8 and qh.group_size == 32
        assert np.abs(np.asarray(dequantize(qh)) - head).max() <= np.asarray(qh.scales).max() / 2 + 1e-6
    # d = 48 is no multiple of 32: one scale per vocab row.
    odd = quantize_params(_params(d=48), "int8", quantize_lm_head=True)["lm_head"]
    assert odd.group_size is None and odd.scales.shape == (40,)
    assert quantize_params(tied_params, mode, group_size, quantize_lm_head=True)["embed"] is tied_params["embed"]
    # Re-quantizing keeps QuantizedWeights as they are.
    assert quantize_params(q, mode, group_size)["layers"]["wq"] is q["layers"]["wq"]
    qh = quantize_params(params, mode, group_size, quantize_lm_head=True)
    assert quantize_params(qh, mode, group_size, quantize_lm_head=True)["lm_head"] is qh["lm_head"]


def test_quantize_params_errors():
    with pytest.raises(ValueError, match=r"mode='fp8' must be one of \('int8', 'int4', 'w8a8'\)"):
        quantize_params(_params(), "fp8")
    # w_down has in = 96, not a multiple of 64: the message names the weight.
    with pytest.raises(ValueError, match=r"cannot quantize layers\.w_down \(shape \(2, 96, 64\)\) to int4: "
                                         r"group_size=64 must be an even positive divisor of in_features=96"):
        quantize_params(_params(), "int4", 64)


# ---------------------------------------------------------------------------------------------------
# GGUF: direct mapping equals gguf's own dequantizer
# ---------------------------------------------------------------------------------------------------

GGUF_CASES = [
    (gguf.GGMLQuantizationType.Q8_0, from_gguf_q8_0, 8),
    (gguf.GGMLQuantizationType.Q4_1, from_gguf_q4_1, 4),
    (gguf.GGMLQuantizationType.Q4_0, from_gguf_q4_0, 4),
]


@pytest.mark.parametrize("qtype,convert,bits", GGUF_CASES, ids=lambda c: getattr(c, "name", None))
def test_gguf_synthetic_blocks(qtype, convert, bits):
    k, n = 96, 48
    w_out_in = _w((n, k)) + 0.3   # GGUF stores [out, in] rows, blocks along in
    raw = gguf.quants.quantize(w_out_in, qtype)
    qw = convert(raw, (k, n))
    assert (qw.bits, qw.group_size, qw.in_features, qw.out_features) == (bits, 32, k, n)
    assert qw.values.dtype == (np.int8 if bits == 8 else np.uint8)
    expected = gguf.quants.dequantize(raw, qtype)  # [out, in]
    np.testing.assert_array_equal(np.asarray(dequantize(qw)), expected.T)
    # And it runs through the fused kernel.
    x = jnp.asarray(_w((3, k), 1))
    np.testing.assert_allclose(quantized_matmul(x, qw, impl="pallas_interpret"), np.asarray(x) @ expected.T,
                               rtol=1e-4, atol=1e-4)


def test_gguf_errors():
    raw = gguf.quants.quantize(_w((8, 64)), gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match=r"Q8_0 tensor of shape \(in=64, out=16\) needs 1088 bytes, got 544"):
        from_gguf_q8_0(raw, (64, 16))
    with pytest.raises(ValueError, match=r"in_features=48 must be a multiple of the Q4_1 block size 32"):
        from_gguf_q4_1(raw, (48, 8))
    with pytest.raises(ValueError, match=r"shape=\(64,\) must be \(in, out\)"):
        from_gguf_q8_0(raw, (64,))


def test_stack_and_permute_gguf_weights():
    qtype = gguf.GGMLQuantizationType.Q4_1
    raws = [gguf.quants.quantize(_w((16, 64), s), qtype) for s in range(3)]
    stacked = stack_quantized([from_gguf_q4_1(r, (64, 16)) for r in raws])
    assert stacked.shape == (3, 64, 16) and isinstance(stacked.values, np.ndarray)
    np.testing.assert_array_equal(np.asarray(dequantize(stacked))[2], gguf.quants.dequantize(raws[2], qtype).T)
    perm = np.random.default_rng(0).permutation(16)
    permuted = permute_out_features(stacked, perm)
    np.testing.assert_array_equal(np.asarray(dequantize(permuted)), np.asarray(dequantize(stacked))[..., perm])
    with pytest.raises(ValueError, match=r"differs from qws\[0\]"):
        stack_quantized([from_gguf_q4_1(raws[0], (64, 16)), quantize_int8(_w((64, 16)))])
    with pytest.raises(ValueError, match=r"perm must be a permutation of range\(out_features=16\)"):
        permute_out_features(stacked, np.zeros(16, int))


@pytest.mark.skipif(not GGUF_FILE.is_file(), reason=f"{GGUF_FILE} not present")
def test_gguf_real_file():
    reader = gguf.GGUFReader(str(GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        t = tensors[name]
        qw = from_gguf_tensor(t)
        assert qw.shape == tuple(int(d) for d in t.shape)  # GGUF ne = (in, out)
        np.testing.assert_array_equal(np.asarray(dequantize(qw)), gguf.quants.dequantize(t.data, t.tensor_type).T)
    # The imported attn_k (Q4_1, 576 -> 192) through the fused kernel.
    t = tensors["blk.0.attn_k.weight"]
    qw = from_gguf_tensor(t)
    x = jnp.asarray(_w((3, 576), 4))
    expected = np.asarray(x) @ gguf.quants.dequantize(t.data, t.tensor_type).T
    for impl in ("xla", "pallas_interpret"):
        np.testing.assert_allclose(quantized_matmul(x, qw, impl=impl), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"output_norm\.weight: type F32 has no direct mapping"):
        from_gguf_tensor(tensors["output_norm.weight"])
