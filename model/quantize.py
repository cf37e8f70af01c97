"""int8 / int4 weight quantization: the `QuantizedWeight` pytree, quantizers, GGUF import, `dense`.

The storage layout (and the fused dequantizing matmul) is defined in `pallas_kernels/quantized_matmul.py`:

- int8: symmetric, `values` int8 [..., in, out]; `scales` per output channel [..., out] (our quantizer)
  or per group of `group_size` input rows [..., in/G, out] (GGUF Q8_0, G = 32).
- int4: asymmetric, `values` uint8 [..., in/2, out] (two nibbles per byte, half-split per group, the
  GGUF Q4_1 layout), `scales` and `zeros` [..., in/G, out]; weight = scales * q + zeros, q in 0..15.

Why asymmetric int4 (min/scale, like GGUF Q4_1) rather than symmetric absmax: all 16 levels are used
even when a group is skewed, so the rounding step is (max - min) / 15 instead of 2 * absmax / 15
(a symmetric code must cover [-absmax, absmax]); and the same format holds imported Q4_1 weights, so
one kernel serves both. The price is one more [in/G, out] array (~0.5 bit/weight at G = 64 in f32) and
an FMA instead of a multiply when dequantizing, which is free in a memory-bound matmul.

W8A8 (`act_block` set, `with_int8_activations`): an int8 weight whose matmul also quantizes its input to int8
per block of `act_block` inputs, so the products are integer dots (the CPU runs them at twice its float rate).

Leading dims are stacked layers: `jax.lax.scan` over a stacked `QuantizedWeight` slices every array
leaf along axis 0 and keeps the static metadata, giving a valid per-layer weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import (
    check_quantized_weight,
    dequantize_arrays,
    pack_int4,
    quantized_matmul,
)

# Projection weights of a layer (params["layers"], stacked [L, in, out]); see docs/DESIGN.md.
PROJECTION_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
MODES = ("int8", "int4", "w8a8")
# Inputs per activation scale of a W8A8 per-channel weight (QuantizedWeight.act_block). Perplexity of the
# default model (int8 weights and head; HF float32 24.43): weight-only 24.48, activations per block of 64
# 24.67 (+1.0%), 32 24.75, 192 25.51, one scale per row 25.42 (+4%: outlier inputs flatten the rest).
W8A8_ACT_BLOCK = 64
HEAD_GROUP_SIZE = 32  # inputs per int8 scale of a quantized LM head (see quantize_params)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized [..., in, out] matmul weight. Array leaves: values, scales, zeros; the rest is static.

    values: int8 [..., in, out] (bits=8) or packed uint8 [..., in/2, out] (bits=4).
    scales: [..., out] (int8, group_size None) or [..., in/group_size, out]; float32 or bfloat16.
    zeros:  None (int8) or [..., in/group_size, out] additive offsets (int4: w = scales * q + zeros).
    act_block: None (weight-only: activations stay float) or, for int8 weights, W8A8: the matmul quantizes
      its input to int8 with one scale per act_block inputs (= group_size for grouped weights) and sums
      integer products (pallas_kernels.quantized_matmul.quantize_activations).
    """

    values: Any
    scales: Any
    zeros: Any
    bits: int
    group_size: Optional[int]
    in_features: int
    out_features: int
    act_block: Optional[int] = None

    @property
    def shape(self) -> tuple:
        """Logical float shape [..., in, out] (leading dims follow the arrays, e.g. inside lax.scan)."""
        return tuple(self.values.shape[:-2]) + (self.in_features, self.out_features)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes (values + scales + zeros): what a matmul streams from memory."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.values, self.scales, self.zeros) if a is not None)


jax.tree_util.register_dataclass(
    QuantizedWeight,
    data_fields=["values", "scales", "zeros"],
    meta_fields=["bits", "group_size", "in_features", "out_features", "act_block"],
)


@dataclasses.dataclass(frozen=True)
class StackedLayer:
    """Layer `layer` of a QuantizedWeight stacked [L, in, out], not yet sliced out of the stack.

    Built inside a layer loop (model.llama.hidden_states); `dense` passes the stack and the index to the
    matmul, whose CPU kernel reads the layer in place instead of copying it out first as slicing does.
    """

    stacked: QuantizedWeight
    layer: Any  # int32 scalar

    def sliced(self) -> QuantizedWeight:
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, keepdims=False), self.stacked)


# ----------------------------------------------------------------------------------------------------
# Quantizers
# ----------------------------------------------------------------------------------------------------

def _as_float_weight(w, name: str = "w") -> jax.Array:
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"{name}.shape={tuple(w.shape)} must be [..., in, out]")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name}.dtype={w.dtype} must be floating")
    return w.astype(jnp.float32)


def _check_group(k: int, group_size: int, *, even: bool = False) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size or (even and group_size % 2):
        parity = "an even " if even else "a "
        raise ValueError(f"group_size={group_size!r} must be {parity}positive divisor of in_features={k}")


def _safe(s: jax.Array) -> jax.Array:
    # All-zero columns/groups get scale 0; divide by 1 there so q = 0 and the weight dequantizes to 0 / min.
    return jnp.where(s > 0, s, 1.0)


def quantize_int8(w, *, group_size: Optional[int] = None, scale_dtype=jnp.float32) -> QuantizedWeight:
    """Symmetric absmax int8 of w [..., in, out]: per output channel (default) or per group of inputs.

    |w - dequantize(qw)| <= scale / 2 elementwise (with float32 scales).
    """
    w = _as_float_weight(w)
    *lead, k, n = w.shape
    if group_size is None:
        scales = (jnp.max(jnp.abs(w), axis=-2) / 127.0).astype(scale_dtype)       # [..., out]
        q = w / _safe(scales.astype(jnp.float32))[..., None, :]
    else:
        _check_group(k, group_size)
        wg = w.reshape(*lead, k // group_size, group_size, n)
        scales = (jnp.max(jnp.abs(wg), axis=-2) / 127.0).astype(scale_dtype)      # [..., in/G, out]
        q = (wg / _safe(scales.astype(jnp.float32))[..., None, :]).reshape(w.shape)
    values = jnp.clip(jnp.round(q), -127, 127).astype(jnp.int8)
    return QuantizedWeight(values, scales, None, 8, group_size, k, n)


def quantize_int4(w, group_size: int = 64, *, scale_dtype=jnp.float32) -> QuantizedWeight:
    """Asymmetric (min / scale) int4 of w [..., in, out], groups of group_size along the input dim.

    weight ~= scales * q + zeros with q in 0..15, zeros = group min, scales = (max - min) / 15;
    |w - dequantize(qw)| <= scale / 2 elementwise (with float32 scales).
    """
    w = _as_float_weight(w)
    *lead, k, n = w.shape
    _check_group(k, group_size, even=True)
    wg = w.reshape(*lead, k // group_size, group_size, n)
    lo, hi = jnp.min(wg, axis=-2), jnp.max(wg, axis=-2)                           # [..., in/G, out]
    scales = ((hi - lo) / 15.0).astype(scale_dtype)
    zeros = lo.astype(scale_dtype)
    # Round against the stored (possibly bf16) scale/zero so the codes match what gets dequantized.
    s, z = scales.astype(jnp.float32)[..., None, :], zeros.astype(jnp.float32)[..., None, :]
    q = jnp.clip(jnp.round((wg - z) / _safe(s)), 0, 15).astype(jnp.uint8).reshape(w.shape)
    return QuantizedWeight(pack_int4(q, group_size), scales, zeros, 4, group_size, k, n)


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """Float weight [..., in, out] (computed in float32, returned as dtype)."""
    check_quantized_weight(qw)
    return dequantize_arrays(qw.values, qw.scales, qw.zeros, bits=qw.bits, group_size=qw.group_size,
                             dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# The one matmul entry point of the model
# ----------------------------------------------------------------------------------------------------

def dense(x: jax.Array, w, *, impl: str = "auto", rows: Optional[jax.Array] = None) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] in x.dtype, accumulating in float32.

    w is a float array (cast to x.dtype), a 2-D QuantizedWeight (fused dequantizing matmul; impl picks its
    implementation, see pallas_kernels/backend.py) or a StackedLayer of one. rows: how many leading rows of
    x are real, the rest padding a quantized matmul may skip (quantized_matmul).
    """
    if isinstance(w, QuantizedWeight):
        return quantized_matmul(x, w, None, rows, impl=impl)
    if isinstance(w, StackedLayer):
        return quantized_matmul(x, w.stacked, w.layer, rows, impl=impl)
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"dense: x.shape={tuple(x.shape)} @ w.shape={tuple(w.shape)}: "
                         f"w must be [in, out] with in == x.shape[-1]")
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Whole-model helpers
# ----------------------------------------------------------------------------------------------------

def quantize_params(params: dict, mode: str, group_size: int = 64, *, quantize_lm_head: bool = False,
                    scale_dtype=jnp.float32) -> dict:
    """Returns params with the layer projections (PROJECTION_KEYS) replaced by QuantizedWeights.

    mode "int8": per-output-channel symmetric (group_size unused); "int4": asymmetric, group_size
    inputs per group; "w8a8": int8 as "int8", plus int8 activations (act_block = W8A8_ACT_BLOCK inputs per
    scale, or the largest multiple of 4 below it dividing the input dim; an int8 grouped weight already
    there keeps its groups as the activation blocks). Norms and biases are left alone.

    quantize_lm_head: the LM head becomes an int8 QuantizedWeight in either mode, with a scale per vocab
    row and group of HEAD_GROUP_SIZE inputs (per vocab row only when the groups do not divide d). int8, not
    int4: the logits are the most quantization-sensitive matmul. 32-input groups are GGUF Q8_0's blocks, so
    a Q8_0 embedding (the default SmolLM2-135M file's) is re-gridded exactly, where one scale per row moves
    its logits by up to ~0.6 and flips some greedy near-ties (tests/test_quantized_model.py). An untied
    "lm_head" [d, vocab] is replaced; a tied model keeps its float "embed" for the token lookup and gains
    an "lm_head" copy quantized from embed.T, which model.llama.logits_from_hidden uses instead (113 MB read
    per token in float32 on SmolLM2-135M, 32 MB as grouped int8). Off here by default; `LLM` turns it on for
    quantized models on CPU, where the CPU kernel's int8 head measured faster than XLA's float one.
    Weights that are already QuantizedWeights are kept as they are.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")

    def quantize(name: str, w):
        if isinstance(w, QuantizedWeight):
            return with_int8_activations(w) if mode == "w8a8" and w.bits == 8 else w
        try:
            if mode == "w8a8":
                return with_int8_activations(quantize_int8(w, scale_dtype=scale_dtype))
            if mode == "int8":
                return quantize_int8(w, scale_dtype=scale_dtype)
            return quantize_int4(w, group_size, scale_dtype=scale_dtype)
        except ValueError as e:
            raise ValueError(f"cannot quantize {name} (shape {tuple(np.shape(w))}) to {mode}: {e}") from e

    layers = dict(params["layers"])
    for key in PROJECTION_KEYS:
        if key in layers:
            layers[key] = quantize(f"layers.{key}", layers[key])
    out = dict(params, layers=layers)
    if quantize_lm_head:
        out = with_int8_lm_head(out, scale_dtype=scale_dtype, int8_activations=mode == "w8a8")
    return out


def with_int8_activations(qw: QuantizedWeight) -> QuantizedWeight:
    """An int8 QuantizedWeight made W8A8 (act_block set): grouped weights take their groups as activation
    blocks, per-channel ones W8A8_ACT_BLOCK inputs (or the largest multiple of 4 below it dividing K)."""
    if qw.bits != 8:
        raise ValueError(f"int8 activations need int8 weights, got bits={qw.bits}")
    if qw.act_block is not None:
        return qw
    block = qw.group_size
    if block is None:
        block = next((b for b in range(W8A8_ACT_BLOCK, 0, -4) if qw.in_features % b == 0), None)
        if block is None:
            raise ValueError(f"in_features={qw.in_features} has no divisor that is a multiple of 4 "
                             f"(W8A8 activation blocks)")
    return dataclasses.replace(qw, act_block=block)


def with_int8_lm_head(params: dict, *, scale_dtype=jnp.float32, int8_activations: bool = False) -> dict:
    """params with an int8 "lm_head" (see quantize_params' quantize_lm_head), W8A8 with int8_activations;
    the layers are left alone."""
    head = params["lm_head"] if "lm_head" in params else jnp.asarray(params["embed"]).T  # [d, vocab]
    if not isinstance(head, QuantizedWeight):
        d = np.shape(head)[0]
        group = HEAD_GROUP_SIZE if d % HEAD_GROUP_SIZE == 0 else None
        head = quantize_int8(head, group_size=group, scale_dtype=scale_dtype)
    elif not int8_activations or head.bits != 8:
        return params
    return dict(params, lm_head=with_int8_activations(head) if int8_activations else head)


def default_int4_group_size(params: dict) -> int:
    """The largest of 128 / 64 / 32 dividing every float projection's input dim (576 and 1536 -> 64)."""
    in_dims = {w.shape[-2] for k, w in params["layers"].items()
               if k in PROJECTION_KEYS and not isinstance(w, QuantizedWeight)}
    group_size = next((g for g in (128, 64, 32) if all(k % g == 0 for k in in_dims)), None)
    if group_size is None:
        raise ValueError(f"no int4 group size in (128, 64, 32) divides every projection input dim "
                         f"{sorted(in_dims)}; pass quantization_group_size")
    return group_size


def stack_quantized(qws: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """Stacks per-layer weights (same format and shape) into one [L, ...] QuantizedWeight for lax.scan."""
    if not qws:
        raise ValueError("stack_quantized needs at least one QuantizedWeight")
    first = qws[0]
    meta = lambda q: (q.bits, q.group_size, q.in_features, q.out_features, q.act_block)  # noqa: E731
    for i, q in enumerate(qws):
        if meta(q) != meta(first) or tuple(q.values.shape) != tuple(first.values.shape):
            raise ValueError(f"qws[{i}] (bits, group_size, in, out, act_block)={meta(q)} differs from "
                             f"qws[0]={meta(first)}")
    host = all(isinstance(a, np.ndarray) for a in jax.tree.leaves(list(qws)))
    stack = np.stack if host else jnp.stack
    return jax.tree.map(lambda *xs: stack(xs), *qws)


def permute_out_features(qw: QuantizedWeight, perm) -> QuantizedWeight:
    """Reorders the output channels (e.g. GGUF's interleaved Q/K rows -> HF half-split order).

    Every array leaf has out as its last dim, so this is an integer gather: no float round trip.
    """
    perm = np.asarray(perm)
    if sorted(perm.tolist()) != list(range(qw.out_features)):
        raise ValueError(f"perm must be a permutation of range(out_features={qw.out_features})")
    return jax.tree.map(lambda a: a[..., perm], qw)


def quantized_logical_axes(qw: QuantizedWeight, axes: tuple) -> QuantizedWeight:
    """Logical axis names for each array of qw, from the float weight's axes (e.g. model.llama.PARAM_AXES).

    values keep the weight's axes (the packed int4 input dim is still the input dim); grouped
    scales/zeros name their group dim like the input dim, per-channel scales drop it. Map it with
    jax.tree.map(..., is_leaf=lambda a: isinstance(a, tuple)) alongside the params.
    """
    axes = tuple(axes)
    if len(axes) != qw.ndim:
        raise ValueError(f"axes={axes} must name all {qw.ndim} dims of a weight of shape {qw.shape}")
    scale_axes = axes[:-2] + axes[-1:] if qw.group_size is None else axes
    return dataclasses.replace(qw, values=axes, scales=scale_axes, zeros=None if qw.zeros is None else scale_axes)


# ----------------------------------------------------------------------------------------------------
# GGUF import (Q8_0, Q4_0, Q4_1): byte reshuffles into our layout, never through float weights
# ----------------------------------------------------------------------------------------------------

def _gguf_blocks(raw_blocks, shape, qtype) -> np.ndarray:
    """GGUF bytes of a [out, in] row-major tensor -> uint8 blocks [out, in/block, type_size].

    shape = (in, out): GGUF's ne order (ne[0] = in, the contiguous dim), which is also our [in, out].
    """
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if len(shape) != 2 or any(int(d) <= 0 for d in shape):
        raise ValueError(f"shape={tuple(shape)} must be (in, out) (GGUF ne order), 2-D and positive")
    k, n = (int(d) for d in shape)
    if k % block:
        raise ValueError(f"in_features={k} must be a multiple of the {qtype.name} block size {block}")
    raw = raw_blocks if isinstance(raw_blocks, np.ndarray) else np.frombuffer(raw_blocks, np.uint8)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    want = n * (k // block) * type_size
    if raw.size != want:
        raise ValueError(f"{qtype.name} tensor of shape (in={k}, out={n}) needs {want} bytes, got {raw.size}")
    return raw.reshape(n, k // block, type_size)


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of every block -> float32 [in/block, out] (exact widening)."""
    f16 = np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0]  # [out, nb]
    return np.ascontiguousarray(f16.T.astype(np.float32))


def _nibbles(blocks: np.ndarray, offset: int) -> np.ndarray:
    """Packed nibbles of every block -> uint8 [in/2, out]. GGUF's byte j of a 32-block holds elements
    j (low) and j + 16 (high): our half-split-per-group layout with G = 32, so only a transpose."""
    n = blocks.shape[0]
    return np.ascontiguousarray(blocks[..., offset:].reshape(n, -1).T)


def from_gguf_q8_0(raw_blocks, shape) -> QuantizedWeight:
    """GGUF Q8_0 (blocks of 32: fp16 d, 32 x int8 q; w = d * q) -> int8 QuantizedWeight, group_size 32.

    raw_blocks: the tensor's bytes (GGUFReader tensor.data, uint8 [out, in/32*34]); shape: (in, out).
    Returns host (numpy) arrays; stack them with stack_quantized, move them with jax.device_put.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType.Q8_0
    blocks = _gguf_blocks(raw_blocks, shape, qtype)                    # [out, nb, 2 + 32]
    n, nb, _ = blocks.shape
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, nb * block)
    return QuantizedWeight(np.ascontiguousarray(q.T), _f16_field(blocks, 0), None, 8, block, nb * block, n)


def from_gguf_q4_1(raw_blocks, shape) -> QuantizedWeight:
    """GGUF Q4_1 (blocks of 32: fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m) -> int4, group 32.

    raw_blocks: the tensor's bytes (uint8 [out, in/32*20]); shape: (in, out). Host (numpy) arrays.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType.Q4_1
    blocks = _gguf_blocks(raw_blocks, shape, qtype)                    # [out, nb, 2 + 2 + 16]
    n, nb, _ = blocks.shape
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return QuantizedWeight(_nibbles(blocks, 4), _f16_field(blocks, 0), _f16_field(blocks, 2), 4, block,
                           nb * block, n)


def from_gguf_q4_0(raw_blocks, shape) -> QuantizedWeight:
    """GGUF Q4_0 (blocks of 32: fp16 d, 16 bytes of nibbles; w = d * (q - 8)) -> int4, group 32.

    Stored as our asymmetric int4 with zeros = -8 * d (exact: a power-of-two multiple of d).
    """
    import gguf

    qtype = gguf.GGMLQuantizationType.Q4_0
    blocks = _gguf_blocks(raw_blocks, shape, qtype)                    # [out, nb, 2 + 16]
    n, nb, _ = blocks.shape
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    d = _f16_field(blocks, 0)
    return QuantizedWeight(_nibbles(blocks, 2), d, -8.0 * d, 4, block, nb * block, n)


def from_gguf_tensor(tensor) -> QuantizedWeight:
    """A 2-D gguf.GGUFReader tensor of type Q8_0 / Q4_0 / Q4_1 -> QuantizedWeight [in, out]."""
    import gguf

    converters = {
        gguf.GGMLQuantizationType.Q8_0: from_gguf_q8_0,
        gguf.GGMLQuantizationType.Q4_0: from_gguf_q4_0,
        gguf.GGMLQuantizationType.Q4_1: from_gguf_q4_1,
    }
    convert = converters.get(tensor.tensor_type)
    if convert is None:
        raise ValueError(f"{tensor.name}: type {tensor.tensor_type.name} has no direct mapping; "
                         f"supported: {', '.join(t.name for t in converters)}")
    return convert(tensor.data, tuple(int(d) for d in tensor.shape))
