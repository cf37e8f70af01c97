"""Weight-only quantized matmul: ``x @ dequantize(qw)`` with the dequantization fused into the kernel.

Storage formats (this module owns the layout; ``model/quantize.py`` builds ``QuantizedWeight`` pytrees
in it). K = in_features, N = out_features, G = group_size; every weight array may carry leading stacked
dims ``[...]`` (layers), but the matmul itself takes one 2-D weight (or one layer of a ``[L, K, N]`` stack,
given by index: see ``quantized_matmul``'s ``layer``).

=====================  ========================  ==========================  ===============================
kind                   values                    scales / zeros              float weight
=====================  ========================  ==========================  ===============================
int8, per channel      int8  [..., K, N]         scales [..., N]             scales[n] * q
int8, grouped (Q8_0)   int8  [..., K, N]         scales [..., K/G, N]        scales[k // G, n] * q
int4, grouped (Q4_1)   uint8 [..., K/2, N]       scales, zeros [..., K/G, N] scales * q + zeros, q in 0..15
=====================  ========================  ==========================  ===============================

int4 nibble layout ("half-split per group", exactly GGUF Q4_0/Q4_1's block layout when G = 32): within
group g, packed row ``g*G/2 + j`` holds input row ``g*G + j`` in its low nibble and ``g*G + G/2 + j`` in
its high nibble. Both nibbles of a packed row share one (scale, zero), so the kernel dequantizes the
low and high halves with the same scale tile and needs no in-register interleave: the wrapper splits
the *activations* instead (cheap: x is [M, K], the weight is [K, N]).

Implementations (``impl``, see ``pallas_kernels/backend.py``): ``"pallas"`` (Triton GPU kernel),
``"pallas_interpret"`` (same kernel, interpreted on CPU for tests), ``"xla"`` (jnp dequantize + dot),
``"cpu_ffi"`` (the C++ CPU kernel of ``pallas_kernels/cpu_quantized_matmul.py``, through ``jax.ffi``),
``"reference"`` (dequantize to float32 then a HIGHEST-precision matmul; ground truth). ``"auto"`` on CPU
takes ``"cpu_ffi"`` for decode-sized M (<= its ``MAX_ROWS[bits]``) when the kernel could be built, else ``"xla"``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MIN_DOT_DIM = 16  # Triton's tl.dot needs every operand dim >= 16
# Decode-shaped matmuls (M = batch rows <= this) stream the weight once and do little math: they need
# many programs to pull full HBM bandwidth, so their K reduction is split over programs.
_DECODE_MAX_ROWS = 64
_TARGET_PROGRAMS = 264  # 2 per SM on an H100's 132 SMs


# ----------------------------------------------------------------------------------------------------
# Format helpers (shared with model/quantize.py)
# ----------------------------------------------------------------------------------------------------

def pack_int4(q: jax.Array, group_size: int) -> jax.Array:
    """q uint8 [..., K, N] with values in 0..15 -> packed uint8 [..., K/2, N] (half-split per group)."""
    *lead, k, n = q.shape
    q = jnp.asarray(q, jnp.uint8).reshape(*lead, k // group_size, 2, group_size // 2, n)
    lo, hi = q[..., 0, :, :], q[..., 1, :, :]
    return (lo | (hi << 4)).reshape(*lead, k // 2, n)


def unpack_int4(packed: jax.Array, group_size: int) -> jax.Array:
    """packed uint8 [..., K/2, N] -> uint8 [..., K, N] with values in 0..15 (inverse of pack_int4)."""
    *lead, kp, n = packed.shape
    packed = jnp.asarray(packed, jnp.uint8).reshape(*lead, kp // (group_size // 2), 1, group_size // 2, n)
    q = jnp.concatenate([packed & 0xF, packed >> 4], axis=-3)  # [..., K/G, 2, G/2, N]
    return q.reshape(*lead, 2 * kp, n)


def check_quantized_weight(qw: Any, *, allow_stacked: bool = True) -> None:
    """Raises ValueError unless qw's arrays match its metadata (see the table in the module docstring)."""
    for field in ("values", "scales", "zeros", "bits", "group_size", "in_features", "out_features"):
        if not hasattr(qw, field):
            raise ValueError(f"expected a QuantizedWeight, got {type(qw).__name__} without field {field!r}")
    bits, g, k, n = qw.bits, qw.group_size, qw.in_features, qw.out_features
    values, scales, zeros = qw.values, qw.scales, qw.zeros
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} must be 4 or 8")
    if g is not None and (not isinstance(g, int) or g <= 0 or k % g):
        raise ValueError(f"group_size={g!r} must be a positive divisor of in_features={k}")
    lead = tuple(values.shape[:-2])
    if not allow_stacked and lead:
        raise ValueError(f"expected one 2-D weight, got stacked values.shape={tuple(values.shape)}; "
                         f"slice the leading dims first (e.g. inside lax.scan)")
    if bits == 8:
        want_values, want_dtype = lead + (k, n), jnp.int8
        want_scales = lead + ((n,) if g is None else (k // g, n))
        if zeros is not None:
            raise ValueError("int8 weights are symmetric: zeros must be None")
    else:
        if g is None or g % 2:
            raise ValueError(f"int4 needs an even group_size, got group_size={g!r}")
        want_values, want_dtype = lead + (k // 2, n), jnp.uint8
        want_scales = lead + (k // g, n)
        if zeros is None or tuple(zeros.shape) != want_scales:
            raise ValueError(f"int4 zeros.shape={None if zeros is None else tuple(zeros.shape)} "
                             f"must be {want_scales}")
    if tuple(values.shape) != want_values or values.dtype != jnp.dtype(want_dtype):
        raise ValueError(f"int{bits} values must be {jnp.dtype(want_dtype).name} {want_values}, got "
                         f"{values.dtype} {tuple(values.shape)} (in_features={k}, out_features={n}, "
                         f"group_size={g})")
    if tuple(scales.shape) != want_scales or not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"scales must be float {want_scales}, got {scales.dtype} {tuple(scales.shape)}")
    act_block = getattr(qw, "act_block", None)
    if act_block is not None:
        if bits != 8:
            raise ValueError(f"act_block={act_block} (int8 activations) needs int8 weights, got bits={bits}")
        if not isinstance(act_block, int) or act_block <= 0 or act_block % 4 or k % act_block:
            raise ValueError(f"act_block={act_block!r} must be a positive multiple of 4 dividing in_features={k}")
        if g is not None and g != act_block:
            raise ValueError(f"act_block={act_block} must equal group_size={g} for grouped weights")


def quantize_activations(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Dynamic symmetric int8 quantization of activations, one scale per block of `block` inputs.

    x [..., K] float -> (qa int8 [..., K], sa float32 [..., K/block]) with sa = amax / 127 and
    qa = round_half_even(x * (127 / amax)) (0 where amax = 0): the W8A8 kernel's formula (cpu_int8_dot.cc).
    """
    *lead, k = x.shape
    if k % block:
        raise ValueError(f"{block=} must divide in_features K={k}")
    xb = x.astype(jnp.float32).reshape(*lead, k // block, block)
    amax = jnp.max(jnp.abs(xb), axis=-1)                                # [..., K/B]
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    qa = jnp.clip(jnp.round(xb * inv[..., None]), -127, 127).astype(jnp.int8)
    return qa.reshape(*lead, k), amax / 127.0


def fake_quantize_activations(x: jax.Array, block: int) -> jax.Array:
    """x [..., K] -> float32 [..., K]: qa * sa of quantize_activations (what a W8A8 matmul multiplies)."""
    qa, sa = quantize_activations(x, block)
    *lead, k = x.shape
    return (qa.reshape(*lead, k // block, block).astype(jnp.float32) * sa[..., None]).reshape(*lead, k)


def dequantize_arrays(values: jax.Array, scales: jax.Array, zeros: Optional[jax.Array], *, bits: int,
                      group_size: Optional[int], dtype=jnp.float32) -> jax.Array:
    """Float weight [..., K, N] from the stored arrays; math in float32, then cast to dtype.

    values: int8 [..., K, N] or packed uint8 [..., K/2, N]; scales: [..., N] or [..., K/G, N];
    zeros: None or [..., K/G, N].
    """
    q = unpack_int4(values, group_size) if bits == 4 else values
    q = q.astype(jnp.float32)
    if group_size is None:  # per output channel
        return (q * scales.astype(jnp.float32)[..., None, :]).astype(dtype)
    *lead, k, n = q.shape
    w = q.reshape(*lead, k // group_size, group_size, n) * scales.astype(jnp.float32)[..., None, :]
    if zeros is not None:
        w = w + zeros.astype(jnp.float32)[..., None, :]
    return w.reshape(*lead, k, n).astype(dtype)


def _dequantize(qw, dtype=jnp.float32) -> jax.Array:
    return dequantize_arrays(qw.values, qw.scales, qw.zeros, bits=qw.bits, group_size=qw.group_size,
                             dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------------

def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class QuantizedMatmulBlockSizes:
    """Tile sizes of the Pallas kernel (hashable: a static jit argument).

    block_m: rows of x per program (x is zero-padded up to a multiple; decode has M = batch).
    block_n: output columns per program.
    block_k: input rows (unpacked) per step of the in-kernel K loop; grouped formats need a
      multiple of group_size so each step sees whole groups (for int4 the dot sees block_k / 2).
    num_warps, num_stages: Triton launch parameters.
    k_splits: programs that share one output tile, each reducing K / k_splits input rows into a float32
      partial sum that the wrapper adds up (a grid axis; no atomics, so results are deterministic).
    All block sizes are powers of two >= 16 (Triton's arange/dot constraints).
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    k_splits: int = 1

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or not _is_pow2(v) or v < _MIN_DOT_DIM:
                raise ValueError(f"{name}={v!r} must be a power of two >= {_MIN_DOT_DIM}")
        for name in ("num_warps", "num_stages", "k_splits"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive int")

    def validate(self, *, k: int, n: int, bits: int, group_size: Optional[int]) -> None:
        """Raises ValueError unless these blocks tile a [K, N] weight of this format exactly."""
        block_k, block_n = self.block_k, self.block_n
        if group_size is not None and block_k % group_size:
            raise ValueError(f"{block_k=} must be a multiple of {group_size=}")
        if bits == 4 and block_k // 2 < _MIN_DOT_DIM:
            raise ValueError(f"int4 needs {block_k=} >= {2 * _MIN_DOT_DIM} (the dot sees block_k // 2 rows)")
        if k % block_k:
            raise ValueError(f"in_features K={k} must be a multiple of {block_k=}")
        if (k // block_k) % self.k_splits:
            raise ValueError(f"k_splits={self.k_splits} must divide the K={k} // {block_k=} = {k // block_k} "
                             f"K steps")
        if n % block_n:
            raise ValueError(f"out_features N={n} must be a multiple of {block_n=}")

    @classmethod
    def get_default(cls, *, m: int, k: int, n: int, bits: int,
                    group_size: Optional[int]) -> "QuantizedMatmulBlockSizes":
        """Largest power-of-two tiles (up to untuned defaults) that divide this problem exactly.

        Decode shapes (m <= 64) get 32-column tiles and the fewest K splits that launch >= 264 programs
        (2 per H100 SM); the split depends only on (K, N), so every decode batch size reduces K alike.
        """
        decode = m <= _DECODE_MAX_ROWS
        block_m = max(_MIN_DOT_DIM, min(64, pl.next_power_of_2(max(m, 1))))
        # Narrow N tiles give decode more programs and so fewer K splits, whose f32 partial sums cost
        # traffic (k_splits * M * N * 8 bytes written and read back); 32 int8 columns are still one full
        # 32-byte sector per weight row.
        block_n = _fit_block(n, 32 if decode else 128)
        min_k = 2 * _MIN_DOT_DIM if bits == 4 else _MIN_DOT_DIM
        block_k = _fit_block(k, max(128, group_size or 1), multiple_of=group_size or 1, minimum=min_k)
        if block_n is None:
            raise ValueError(f"no power-of-two block_n >= {_MIN_DOT_DIM} divides out_features N={n}; "
                             f"use impl='xla' for this shape")
        if block_k is None:
            raise ValueError(f"no power-of-two block_k >= {min_k} that is a multiple of group_size="
                             f"{group_size} divides in_features K={k}; use impl='xla' for this shape")
        k_splits = 1
        if decode:
            steps = k // block_k
            k_splits = next((d for d in range(1, steps + 1)
                             if steps % d == 0 and (n // block_n) * d >= _TARGET_PROGRAMS), steps)
        # Prefill tiles (64 x 128, dequantize + f32 accumulator) spill with 4 warps; 8 warps halve the
        # registers each thread holds.
        num_warps = 4 if decode else 8
        blocks = cls(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, k_splits=k_splits)
        blocks.validate(k=k, n=n, bits=bits, group_size=group_size)
        return blocks


def _fit_block(dim: int, want: int, multiple_of: int = 1, minimum: int = _MIN_DOT_DIM) -> Optional[int]:
    """Largest power of two b <= want (rounded up to pow2) with dim % b == 0 and b % multiple_of == 0."""
    b = pl.next_power_of_2(want)
    while b >= minimum:
        if dim % b == 0 and b % multiple_of == 0:
            return b
        b //= 2
    return None


# ----------------------------------------------------------------------------------------------------
# Pallas kernels: one program computes a [block_m, block_n] output tile over its share of K, looping over
# it in-kernel; with k_splits > 1 the tile is a float32 partial sum (Triton programs run in parallel, so
# programs of one tile cannot accumulate into one buffer without atomics: the wrapper adds the partials).
# ----------------------------------------------------------------------------------------------------

def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, block_k: int, group_size: Optional[int]):
    # Ks = K / k_splits, this program's rows of K.
    # x_ref [bm, Ks] float; w_ref [Ks, bn] int8; s_ref [1, bn] (per channel) or [Ks/G, bn]; o_ref [bm, bn]
    bm, bn = o_ref.shape
    num_steps = w_ref.shape[0] // block_k

    def step(i, acc):
        k0 = pl.multiple_of(i * block_k, block_k)
        x = x_ref[:, pl.ds(k0, block_k)]                   # [bm, bk]
        q = w_ref[pl.ds(k0, block_k), :]                   # [bk, bn] int8
        if group_size is None:
            w = q.astype(x.dtype)  # exact (|q| <= 127); the per-column scale is applied once after the loop
        else:
            ng = block_k // group_size
            s = s_ref[pl.ds(i * ng, ng), :].astype(jnp.float32)  # [ng, bn]
            w = q.astype(jnp.float32).reshape(ng, group_size, bn) * s[:, None, :]
            w = w.reshape(block_k, bn).astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, num_steps, step, jnp.zeros((bm, bn), jnp.float32))
    if group_size is None:
        # A per-output-channel scale commutes with the K sum (and with the sum of K splits): scale the
        # f32 accumulator, not the tile.
        acc = acc * s_ref[...].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def _int4_kernel(xlo_ref, xhi_ref, w_ref, s_ref, z_ref, o_ref, *, block_k: int, group_size: int):
    # Ks = K / k_splits, this program's rows of K.
    # xlo_ref, xhi_ref [bm, Ks/2] float (x columns matching the low / high nibbles, see _split_x_int4);
    # w_ref [Ks/2, bn] uint8 packed; s_ref, z_ref [Ks/G, bn]; o_ref [bm, bn]
    bm, bn = o_ref.shape
    half_group = group_size // 2
    packed_k = block_k // 2           # packed rows per step
    ng = block_k // group_size        # groups per step
    num_steps = w_ref.shape[0] // packed_k

    def step(i, acc):
        p0 = pl.multiple_of(i * packed_k, packed_k)
        # Widen to int32 before the bit ops so the shift/mask semantics are unambiguous on every backend.
        packed = w_ref[pl.ds(p0, packed_k), :].astype(jnp.int32)     # [bk/2, bn]
        s = s_ref[pl.ds(i * ng, ng), :].astype(jnp.float32)[:, None, :]  # [ng, 1, bn]
        z = z_ref[pl.ds(i * ng, ng), :].astype(jnp.float32)[:, None, :]  # [ng, 1, bn]
        x_lo = xlo_ref[:, pl.ds(p0, packed_k)]                         # [bm, bk/2]
        x_hi = xhi_ref[:, pl.ds(p0, packed_k)]

        def dequant(q):  # [bk/2, bn] int32 in 0..15 -> [bk/2, bn] x.dtype
            w = q.astype(jnp.float32).reshape(ng, half_group, bn) * s + z
            return w.reshape(packed_k, bn).astype(x_lo.dtype)

        acc = acc + jnp.dot(x_lo, dequant(packed & 0xF), preferred_element_type=jnp.float32)
        return acc + jnp.dot(x_hi, dequant(packed >> 4), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, num_steps, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _split_x_int4(x: jax.Array, group_size: int):
    """x [M, K] -> (x_lo, x_hi) [M, K/2]: the columns that multiply the low / high nibbles."""
    m, k = x.shape
    x = x.reshape(m, k // group_size, 2, group_size // 2)
    return x[:, :, 0, :].reshape(m, k // 2), x[:, :, 1, :].reshape(m, k // 2)


def _pallas_matmul(x: jax.Array, qw, blocks: QuantizedMatmulBlockSizes, interpret: bool,
                   rows: Optional[int] = None) -> jax.Array:
    """x [M, K] (M a multiple of block_m) -> [rows, N] in x.dtype: the first `rows` (default M) rows."""
    m, k = x.shape
    n, g = qw.out_features, qw.group_size
    bm, bn, splits = blocks.block_m, blocks.block_n, blocks.k_splits
    ks = k // splits  # input rows each program reduces
    grid = (m // bm, n // bn, splits)
    row_panel = lambda i, j, s: (i, s)  # noqa: E731 -- x rows of this program, its share of K
    col_panel = lambda i, j, s: (s, j)  # noqa: E731 -- weight/scale columns of this program, its share of K
    if qw.bits == 8:
        kernel = functools.partial(_int8_kernel, block_k=blocks.block_k, group_size=g)
        if g is None:
            operands = (x, qw.values, qw.scales.reshape(1, n))
            scale_spec = pl.BlockSpec((1, bn), lambda i, j, s: (0, j))
        else:
            operands = (x, qw.values, qw.scales)
            scale_spec = pl.BlockSpec((ks // g, bn), col_panel)
        in_specs = [pl.BlockSpec((bm, ks), row_panel),
                    pl.BlockSpec((ks, bn), col_panel),
                    scale_spec]
    else:
        x_lo, x_hi = _split_x_int4(x, g)
        kernel = functools.partial(_int4_kernel, block_k=blocks.block_k, group_size=g)
        operands = (x_lo, x_hi, qw.values, qw.scales, qw.zeros)
        in_specs = [pl.BlockSpec((bm, ks // 2), row_panel),
                    pl.BlockSpec((bm, ks // 2), row_panel),
                    pl.BlockSpec((ks // 2, bn), col_panel),
                    pl.BlockSpec((ks // g, bn), col_panel),
                    pl.BlockSpec((ks // g, bn), col_panel)]
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)       # partial sums over K
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    compiler_params = None
    if not interpret:
        from pallas_kernels.backend import gpu_compiler_params

        # Always Triton: the body uses jnp.dot inside pallas_call, which Mosaic GPU does not lower.
        compiler_params = gpu_compiler_params("triton", num_warps=blocks.num_warps,
                                              num_stages=blocks.num_stages)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=compiler_params,
        interpret=interpret,
        name=f"quantized_matmul_int{qw.bits}" + (f"_{splits}_k_splits" if splits > 1 else ""),
    )(*operands)
    rows = m if rows is None else rows
    # Slice before summing the K splits: the padding rows' partial sums are never read back.
    return out[:rows] if splits == 1 else out[:, :rows].sum(axis=0).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Non-Pallas paths
# ----------------------------------------------------------------------------------------------------

def quantized_matmul_reference(x: jax.Array, qw) -> jax.Array:
    """Ground truth: x [..., K] -> float32 [..., N] = x (f32) @ dequantize(qw) (f32), HIGHEST precision."""
    return jnp.matmul(x.astype(jnp.float32), _dequantize(qw, jnp.float32), precision=lax.Precision.HIGHEST)


def _xla_matmul(x: jax.Array, qw) -> jax.Array:
    """x [M, K] -> [M, N] float32; same numerics as the kernel (dequantize in f32, dot in x.dtype)."""
    if qw.bits == 8 and qw.group_size is None:
        acc = jnp.dot(x, qw.values.astype(x.dtype), preferred_element_type=jnp.float32)
        return acc * qw.scales.astype(jnp.float32)
    return jnp.dot(x, _dequantize(qw, jnp.float32).astype(x.dtype), preferred_element_type=jnp.float32)


CPU_FFI = "cpu_ffi"  # an impl of this op only (not in backend.IMPLS): the jax.ffi CPU kernel


def _resolve_impl(impl: str) -> str:
    from pallas_kernels.backend import resolve_impl

    return impl if impl == CPU_FFI else resolve_impl(impl)


def _cpu_int8_dot_for(qw) -> bool:
    """Whether impl="auto" runs this W8A8 matmul (qw.act_block set) on the CPU int8-dot kernel."""
    from pallas_kernels import cpu_quantized_matmul as cpu

    return jax.default_backend() == "cpu" and cpu.int8_dot_available()


def _cpu_ffi_for(m: int, bits: int) -> bool:
    """Whether impl="auto" runs this M-row matmul on the CPU kernel (builds it on first use)."""
    from pallas_kernels import cpu_quantized_matmul as cpu

    return jax.default_backend() == "cpu" and m <= cpu.MAX_ROWS[bits] and cpu.available()


# ----------------------------------------------------------------------------------------------------
# Public wrapper
# ----------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("impl", "block_sizes"))
def quantized_matmul(x: jax.Array, qw, layer: Optional[jax.Array] = None, rows: Optional[jax.Array] = None, *,
                     impl: str = "auto", block_sizes: Optional[QuantizedMatmulBlockSizes] = None) -> jax.Array:
    """x [..., K] @ qw (a 2-D QuantizedWeight [K, N]) -> [..., N] in x.dtype (f32 accumulation).

    layer: with qw stacked [L, K, N], the int32 index of the layer to multiply by. The CPU kernel reads it
    in place; every other impl slices it out first (what lax.scan over the stack would do).
    rows: an int32 scalar, how many leading rows of x are real (the rest pad a compiled step shape). The CPU
    kernel skips the others (they come out zero); other impls compute every row.
    A weight with act_block set (W8A8) multiplies x quantized to int8 per block of act_block inputs
    (quantize_activations): on CPU with AVX-512 VNNI as integer dots (cpu_int8_dot.cc), elsewhere as
    fake_quantize_activations(x) through the weight-only impls.
    impl: "auto" | "pallas" | "pallas_interpret" | "xla" | "cpu_ffi" | "reference" (see the module docstring).
    block_sizes: Pallas tiles; None picks QuantizedMatmulBlockSizes.get_default for this shape.
    """
    requested, impl = impl, _resolve_impl(impl)
    if layer is not None:
        check_quantized_weight(qw)
        if qw.values.ndim != 3:
            raise ValueError(f"layer= needs weights stacked [L, K, N], got values.shape={tuple(qw.values.shape)}")
    else:
        check_quantized_weight(qw, allow_stacked=False)
    k, n = qw.in_features, qw.out_features
    if not any(x.dtype == jnp.dtype(d) for d in _FLOAT_DTYPES):
        raise ValueError(f"x.dtype={x.dtype} must be float32, bfloat16 or float16")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x.shape={tuple(x.shape)} must end in in_features K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)                                              # [M, K]
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*lead, n), x.dtype)

    act_block = getattr(qw, "act_block", None)
    if act_block is not None:  # W8A8: int8 activations too
        if requested == "auto" and impl == "xla" and _cpu_int8_dot_for(qw):
            from pallas_kernels.cpu_quantized_matmul import cpu_int8_dot_matmul

            return cpu_int8_dot_matmul(x2, qw, layer, rows).astype(x.dtype).reshape(*lead, n)
        # Elsewhere the same math with float products: the quantized activations times the weight.
        x2 = fake_quantize_activations(x2, act_block).astype(x.dtype)
    if requested == "auto" and impl == "xla" and _cpu_ffi_for(m, qw.bits):
        impl = CPU_FFI
    if impl == CPU_FFI:
        from pallas_kernels.cpu_quantized_matmul import cpu_quantized_matmul

        return cpu_quantized_matmul(x2, qw, layer, rows).astype(x.dtype).reshape(*lead, n)
    if requested == "auto" and impl == "xla" and qw.group_size is not None and _cpu_ffi_for(0, qw.bits):
        # Too many rows for the CPU kernel: its dequantize (XLA's is slow for grouped formats), XLA's dot.
        from pallas_kernels.cpu_quantized_matmul import cpu_dequantize

        w = cpu_dequantize(qw, layer).astype(x.dtype)                    # [K, N]
        return jnp.dot(x2, w, preferred_element_type=jnp.float32).astype(x.dtype).reshape(*lead, n)
    if layer is not None:
        qw = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, layer, keepdims=False), qw)
    if impl in ("pallas", "pallas_interpret") and block_sizes is None:
        try:
            block_sizes = QuantizedMatmulBlockSizes.get_default(m=m, k=k, n=n, bits=qw.bits,
                                                                group_size=qw.group_size)
        except ValueError:
            if requested != "auto":
                raise
            impl = "xla"  # "auto" means the best path that works: untileable shapes go to XLA.

    if impl == "reference":
        out = quantized_matmul_reference(x2, qw)
    elif impl == "xla":
        out = _xla_matmul(x2, qw)
    elif impl in ("pallas", "pallas_interpret"):
        from pallas_kernels.backend import targets_gpu

        if impl == "pallas" and not targets_gpu():
            raise ValueError(f"impl='pallas' needs a GPU, the backend is {jax.default_backend()!r}; "
                             f"use 'pallas_interpret' or 'xla'")
        block_sizes.validate(k=k, n=n, bits=qw.bits, group_size=qw.group_size)
        # Pad M up to the row tile (decode has M = batch, 1..64); padded rows are sliced off.
        m_pad = pl.cdiv(m, block_sizes.block_m) * block_sizes.block_m
        x_pad = jnp.pad(x2, ((0, m_pad - m), (0, 0)))                   # [M_pad, K]
        out = _pallas_matmul(x_pad, qw, block_sizes, interpret=impl == "pallas_interpret", rows=m)
    else:
        raise ValueError(f"impl={impl!r} is not supported by quantized_matmul")
    return out.astype(x.dtype).reshape(*lead, n)
