"""The sampler's selections on the CPU, C++ kernels called through ``jax.ffi`` (``cpu_top_k.cc``, built
with the CPU kernel library of ``pallas_kernels/cpu_quantized_matmul.py``).

``cpu_top_values``: the k largest values of each row (the top-k / top-p candidates). XLA:CPU's TopK sorts
(value, index) pairs row by row, 5 ms for [64, 49152] at k = 64 and still ~1 ms for [64, 1536]; the sampler
needs only the values. The kernel makes one pass per row, comparing 16 values at a time against the k-th
largest kept so far. Shapes: x [B, V] float32 -> [B, k] float32, each row's k largest values descending
with repeats, as ``jax.lax.top_k(x, k)[0]`` (the reference, ``top_values_reference``); NaNs are never
selected (rows with NaNs are not valid sampler input), and fewer than k non-NaN values pad with -inf.

``cpu_filter_cutoff``: the exact min-p -> top-k -> top-p cut-off of the rows the candidates leave open, the
twin of the sampler's bisection (``inference.sampler._bisect_threshold``, its reference): a quickselect on
value carrying the mass above, one pass and O(V) expected per row, where the bisection makes 32 passes.
Its masses are summed in double (the bisection's in float32), so a nucleus boundary within float32
rounding of top_p may close one value apart. BENCHMARKS.md (issue 12) has the timings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_TARGET = "ridgeline_top_values"


def kernel_available() -> bool:
    """On the CPU backend, with the CPU kernel library built and registered."""
    if jax.default_backend() != "cpu":
        return False
    from pallas_kernels import cpu_quantized_matmul  # builds and registers the CPU kernel library

    return cpu_quantized_matmul.available()


def cpu_top_values(x: jax.Array, k: int) -> jax.Array:
    """[B, k] float32: the k largest values of each row of x [B, V] (cast to float32), descending."""
    if x.ndim != 2:
        raise ValueError(f"x.shape={x.shape} must be [B, V]")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"{k=} must be in [1, V={x.shape[1]}]")
    out = jax.ShapeDtypeStruct((x.shape[0], k), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")(x.astype(jnp.float32))


def top_values_reference(x: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(x.astype(jnp.float32), k)[0]


def cpu_filter_cutoff(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, floor: jax.Array, kth: jax.Array,
                      kth_known: jax.Array, rows: jax.Array) -> jax.Array:
    """[B] f32 cut-off (keep scaled >= it) of each row with rows [B] true, -inf elsewhere.

    scaled [B, V] f32 temperature-scaled logits; top_k [B] i32 in 1..V (V = off); top_p [B] f32; floor [B]
    the min-p cut-off; kth [B] = max(k-th largest value, floor) where kth_known [B] bool (else the kernel
    finds it). The rule of ``inference.sampler._bisect_threshold``."""
    if scaled.ndim != 2:
        raise ValueError(f"scaled.shape={scaled.shape} must be [B, V]")
    out = jax.ShapeDtypeStruct(scaled.shape[:1], jnp.float32)
    i32, f32 = (lambda a: jnp.asarray(a).astype(jnp.int32)), (lambda a: jnp.asarray(a).astype(jnp.float32))
    return jax.ffi.ffi_call("ridgeline_filter_cutoff", out, vmap_method="broadcast_all")(
        f32(scaled), i32(top_k), f32(top_p), f32(floor), f32(kth), i32(kth_known), i32(rows))
