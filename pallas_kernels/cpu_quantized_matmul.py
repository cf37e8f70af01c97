"""Weight-only quantized matmul on the CPU for decode-sized M: a C++ kernel called through ``jax.ffi``.

Why a kernel of our own: XLA:CPU runs ``x @ (scales * q)`` for int8 / int4 weights at ~2 GB/s of weight
bytes (it dequantizes the whole weight, then calls a float dot), while a batch-1 decode step is a sweep
over every weight byte once. ``cpu_qmatmul.cc`` streams the stored bytes (int8 per channel, int8 grouped
= GGUF Q8_0, int4 half-split = GGUF Q4_0/Q4_1; layouts in ``pallas_kernels/quantized_matmul.py``),
converts 16 weights at a time to float in registers and shares contiguous slices of K between the
calling thread and XLA's intra-op thread pool, prefetching ahead of the hardware. Math: float32 products
and accumulation, the per-channel scale after each slice's sum, grouped scales once per group (the same
numerics as the ``"xla"`` path up to the summation order, which is fixed: a row's result does not depend
on the other rows of the call). Stacked weights [L, K, N] with a layer index are read in place, which is
how the model's layer scan calls it (``model.quantize.StackedLayer``): slicing the layer out first would
copy it. ``quantized_matmul(impl="auto")`` picks it on CPU for M <= ``MAX_ROWS[bits]``.

Build: lazily, on first use, with the system C++ compiler (``$CXX``, else ``c++`` / ``g++`` / ``clang++``)
into ``cache_dir()`` (``~/.cache/ridgeline/ffi`` by default), one ``.so`` per hash of (source,
jaxlib version, compiler, CPU flags). Chosen over an install-time build because ``-march=native`` must
describe the machine that *runs* the kernel (a wheel or a shared venv is often built elsewhere), the
package stays a pure-Python wheel (no per-platform builds), and editable installs work unchanged; the
price is a ~3 s compile once per machine and jaxlib version. Concurrent first uses each compile to a
temporary file and rename it into place. Without a compiler or the FFI headers, or when the build or
load fails, or with ``RIDGELINE_CPU_FFI=0``, ``available()`` is False, one warning says why, and
``quantized_matmul`` keeps its XLA path.

Shapes: x [M, K] float, weight [K, N] in the formats above (or stacked [L, K, N] with a layer index, read in
place); output float32 [M, N].
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import check_quantized_weight, quantized_matmul_reference

# One library of CPU kernels: the weight-only quantized matmul and the W8A8 int8-dot matmul (here), the
# paged decode attention (called by pallas_kernels/ragged_paged_attention_xla.py) and the sampler's candidates,
# cut-offs and draw (pallas_kernels/cpu_top_k.py). HEADERS are included by the sources (and hashed into the
# build key).
SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("cpu_qmatmul.cc", "cpu_attention.cc", "cpu_int8_dot.cc", "cpu_top_k.cc"))
HEADERS = (Path(__file__).with_name("cpu_common.h"),)
ENV_DISABLE = "RIDGELINE_CPU_FFI"  # "0" turns the kernel off (XLA path)
# Largest M that quantized_matmul(impl="auto") sends to the matmul kernel, per weight bits; above it the
# product is compute-bound and XLA's dot does the math (grouped formats dequantized by cpu_dequantize).
# Default-model (GGUF Q4_1) decode steps, kernel vs dequantize + dot, one run each: B=16 76 vs 108 ms,
# B=32 126 vs 129, B=64 259 vs 207; int8 per channel was level with XLA's dot at M = 64.
MAX_ROWS = {8: 16, 4: 32}
_TARGETS = {8: "ridgeline_qmatmul_int8", 4: "ridgeline_qmatmul_int4"}
_DEQUANT_TARGETS = {8: "ridgeline_dequant_int8", 4: "ridgeline_dequant_int4"}
_SYMBOLS = {"ridgeline_qmatmul_int8": "RidgelineQMatmulInt8", "ridgeline_qmatmul_int4": "RidgelineQMatmulInt4",
            "ridgeline_dequant_int8": "RidgelineDequantInt8", "ridgeline_dequant_int4": "RidgelineDequantInt4",
            "ridgeline_decode_attention": "RidgelineDecodeAttention", "ridgeline_candidates": "RidgelineCandidates",
            "ridgeline_filter_cutoff": "RidgelineFilterCutoff", "ridgeline_draw": "RidgelineDraw"}
# Registered only where the library was built with AVX-512 VNNI (RidgelineHasInt8Dot() says so).
_INT8_DOT_TARGET, _INT8_DOT_SYMBOL = "ridgeline_int8_dot", "RidgelineInt8Dot"
_CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


@dataclasses.dataclass(frozen=True)
class CpuMatmulConfig:
    """Kernel launch parameters (hashable: a static jit argument).

    tile_vecs: output columns per work item, in 16-float vectors (1..4); 4 = one 64-byte int8 cache
      line per weight row. Smaller tiles balance the two cores better on narrow N.
    max_threads: cap on the threads sharing the column tiles (0: all of XLA's intra-op pool). The kernel
      also gives each thread at least 384 KiB of stored weight: a smaller share streams from one core in
      about the time it takes to hand it to another.
    """

    tile_vecs: int = 4
    max_threads: int = 0

    def __post_init__(self):
        if not isinstance(self.tile_vecs, int) or not 1 <= self.tile_vecs <= 4:
            raise ValueError(f"tile_vecs={self.tile_vecs!r} must be an int in 1..4")
        if not isinstance(self.max_threads, int) or self.max_threads < 0:
            raise ValueError(f"max_threads={self.max_threads!r} must be a non-negative int")

    @classmethod
    def get_default(cls, *, n: int) -> "CpuMatmulConfig":
        """Full-cache-line tiles unless N has fewer than 8 of them per thread (then 32-column tiles)."""
        return cls(tile_vecs=4 if n >= 64 * 16 else 2)


# ----------------------------------------------------------------------------------------------------
# Build and registration
# ----------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_state: dict = {}  # "ok": bool and "why": str once available() decided
_registered: set = set()  # FFI targets registered with XLA in this process (registration is for good)


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """Where built kernels live: the ridgeline cache root (as model/weights.py resolves it) / "ffi"."""
    root = os.environ.get("RIDGELINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ridgeline")
    return Path(root) / "ffi"


def _build(compiler: str) -> Path:
    """Compiles SOURCES into one shared library (once per key) and returns its path."""
    import jaxlib

    include = Path(jax.ffi.include_dir())
    if not (include / "xla" / "ffi" / "api" / "ffi.h").is_file():
        raise RuntimeError(f"the XLA FFI headers are missing under {include}")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([*(src.read_text() for src in SOURCES + HEADERS), jaxlib.__version__, compiler,
                                    version, *_CXXFLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_qmatmul-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *_CXXFLAGS, "-isystem", str(include), *map(str, SOURCES), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def available() -> bool:
    """Builds and registers the kernel on first call; False (after one warning) if that is impossible."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        why, disabled, int8_dot = None, os.environ.get(ENV_DISABLE, "1").strip() == "0", False
        if disabled:  # asked for: no warning
            why = f"${ENV_DISABLE}=0"
        elif (compiler := _compiler()) is None:
            why = "no C++ compiler found ($CXX, c++, g++, clang++)"
        else:
            try:
                lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
                int8_dot = bool(lib.RidgelineHasInt8Dot())
                symbols = dict(_SYMBOLS, **({_INT8_DOT_TARGET: _INT8_DOT_SYMBOL} if int8_dot else {}))
                for target, symbol in symbols.items():
                    if target not in _registered:
                        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                        _registered.add(target)
            except Exception as e:  # noqa: BLE001 -- any build/load failure means "use the XLA path"
                why = f"{type(e).__name__}: {e}"
        if why is not None and not disabled:
            warnings.warn(f"ridgeline: the CPU quantized-matmul kernel is unavailable ({why}); quantized matmuls "
                          f"use the slower XLA path", RuntimeWarning, stacklevel=2)
        _state.update(ok=why is None, why=why, int8_dot=why is None and int8_dot)
        return _state["ok"]


def int8_dot_available() -> bool:
    """Whether the W8A8 kernel (cpu_int8_dot.cc: AVX-512 VNNI integer dots) is built and registered."""
    return available() and _state["int8_dot"]


def _reset_for_tests() -> None:
    """Forgets available()'s verdict so the next call decides again (compiled programs keep theirs: clear
    jax's caches too)."""
    with _lock:
        _state.clear()


# ----------------------------------------------------------------------------------------------------
# The call and its reference
# ----------------------------------------------------------------------------------------------------

def stacked_kernel_reads_in_place(qw) -> bool:
    """Whether the kernel can read one layer of this stacked weight where it lies: its scales (and int4 zeros)
    must already be float32 (a cast would copy the whole stack)."""
    return all(a is None or a.dtype == jnp.float32 for a in (qw.scales, qw.zeros))


def _ffi_matmul(x: jax.Array, qw, layer: jax.Array, rows: jax.Array, config: CpuMatmulConfig) -> jax.Array:
    """x [M, K] float32 @ layer `layer` of qw (arrays stacked [L, ...]) -> float32 [M, N], rows >= `rows` zero."""
    m = x.shape[0]
    n, g = qw.out_features, qw.group_size
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    attrs = dict(group_size=np.int64(g or 0), tile_vecs=np.int64(config.tile_vecs),
                 max_threads=np.int64(config.max_threads))
    if qw.bits == 8:
        return jax.ffi.ffi_call(_TARGETS[8], out)(x, qw.values, qw.scales, layer, rows, **attrs)
    return jax.ffi.ffi_call(_TARGETS[4], out)(x, qw.values, qw.scales, qw.zeros, layer, rows, **attrs)


def _check_operands(x: jax.Array, qw, layer: Optional[jax.Array]) -> None:
    """The checks both matmul kernels' wrappers share: the weight's arrays, a stack for a layer index, x [..., K]
    floating."""
    check_quantized_weight(qw, allow_stacked=layer is not None)
    if layer is not None and qw.values.ndim != 3:
        raise ValueError(f"a layer index needs weights stacked [L, K, N], got values.shape={tuple(qw.values.shape)}")
    if x.ndim < 1 or x.shape[-1] != qw.in_features:
        raise ValueError(f"x.shape={tuple(x.shape)} must end in in_features K={qw.in_features}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x.dtype={x.dtype} must be floating")


@functools.partial(jax.jit, static_argnames=("config",))
def cpu_quantized_matmul(x: jax.Array, qw, layer: Optional[jax.Array] = None, rows: Optional[jax.Array] = None, *,
                         config: Optional[CpuMatmulConfig] = None) -> jax.Array:
    """x [..., K] @ qw -> float32 [..., N] with the C++ kernel.

    qw: a 2-D QuantizedWeight [K, N] (layer None), or one stacked [L, K, N] with `layer` an int32 scalar:
    then that layer is read in place (see stacked_kernel_reads_in_place; otherwise it is sliced out first).
    rows: an int32 scalar, how many leading rows of x (flattened to [M, K]) are real; the others, padding
    of a compiled step shape, are not computed and come out zero. None: all.
    Raises RuntimeError when the kernel is unavailable (see available()); quantized_matmul falls back.
    """
    _check_operands(x, qw, layer)
    k, n = qw.in_features, qw.out_features
    if not available():
        raise RuntimeError(f"the CPU quantized-matmul kernel is unavailable: {_state['why']}")
    config = config or CpuMatmulConfig.get_default(n=n)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)                   # [M, K]
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), jnp.float32)
    if layer is None or not stacked_kernel_reads_in_place(qw):
        if layer is not None:
            qw = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), qw)
        # A 2-D weight is a stack of one: bitcasts, no copies.
        qw = jax.tree.map(lambda a: a[None], qw)
        qw = dataclasses.replace(qw, scales=qw.scales.astype(jnp.float32),
                                 zeros=None if qw.zeros is None else qw.zeros.astype(jnp.float32))
        layer = 0
    rows = x2.shape[0] if rows is None else rows
    return _ffi_matmul(x2, qw, jnp.asarray(layer, jnp.int32), jnp.asarray(rows, jnp.int32), config).reshape(*lead, n)


@jax.jit
def cpu_int8_dot_matmul(x: jax.Array, qw, layer: Optional[jax.Array] = None,
                        rows: Optional[jax.Array] = None) -> jax.Array:
    """W8A8: x [..., K] quantized to int8 per block of qw.act_block inputs, times the int8 weight, as integer
    dots (cpu_int8_dot.cc, AVX-512 VNNI) -> float32 [..., N]. Any M (decode and prefill).

    qw: an int8 QuantizedWeight with act_block set (per channel, or grouped with group_size = act_block), 2-D
    or stacked [L, K, N] with `layer` (read in place). rows: as cpu_quantized_matmul's.
    Raises RuntimeError when the kernel is unavailable (see int8_dot_available()).
    """
    _check_operands(x, qw, layer)
    if qw.bits != 8 or qw.act_block is None:
        raise ValueError(f"cpu_int8_dot_matmul needs int8 weights with act_block set, got bits={qw.bits}, "
                         f"act_block={qw.act_block}")
    k, n = qw.in_features, qw.out_features
    if not int8_dot_available():
        raise RuntimeError("the CPU int8-dot kernel is unavailable: "
                           + (_state["why"] or "this CPU (or compiler target) lacks AVX-512 VNNI"))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)                   # [M, K]
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), jnp.float32)
    if layer is None:
        qw, layer = jax.tree.map(lambda a: a[None], qw), 0     # a stack of one: bitcasts, no copies
    values, scales = qw.values, qw.scales                       # [L, K, N], [L, N] or [L, K/G, N]
    if scales.dtype != jnp.float32:                             # a cast copies the stack: slice first
        values = jax.lax.dynamic_index_in_dim(values, layer)
        scales = jax.lax.dynamic_index_in_dim(scales, layer).astype(jnp.float32)
        layer = 0
    scales = scales.reshape(scales.shape[0], -1)                # [L, N] or [L, K/G * N]
    rows = x2.shape[0] if rows is None else rows
    out = jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32)
    y = jax.ffi.ffi_call(_INT8_DOT_TARGET, out)(
        x2, values, scales, jnp.asarray(layer, jnp.int32), jnp.asarray(rows, jnp.int32),
        act_block=np.int64(qw.act_block), grouped=np.int64(qw.group_size is not None))
    return y.reshape(*lead, n)


def cpu_int8_dot_matmul_reference(x: jax.Array, qw) -> jax.Array:
    """Ground truth of cpu_int8_dot_matmul: the dequantized int8 activations @ dequantize(qw), float32 HIGHEST."""
    from pallas_kernels.quantized_matmul import fake_quantize_activations

    return quantized_matmul_reference(fake_quantize_activations(x, qw.act_block), qw)


@jax.jit
def cpu_dequantize(qw, layer: Optional[jax.Array] = None) -> jax.Array:
    """The float32 weight [K, N] of a grouped QuantizedWeight (Q8_0-style int8 or int4), or of layer `layer`
    of one stacked [L, K, N] (read in place), dequantized by the C++ kernel: quantized_matmul's path for M
    above MAX_ROWS, where XLA's dot does the math but XLA's own dequantize of these formats is slow."""
    check_quantized_weight(qw, allow_stacked=layer is not None)
    if qw.group_size is None:
        raise ValueError("cpu_dequantize takes grouped weights (group_size set); per-channel int8 needs none")
    if not available():
        raise RuntimeError(f"the CPU quantized-matmul kernel is unavailable: {_state['why']}")
    if layer is None:
        qw, layer = jax.tree.map(lambda a: a[None], qw), 0
    if not stacked_kernel_reads_in_place(qw):
        qw = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer).astype(
            jnp.float32 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype), qw)
        layer = 0
    out = jax.ShapeDtypeStruct((qw.in_features, qw.out_features), jnp.float32)
    arrays = (qw.values, qw.scales) if qw.bits == 8 else (qw.values, qw.scales, qw.zeros)
    return jax.ffi.ffi_call(_DEQUANT_TARGETS[qw.bits], out)(*arrays, jnp.asarray(layer, jnp.int32),
                                                            group_size=np.int64(qw.group_size))


def cpu_quantized_matmul_reference(x: jax.Array, qw) -> jax.Array:
    """Ground truth: float32 x @ dequantize(qw) at HIGHEST precision -> float32 [..., N]."""
    return quantized_matmul_reference(x, qw)
