"""Compiles every Pallas kernel for an H100 (sm_90) on a machine without a GPU and checks its shape.

Each case calls a public kernel wrapper with ``impl="pallas"`` on ``jax.ShapeDtypeStruct`` inputs (nothing
is allocated), lowers it for CUDA under an abstract H100 device, captures the Triton IR of every
``pallas_call`` as the Pallas Triton lowering builds it, compiles that IR for sm_90 with pip ``triton``
(the launch's own num_warps / num_stages), and reads registers and spill bytes from ``ptxas -v``, shared
memory from the compiled kernel's metadata and the tensor-core path from the PTX (``wgmma.mma_async`` is
Hopper's warpgroup MMA; ``mma.sync`` the older per-warp one).

A case FAILS when it spills registers (every case computes in bf16), needs more than 227 KB of shared
memory, is a prefill / flash / M>=64 matmul case whose dots do not use wgmma, or launches too few programs
to fill the GPU: batch-1 decode at 8k context must launch >= 264 programs (2 per SM on 132 SMs) or, with
few KV heads, num_kv_heads * 8192 / 128 (blocks of ~128 tokens); a decode-shaped quantized matmul
(M <= 64) must launch >= 264. Lowering or compile errors fail the case too. A case that launches several
kernels (e.g. split-K attention plus a combine kernel) gets one row per kernel (``name#i``); wgmma and the
program count are judged over the case (any kernel's wgmma, the largest launch).

XLA compiles the IR with its own bundled Triton on a real GPU, so pip triton is a proxy: a good one for
shared-memory overflow, spills and wgmma selection, not for speed.

    PYTHONPATH=. python scripts/check_gpu_kernels.py                # the whole matrix, one row per case
    PYTHONPATH=. python scripts/check_gpu_kernels.py --only ragged  # cases whose name contains "ragged"
    PYTHONPATH=. python scripts/check_gpu_kernels.py --list         # case names only
    PYTHONPATH=. python scripts/check_gpu_kernels.py --json out.json

Exit status: 0 all cases pass, 1 some case fails (each is named), 77 the check cannot run here (no pip
triton, or JAX's private Triton lowering functions moved).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

EXIT_CANNOT_CHECK = 77  # the automake convention for "skipped"
SMEM_LIMIT_BYTES = 227 * 1024  # H100 / H200 opt-in shared memory per block
SM_COUNT = 132  # H100 SXM
MIN_PROGRAMS = 2 * SM_COUNT
DECODE_SPLIT_TOKENS = 128  # the smallest KV block worth its own program at long context
TARGET_ARCH = 90


class CannotCheck(RuntimeError):
    """The check cannot run in this environment (reported with exit status 77)."""


# ----------------------------------------------------------------------------------------------------
# The production shape matrix
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


MODELS = (
    Model("llama3-8b", 32, 8, 128),
    Model("llama3-70b-tp8", 8, 1, 128),  # one device's share of Llama-3-70B at tensor parallel 8
    Model("smollm2", 9, 3, 64),
)
KV_DTYPES = ("bf16", "int8")
PAGE_SIZES = (16, 64)
LONG_CONTEXT = 8192
QMM_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N): attention out, MLP up, MLP down
QMM_FORMATS = (("int8", 8, None), ("int8-g32", 8, 32), ("int4-g32", 4, 32))
QMM_ROWS = (1, 16, 64, 512)


@dataclasses.dataclass
class Case:
    name: str
    family: str  # the kernel module: ragged_paged_attention, flash_attention, kv_cache_update, quantized_matmul
    build: Callable[[], tuple]  # -> (function, args, donate_argnums); built lazily (imports jax)
    needs_wgmma: bool = False
    min_programs: Optional[int] = None
    # Mosaic GPU kernels compile to PTX only inside the CUDA plugin: their check is that lowering succeeds
    # (Mosaic rejects shared-memory overflow and bad layouts there) and emits the mosaic_gpu custom call.
    mosaic: bool = False


def _sds(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _paged_pool(model: Model, kv_dtype: str, page_size: int, max_seqs: int, context: int):
    """K/V pages (+ scales for int8) sized so every sequence slot can hold `context` tokens."""
    import jax.numpy as jnp

    pages_per_seq = math.ceil(context / page_size)
    num_pages = max_seqs * pages_per_seq
    shape = (model.num_kv_heads, num_pages, page_size, model.head_dim)
    dtype = jnp.int8 if kv_dtype == "int8" else jnp.bfloat16
    pages = (_sds(shape, dtype), _sds(shape, dtype))
    scales = None
    if kv_dtype == "int8":
        scales = (_sds(shape[:3], jnp.float32), _sds(shape[:3], jnp.float32))
    return pages, scales, pages_per_seq


def _ragged_case(model: Model, kv_dtype: str, page_size: int, step: str, max_seqs: int, num_tokens: int,
                 context: int):
    def build():
        import jax.numpy as jnp
        from pallas_kernels import ragged_paged_attention

        (k_pages, v_pages), scales, pages_per_seq = _paged_pool(model, kv_dtype, page_size, max_seqs, context)
        i32 = jnp.int32
        args = [_sds((num_tokens, model.num_heads, model.head_dim), jnp.bfloat16), k_pages, v_pages,
                _sds((max_seqs,), i32), _sds((max_seqs, pages_per_seq), i32), _sds((max_seqs + 1,), i32),
                _sds((1,), i32)]
        if scales is None:
            fn = lambda *a: ragged_paged_attention(*a, impl="pallas", lowering="triton")  # noqa: E731
        else:
            args += list(scales)
            fn = lambda *a: ragged_paged_attention(*a[:7], k_scales=a[7], v_scales=a[8],  # noqa: E731
                                                   impl="pallas", lowering="triton")
        return fn, tuple(args), ()

    min_programs = None
    if step == "decode" and max_seqs == 1 and context == LONG_CONTEXT:
        min_programs = min(MIN_PROGRAMS, model.num_kv_heads * (context // DECODE_SPLIT_TOKENS))
    return Case(f"ragged/{model.name}/{kv_dtype}/ps{page_size}/{step}-b{max_seqs}-ctx{context}",
                "ragged_paged_attention", build, needs_wgmma=step == "mixed", min_programs=min_programs)


def _kv_update_case(model: Model, kv_dtype: str, page_size: int, step: str, num_tokens: int):
    def build():
        import jax.numpy as jnp
        from pallas_kernels import update_kv_cache

        (k_pages, v_pages), scales, _ = _paged_pool(model, kv_dtype, page_size, 64, LONG_CONTEXT)
        new = _sds((num_tokens, model.num_kv_heads, model.head_dim), jnp.bfloat16)
        args = [k_pages, v_pages, new, new, _sds((num_tokens,), jnp.int32)]
        if scales is None:
            return (lambda *a: update_kv_cache(*a, impl="pallas", lowering="triton"), tuple(args), (0, 1))
        fn = lambda *a: update_kv_cache(*a[:5], impl="pallas", lowering="triton",  # noqa: E731
                                        k_scales=a[5], v_scales=a[6])
        return fn, tuple(args + list(scales)), (0, 1, 5, 6)

    return Case(f"kv_update/{model.name}/{kv_dtype}/ps{page_size}/{step}-t{num_tokens}", "kv_cache_update", build)


def _flash_case(model: Model, length: int, lowering: str = "triton"):
    def build():
        import jax.numpy as jnp
        from pallas_kernels import flash_attention

        q = _sds((1, length, model.num_heads, model.head_dim), jnp.bfloat16)
        kv = _sds((1, length, model.num_kv_heads, model.head_dim), jnp.bfloat16)
        lens = _sds((1,), jnp.int32)
        fn = lambda *a: flash_attention(*a, impl="pallas", lowering=lowering)  # noqa: E731
        return fn, (q, kv, kv, lens, lens), ()

    family = "flash" if lowering == "triton" else f"flash-{lowering}"
    return Case(f"{family}/{model.name}/prefill-{length // 1024}k", "flash_attention", build,
                needs_wgmma=lowering == "triton", mosaic=lowering == "mosaic")


def _qmm_case(fmt: str, bits: int, group_size: Optional[int], k: int, n: int, m: int):
    def build():
        import jax.numpy as jnp
        from model.quantize import QuantizedWeight
        from pallas_kernels.quantized_matmul import quantized_matmul

        if bits == 8:
            values = _sds((k, n), jnp.int8)
            scales = _sds((n,) if group_size is None else (k // group_size, n), jnp.float32)
            zeros = None
        else:
            values = _sds((k // 2, n), jnp.uint8)
            scales = zeros = _sds((k // group_size, n), jnp.float32)
        qw = QuantizedWeight(values, scales, zeros, bits, group_size, k, n)
        fn = lambda x, w: quantized_matmul(x, w, impl="pallas")  # noqa: E731
        return fn, (_sds((m, k), jnp.bfloat16), qw), ()

    return Case(f"qmm/{fmt}/K{k}xN{n}/M{m}", "quantized_matmul", build, needs_wgmma=m >= 64,
                min_programs=MIN_PROGRAMS if m <= 64 else None)


def build_cases() -> list[Case]:
    cases = []
    for model in MODELS:
        for kv_dtype in KV_DTYPES:
            for page_size in PAGE_SIZES:
                for batch in (1, 64):
                    for context in (512, LONG_CONTEXT):
                        cases.append(_ragged_case(model, kv_dtype, page_size, "decode", batch, batch, context))
                # One 512-token prefill chunk beside 63 decoding sequences.
                cases.append(_ragged_case(model, kv_dtype, page_size, "mixed", 64, 512 + 63, LONG_CONTEXT))
                # Speculative verify with k=4 drafts: 5 query tokens per sequence.
                cases.append(_ragged_case(model, kv_dtype, page_size, "verify-k4", 16, 16 * 5, LONG_CONTEXT))
                cases.append(_kv_update_case(model, kv_dtype, page_size, "decode", 64))
                cases.append(_kv_update_case(model, kv_dtype, page_size, "prefill", 512))
    for model in MODELS:
        for length in (2048, 8192):
            cases.append(_flash_case(model, length))
            cases.append(_flash_case(model, length, lowering="mosaic"))
    for fmt, bits, group_size in QMM_FORMATS:
        for k, n in QMM_SHAPES:
            for m in QMM_ROWS:
                cases.append(_qmm_case(fmt, bits, group_size, k, n, m))
    return cases


# ----------------------------------------------------------------------------------------------------
# Lowering with the Triton IR captured
# ----------------------------------------------------------------------------------------------------

class TritonCapture:
    """Records every Triton module the Pallas Triton lowering builds, with its launch grid and parameters.

    Hooks private JAX functions: ``jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`` (the IR
    and grid) and the pallas_call lowering rule registered for ``pltriton.CompilerParams`` (num_warps and
    num_stages). Raises CannotCheck if either moved.
    """

    def __init__(self):
        try:
            from jax._src.pallas import core as pallas_core
            from jax._src.pallas.triton import core as triton_core
            from jax._src.pallas.triton import lowering as triton_lowering
            from jax._src.pallas.triton import pallas_call_registration  # noqa: F401  (registers the rule)

            self._lowering = triton_lowering
            self._build_module = triton_lowering.lower_jaxpr_to_triton_module
            self._rules = pallas_core._backend_lowering_rules
            self._params_cls = triton_core.CompilerParams
            self._rule, self._platform = self._rules[self._params_cls]
        except (ImportError, AttributeError, KeyError) as error:
            raise CannotCheck(f"JAX's private Pallas Triton lowering moved ({type(error).__name__}: {error}); "
                              f"update TritonCapture in scripts/check_gpu_kernels.py") from error
        self.kernels: list[dict[str, Any]] = []
        self.broken: Optional[str] = None  # set when the hooked function's result no longer has our fields

    def __enter__(self):
        def build_module(*args, **kwargs):
            result = self._build_module(*args, **kwargs)
            try:
                self.kernels.append(dict(ir=result.module.operation.get_asm(enable_debug_info=False),
                                         grid=[int(g) for g in result.grid]))
            except (AttributeError, TypeError) as error:
                self.broken = (f"lower_jaxpr_to_triton_module's result changed ({type(error).__name__}: {error}); "
                               f"update TritonCapture in scripts/check_gpu_kernels.py")
            return result

        def lowering_rule(ctx, *in_nodes, **params):
            first = len(self.kernels)
            out = self._rule(ctx, *in_nodes, **params)
            compiler_params = params.get("compiler_params")
            num_warps = getattr(compiler_params, "num_warps", None)
            num_stages = getattr(compiler_params, "num_stages", None)
            for kernel in self.kernels[first:]:
                # JAX's own defaults for a CUDA launch when the params leave them out.
                kernel.update(name=params.get("name"), num_warps=4 if num_warps is None else int(num_warps),
                              num_stages=3 if num_stages is None else int(num_stages))
            return out

        self._lowering.lower_jaxpr_to_triton_module = build_module
        self._rules[self._params_cls] = (lowering_rule, self._platform)
        return self

    def __exit__(self, *exc):
        self._lowering.lower_jaxpr_to_triton_module = self._build_module
        self._rules[self._params_cls] = (self._rule, self._platform)
        return False


def _abstract_cuda_device():
    """backend.abstract_cuda_device, or nothing for a checkout that predates it (JAX 0.10 needs none)."""
    from pallas_kernels import backend

    helper = getattr(backend, "abstract_cuda_device", None)
    return contextlib.nullcontext() if helper is None else helper()


def lower_case(case: Case, capture: TritonCapture) -> list[dict[str, Any]]:
    """Lowers one case for CUDA; returns the Triton kernels it launches (IR, grid, warps, stages)."""
    import jax

    fn, args, donate = case.build()
    jax.clear_caches()  # a cached lowering would skip the hooks
    first = len(capture.kernels)
    with _abstract_cuda_device():
        jax.jit(fn, donate_argnums=donate).trace(*args).lower(lowering_platforms=("cuda",))
    kernels = capture.kernels[first:]
    if not kernels:
        raise RuntimeError("lowering produced no Triton kernel (not a Pallas Triton path?)")
    return kernels


# ----------------------------------------------------------------------------------------------------
# Compiling for sm_90 (runs in worker processes: imports triton, never jax)
# ----------------------------------------------------------------------------------------------------

def _ptxas_path() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


def check_triton_available() -> str:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as error:
        raise CannotCheck(f"pip triton is not installed ({error}); pip install 'triton==3.6.0' "
                          f"(the project's test extra)") from error
    if not os.path.exists(_ptxas_path()):
        raise CannotCheck(f"triton {triton.__version__} ships no ptxas at {_ptxas_path()}")
    return triton.__version__


def compile_for_sm90(ir: str, num_warps: int, num_stages: int) -> dict[str, Any]:
    """Triton IR text -> shared memory, registers, spills and MMA instruction counts on sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        ir_path = os.path.join(tmp, "kernel.ttir")
        with open(ir_path, "w") as f:
            f.write(ir)
        kernel = triton.compile(ir_path, target=GPUTarget("cuda", TARGET_ARCH, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = kernel.asm["ptx"]
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        report = subprocess.run([_ptxas_path(), "-v", f"-arch=sm_{TARGET_ARCH}a", ptx_path, "-o",
                                 os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if report.returncode:
        raise RuntimeError(f"ptxas failed: {report.stderr.strip()[-500:]}")
    registers = re.search(r"Used (\d+) registers", report.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report.stderr)
    if registers is None or spills is None:
        raise RuntimeError(f"could not parse ptxas -v output: {report.stderr.strip()[-500:]}")
    return dict(smem_bytes=int(kernel.metadata.shared), registers=int(registers.group(1)),
                spill_store_bytes=int(spills.group(1)), spill_load_bytes=int(spills.group(2)),
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"))


def _compile_job(ir: str, num_warps: int, num_stages: int) -> dict[str, Any]:
    try:
        return compile_for_sm90(ir, num_warps, num_stages)
    except Exception as error:  # reported per case, never fatal for the run
        return dict(error=f"compile failed: {type(error).__name__}: {str(error).strip()[:400]}")


# ----------------------------------------------------------------------------------------------------
# Criteria and report
# ----------------------------------------------------------------------------------------------------

def judge(case: Case, kernels: list[dict[str, Any]]) -> None:
    """Sets "reasons" and "passed" on each compiled kernel of one case.

    Spills and shared memory are judged per kernel; wgmma and the program count per case, so a case that
    launches a second, small kernel (e.g. a split-K combine) is judged by its main one: the wgmma
    criterion by any kernel's wgmma, the program count by the largest launch.
    """
    for kernel in kernels:
        kernel["reasons"] = [kernel["error"]] if "error" in kernel else []
    compiled = [k for k in kernels if "error" not in k]
    for kernel in compiled:
        if kernel["spill_store_bytes"] + kernel["spill_load_bytes"]:
            kernel["reasons"].append(f"spills {kernel['spill_store_bytes']} B stores / "
                                     f"{kernel['spill_load_bytes']} B loads")
        if kernel["smem_bytes"] > SMEM_LIMIT_BYTES:
            kernel["reasons"].append(f"smem {kernel['smem_bytes'] / 1024:.0f} KB > {SMEM_LIMIT_BYTES // 1024} KB")
    if compiled and case.needs_wgmma and not any(k["wgmma"] for k in compiled):
        dot_kernel = max(compiled, key=lambda k: k["mma_sync"])
        dot_kernel["reasons"].append(f"no wgmma ({dot_kernel['mma_sync']} mma.sync)")
    if compiled and case.min_programs is not None:
        largest = max(compiled, key=lambda k: k["programs"])
        if largest["programs"] < case.min_programs:
            largest["reasons"].append(f"{largest['programs']} programs < {case.min_programs}")
    for kernel in kernels:
        kernel["passed"] = not kernel["reasons"]


def lower_mosaic_case(case: Case) -> dict[str, Any]:
    """Lowers a Mosaic GPU case for CUDA: a result row that passes when the mosaic_gpu custom call came out."""
    import jax

    fn, args, donate = case.build()
    result = dict(case=case.name, family=case.family, kernel="mosaic_gpu", reasons=[])
    try:
        with _abstract_cuda_device():
            text = jax.jit(fn, donate_argnums=donate).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        if "mosaic_gpu" not in text:
            result["reasons"].append("lowering emitted no mosaic_gpu custom call")
    except Exception as error:  # shared-memory overflow and layout errors surface here
        result["reasons"].append(f"lowering failed: {type(error).__name__}: {str(error).strip()[:400]}")
    result["passed"] = not result["reasons"]
    return result


def _row(result: dict[str, Any]) -> list[str]:
    if result.get("kernel") == "mosaic_gpu":
        return [result["case"], "-", "-", "-", "-", "-", "-", "-",
                "PASS (lowered; Mosaic checks smem/layouts)" if result["passed"]
                else "FAIL: " + "; ".join(result["reasons"])]
    if "smem_bytes" not in result:
        return [result["case"], str(result.get("programs", "-")), "-", "-", "-", "-", "-", "-",
                "FAIL: " + "; ".join(result["reasons"])]
    grid = "x".join(str(g) for g in result["grid"] if g > 1) or "1"
    return [result["case"], f"{result['programs']} ({grid})", f"{result['smem_bytes'] / 1024:.0f}",
            str(result["registers"]), str(result["spill_store_bytes"] + result["spill_load_bytes"]),
            str(result["wgmma"]), str(result["mma_sync"]), f"{result['num_warps']}/{result['num_stages']}",
            "PASS" if result["passed"] else "FAIL: " + "; ".join(result["reasons"])]


def print_table(results: list[dict[str, Any]]) -> None:
    header = ["case", "programs", "smem KB", "regs", "spill B", "wgmma", "mma.sync", "warps/stages", "result"]
    rows = [header] + [_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " | " + row[-1] + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|---|")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run the cases whose name contains SUBSTRING (repeatable: any of them)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    args = parser.parse_args(argv)

    cases = [c for c in build_cases() if not args.only or any(s in c.name for s in args.only)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not cases:
        print(f"no case matches --only {args.only}", file=sys.stderr)
        return 1
    try:
        triton_version = check_triton_available()
        capture = TritonCapture()
    except CannotCheck as error:
        print(f"SKIP: {error}", file=sys.stderr)
        return EXIT_CANNOT_CHECK

    import jax
    import pallas_kernels

    print(f"# jax {jax.__version__}, triton {triton_version}, sm_{TARGET_ARCH}a, "
          f"kernels from {os.path.dirname(pallas_kernels.__file__)}", flush=True)
    start = time.time()
    results: list[dict[str, Any]] = []
    compiled: dict[tuple, concurrent.futures.Future] = {}  # identical IR and launch params compile once
    # spawn, not fork: the parent has JAX's threads running.
    with concurrent.futures.ProcessPoolExecutor(max(1, args.workers),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = []
        with capture:
            for case in cases:
                if case.mosaic:
                    results.append(lower_mosaic_case(case))
                    continue
                try:
                    kernels = lower_case(case, capture)
                except Exception as error:
                    if capture.broken:
                        print(f"SKIP: {capture.broken}", file=sys.stderr)
                        pool.shutdown(cancel_futures=True)
                        return EXIT_CANNOT_CHECK
                    results.append(dict(case=case.name, family=case.family, passed=False,
                                        reasons=[f"lowering failed: {type(error).__name__}: "
                                                 f"{str(error).strip()[:400]}"]))
                    continue
                for i, kernel in enumerate(kernels):
                    key = (kernel["ir"], kernel["num_warps"], kernel["num_stages"])
                    if key not in compiled:
                        compiled[key] = pool.submit(_compile_job, *key)
                    name = case.name if len(kernels) == 1 else f"{case.name}#{i}"
                    pending.append((case, name, kernel, compiled[key]))
        by_case: dict[str, list[dict[str, Any]]] = {}
        for case, name, kernel, future in pending:
            info = dict(case=name, family=case.family, kernel=kernel["name"], grid=kernel["grid"],
                        programs=math.prod(kernel["grid"]), num_warps=kernel["num_warps"],
                        num_stages=kernel["num_stages"], **future.result())
            by_case.setdefault(case.name, []).append(info)
        for case in cases:
            if not case.mosaic:
                judge(case, by_case.get(case.name, []))
                results.extend(by_case.get(case.name, []))
    results.sort(key=lambda r: [c.name for c in cases].index(r["case"].split("#")[0]))

    print_table(results)
    failed = [r["case"] for r in results if not r["passed"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} cases pass ({len(compiled)} distinct kernels compiled, "
          f"{time.time() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(jax=jax.__version__, triton=triton_version, arch=f"sm_{TARGET_ARCH}a",
                           smem_limit_bytes=SMEM_LIMIT_BYTES, min_programs=MIN_PROGRAMS, results=results), f, indent=1)
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        import pallas_kernels  # noqa: F401  (from PYTHONPATH / the installed package first)
    except ImportError:  # run from a checkout without PYTHONPATH=.
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
