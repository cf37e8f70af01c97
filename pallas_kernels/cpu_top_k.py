"""The sampler's selections and draw on the CPU: C++ kernels called through ``jax.ffi`` (``cpu_top_k.cc``,
built with the CPU kernel library of ``pallas_kernels/cpu_quantized_matmul.py``).

``cpu_candidates``: the k largest values of each row (the top-k / top-p candidates) and the mass of the
row's top-k survivors. XLA:CPU's TopK sorts (value, index) pairs row by row, 5 ms for [64, 49152] at k = 64
and still ~1 ms for [64, 1536]; the sampler needs only the values. The kernel makes one pass per row,
comparing 16 values at a time against the k-th largest kept so far, then sums the survivors' exp while the
row is in cache (the XLA path's separate vocab-wide pass). Shapes: x [B, V] float32 -> values [B, k]
float32, each row's k largest values descending with repeats, as ``jax.lax.top_k(x, k)[0]``, and mass [B];
reference ``candidates_reference``. NaNs are never selected (rows with NaNs are not valid sampler input),
and fewer than k non-NaN values pad with -inf.

``cpu_filter_cutoff``: the exact min-p -> top-k -> top-p cut-off of the rows the candidates leave open, the
twin of the sampler's bisection (``inference.sampler._bisect_threshold``, its reference): a quickselect on
value carrying the mass above, one pass and O(V) expected per row, where the bisection makes 32 passes.
Its masses are summed in double (the bisection's in float32), so a nucleus boundary within float32
rounding of top_p may close one value apart.

``cpu_draw``: the sampler's two-level inverse-CDF draw (``inference.sampler._draw``, its reference) fused
into one pass per row: block masses of exp(x - max) over x >= cutoff are summed without writing the masked
logits or their weights out as [B, V] arrays, then the chosen block's weights are recomputed. Its sums
run in another order than XLA's, so a uniform within float32 rounding of a block or token boundary may
pick the neighbour (each row still depends only on its own inputs). BENCHMARKS.md (issue 12) has the
timings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

def kernel_available() -> bool:
    """On the CPU backend, with the CPU kernel library built and registered."""
    if jax.default_backend() != "cpu":
        return False
    from pallas_kernels import cpu_quantized_matmul  # builds and registers the CPU kernel library

    return cpu_quantized_matmul.available()


def _require_kernels() -> None:
    if not kernel_available():
        raise RuntimeError("the CPU kernel library is not available (see pallas_kernels/cpu_quantized_matmul.py)")


def _f32(a) -> jax.Array:
    return jnp.asarray(a).astype(jnp.float32)


def _i32(a) -> jax.Array:
    return jnp.asarray(a).astype(jnp.int32)


def cpu_candidates(x: jax.Array, k: int, top_k: jax.Array, floor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(values [B, k], mass [B]) f32 for rows x [B, V]: each row's k largest values, descending, and the
    mass sum(exp(x - values[:, 0])) of its tokens >= max(floor [B], the top_k [B]-th value where
    top_k <= k and top_k < V) -- the sampler's top-k survivors as far as the candidates know them."""
    if x.ndim != 2:
        raise ValueError(f"x.shape={x.shape} must be [B, V]")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"{k=} must be in [1, V={x.shape[1]}]")
    _require_kernels()
    rows = x.shape[0]
    out = (jax.ShapeDtypeStruct((rows, k), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.float32))
    return jax.ffi.ffi_call("ridgeline_candidates", out, vmap_method="broadcast_all")(
        _f32(x), _i32(top_k), _f32(floor))


def candidates_reference(x: jax.Array, k: int, top_k: jax.Array, floor: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = x.astype(jnp.float32)
    values = jax.lax.top_k(x, k)[0]
    inside = (top_k >= 1) & (top_k <= k) & (top_k < x.shape[1])
    kth = jnp.take_along_axis(values, (jnp.clip(top_k, 1, k) - 1)[:, None], axis=-1)[:, 0]
    kth = jnp.maximum(floor, jnp.where(inside, kth, -jnp.inf))
    mass = jnp.sum(jnp.where(x >= kth[:, None], jnp.exp(x - values[:, :1]), 0.0), axis=-1)
    return values, mass


def cpu_filter_cutoff(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, floor: jax.Array, kth: jax.Array,
                      kth_known: jax.Array, rows: jax.Array) -> jax.Array:
    """[B] f32 cut-off (keep scaled >= it) of each row with rows [B] true, -inf elsewhere.

    scaled [B, V] f32 temperature-scaled logits; top_k [B] i32 in 1..V (V = off); top_p [B] f32; floor [B]
    the min-p cut-off; kth [B] = max(k-th largest value, floor) where kth_known [B] bool (else the kernel
    finds it). The rule of ``inference.sampler._bisect_threshold``."""
    if scaled.ndim != 2:
        raise ValueError(f"scaled.shape={scaled.shape} must be [B, V]")
    _require_kernels()
    out = jax.ShapeDtypeStruct(scaled.shape[:1], jnp.float32)
    return jax.ffi.ffi_call("ridgeline_filter_cutoff", out, vmap_method="broadcast_all")(
        _f32(scaled), _i32(top_k), _f32(top_p), _f32(floor), _f32(kth), _i32(kth_known), _i32(rows))


def cpu_draw(scaled: jax.Array, cutoff: jax.Array, row_max: jax.Array, uniforms: jax.Array) -> jax.Array:
    """[B] i32: per row one token drawn from softmax(scaled) restricted to scaled >= cutoff [B], with
    row_max [B] the row's maximum (never cut off) and uniforms [B, 2] in [0, 1): the first picks a block
    of 256 tokens by its mass, the second a token inside it (``inference.sampler._draw``'s rule)."""
    if scaled.ndim != 2 or uniforms.shape != (scaled.shape[0], 2):
        raise ValueError(f"scaled.shape={scaled.shape} must be [B, V] and uniforms.shape={uniforms.shape} [B, 2]")
    _require_kernels()
    out = jax.ShapeDtypeStruct(scaled.shape[:1], jnp.int32)
    return jax.ffi.ffi_call("ridgeline_draw", out, vmap_method="broadcast_all")(
        _f32(scaled), _f32(cutoff), _f32(row_max), _f32(uniforms))
