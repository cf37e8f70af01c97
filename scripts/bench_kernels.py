"""Benchmarks the attention and KV-cache kernels against the device's measured peak.

On a GPU: flash attention (prefill) in TFLOP/s and ragged paged attention (decode) plus the KV
cache update in GB/s, each next to the peak measured in the same run (large bf16 matmul for
FLOP/s, large array copy for bandwidth). On CPU: the "xla" paths at moderate shapes and the
Pallas interpreter at tiny shapes (interpret timings say nothing about GPU speed; they are there
to catch pathological slowdowns).

    python scripts/bench_kernels.py                 # markdown table
    python scripts/bench_kernels.py --json out.json # plus machine-readable results
    python scripts/bench_kernels.py --quick         # fewer, smaller cases
    python scripts/bench_kernels.py --xla-decode    # CPU decode attention: this tree against a baseline
                                                    # commit, alone and in a default-model decode step
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pallas_kernels import (  # noqa: E402
    backend,
    flash_attention,
    ragged_paged_attention,
    update_kv_cache,
)


@dataclasses.dataclass
class Result:
    kernel: str
    impl: str
    shape: str
    time_ms: float
    tflops: float | None = None
    gbps: float | None = None
    percent_of_peak: float | None = None


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds per call after compiling and warming up."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# --------------------------------------------------------------------------------------------
# Peaks
# --------------------------------------------------------------------------------------------
def measure_peak_bandwidth(num_bytes: int) -> float:
    """Bytes/s of an elementwise pass over a large array (reads + writes)."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    fn = jax.jit(lambda x: x + 1.0)
    seconds = time_fn(fn, x, iters=10)
    return 2 * x.size * 4 / seconds


def measure_peak_flops(n: int, dtype) -> float:
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    seconds = time_fn(fn, a, b, iters=10)
    return 2 * n**3 / seconds


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
def bench_flash(batch, seq_len, num_heads, num_kv_heads, head_dim, dtype, impl, peak_flops, iters):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, seq_len, num_heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, seq_len, num_kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, seq_len, num_kv_heads, head_dim)), dtype)
    lens = jnp.full((batch,), seq_len, jnp.int32)
    fn = jax.jit(lambda q, k, v, lens: flash_attention(q, k, v, lens, lens, causal=True, impl=impl))
    seconds = time_fn(fn, q, k, v, lens, iters=iters)
    # Causal: half of the 2 matmuls of 2*T*T*hd flops each, per head.
    flops = 2 * 2 * batch * num_heads * seq_len * seq_len * head_dim / 2
    tflops = flops / seconds / 1e12
    return Result("flash_attention (causal prefill)", impl,
                  f"B={batch} T={seq_len} H={num_heads} KVH={num_kv_heads} hd={head_dim} {jnp.dtype(dtype).name}",
                  seconds * 1e3, tflops=tflops, percent_of_peak=100 * flops / seconds / peak_flops)


def paged_decode_inputs(num_seqs, context, num_heads, num_kv_heads, head_dim, page_size, dtype):
    rng = np.random.default_rng(0)
    pages_per_seq = math.ceil(context / page_size)
    num_pages = num_seqs * pages_per_seq
    q = jnp.asarray(rng.standard_normal((num_seqs, num_heads, head_dim)), dtype)
    k_pages = jnp.asarray(rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim)), dtype)
    block_tables = jnp.asarray(rng.permutation(num_pages).reshape(num_seqs, pages_per_seq).astype(np.int32))
    kv_lens = jnp.full((num_seqs,), context, jnp.int32)
    cu_q_lens = jnp.arange(num_seqs + 1, dtype=jnp.int32)
    return q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, jnp.array([num_seqs], jnp.int32)


def bench_paged_decode(num_seqs, context, num_heads, num_kv_heads, head_dim, page_size, dtype, impl, peak_bw,
                       iters):
    args = paged_decode_inputs(num_seqs, context, num_heads, num_kv_heads, head_dim, page_size, dtype)
    fn = jax.jit(lambda *a: ragged_paged_attention(*a, impl=impl))
    seconds = time_fn(fn, *args, iters=iters)
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * num_seqs * context * num_kv_heads * head_dim * itemsize
    io_bytes = 2 * num_seqs * num_heads * head_dim * itemsize
    gbps = (kv_bytes + io_bytes) / seconds / 1e9
    return Result("ragged_paged_attention (decode)", impl,
                  f"S={num_seqs} ctx={context} H={num_heads} KVH={num_kv_heads} hd={head_dim} ps={page_size} "
                  f"{jnp.dtype(dtype).name}",
                  seconds * 1e3, gbps=gbps, percent_of_peak=100 * gbps * 1e9 / peak_bw)


def bench_kv_update(num_tokens, num_kv_heads, num_pages, page_size, head_dim, dtype, impl, peak_bw, iters):
    rng = np.random.default_rng(0)
    k_pages = jnp.zeros((num_kv_heads, num_pages, page_size, head_dim), dtype)
    v_pages = jnp.zeros_like(k_pages)
    k_new = jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), dtype)
    v_new = jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), dtype)
    slots = jnp.asarray(rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int32))
    # Donate the cache like the engine does, so the timing is the in-place scatter, not a cache copy.
    step = jax.jit(lambda cache, k_new, v_new, slots: update_kv_cache(*cache, k_new, v_new, slots, impl=impl),
                   donate_argnums=0)
    cache = (k_pages, v_pages)
    for _ in range(2):
        cache = jax.block_until_ready(step(cache, k_new, v_new, slots))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        cache = jax.block_until_ready(step(cache, k_new, v_new, slots))
        samples.append(time.perf_counter() - start)
    seconds = statistics.median(samples)
    moved = 2 * 2 * num_tokens * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize  # read + write, K and V
    gbps = moved / seconds / 1e9
    return Result("update_kv_cache", impl,
                  f"T={num_tokens} KVH={num_kv_heads} pages={num_pages} ps={page_size} hd={head_dim} "
                  f"{jnp.dtype(dtype).name}",
                  seconds * 1e3, gbps=gbps, percent_of_peak=100 * gbps * 1e9 / peak_bw)


# --------------------------------------------------------------------------------------------
# XLA decode attention: this tree against a baseline commit
# --------------------------------------------------------------------------------------------
# The last commit before the batch-invariant chunked decode pass (issue 17).
XLA_DECODE_BASELINE = "10b8553"
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load_baseline_xla_attention(rev: str):
    """ragged_paged_attention_xla as it was at commit `rev` (read with git show, run as its own module)."""
    path = "pallas_kernels/ragged_paged_attention_xla.py"
    source = subprocess.run(["git", "-C", REPO, "show", f"{rev}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType(f"ragged_paged_attention_xla_at_{rev}")
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module.ragged_paged_attention_xla


def bench_xla_decode_attention(impls, batches, contexts, iters):
    """Decode attention alone, default-model head shapes (9 heads, 3 KV heads, hd 64, page 16), float32, a
    pool twice the batch's pages with shuffled tables; rows of ms per implementation."""
    from pallas_kernels.ragged_paged_attention_xla import ragged_paged_attention_xla
    rows = []
    for batch in batches:
        for context in contexts:
            q, k_pages, v_pages, kv_lens, tables, cu_q_lens, num_seqs = paged_decode_inputs(
                2 * batch, context, 9, 3, 64, 16, jnp.float32)
            args = (q[:batch], k_pages, v_pages, kv_lens[:batch], tables[:batch], cu_q_lens[:batch + 1],
                    jnp.array([batch], jnp.int32))
            row = {"batch": batch, "context": context}
            for name, fn in impls.items():
                jitted = jax.jit(lambda *a, fn=fn: fn(*a, sm_scale=0.125))
                row[name] = time_fn(jitted, *args, iters=iters) * 1e3
            rows.append(row)
    return rows


def bench_xla_decode_model_step(impls, batch, context, rounds):
    """ms per decode step of the default model (float32 weights, layers unrolled as on CPU), at `batch`
    sequences each at `context` tokens, for each attention implementation (patched in before tracing)."""
    from model.checkpoint import load_model
    from model.llama import StepInputs, forward, init_cache, unstack_layers
    rpa_module = importlib.import_module("pallas_kernels.ragged_paged_attention")

    cfg, params, _ = load_model(None)
    params = jax.device_put(unstack_layers(params))
    page_size = 16
    pages = -(-(context + 1) // page_size)
    tables = np.arange(batch * pages, dtype=np.int32).reshape(batch, pages)
    pos = np.full(batch, context, np.int32)
    inputs = StepInputs(
        tokens=jnp.ones(batch, jnp.int32), positions=jnp.asarray(pos),
        slot_mapping=jnp.asarray(tables[:, context // page_size] * page_size + context % page_size),
        cu_q_lens=jnp.arange(batch + 1, dtype=jnp.int32), kv_lens=jnp.asarray(pos + 1),
        block_tables=jnp.asarray(tables), num_seqs=jnp.asarray([batch], jnp.int32),
        logits_indices=jnp.arange(batch, dtype=jnp.int32))
    original = rpa_module.ragged_paged_attention_xla
    steps = {}
    try:
        for name, fn in impls.items():
            rpa_module.ragged_paged_attention_xla = fn
            jax.clear_caches()  # the attention wrapper's jit cache would keep the previous implementation
            # A pool twice the batch's pages, donated as the engine does.
            cache = init_cache(cfg, 2 * batch * pages, page_size)
            compiled = jax.jit(lambda p, c, i: forward(p, c, i, cfg, attn_impl="xla"),
                               donate_argnums=(1,)).lower(params, cache, inputs).compile()
            state = {"cache": cache}

            def step(compiled=compiled, state=state):
                logits, state["cache"] = compiled(params, state["cache"], inputs)
                return logits

            jax.block_until_ready(step())
            steps[name] = step
    finally:
        rpa_module.ragged_paged_attention_xla = original
    times = {name: [] for name in steps}
    for _ in range(rounds):  # interleaved, so load changes hit every implementation alike
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run_xla_decode(baseline: str, iters: int, rounds: int):
    from pallas_kernels.ragged_paged_attention_xla import ragged_paged_attention_xla
    impls = {f"baseline {baseline}": load_baseline_xla_attention(baseline), "this tree": ragged_paged_attention_xla}
    names = list(impls)
    print(f"## XLA decode attention alone (H=9 KVH=3 hd=64 page 16, float32), ms, median of {iters}\n")
    print(f"| B | context | {names[0]} | {names[1]} | speedup |\n|---:|---:|---:|---:|---:|")
    for row in bench_xla_decode_attention(impls, (16, 64), (80, 512), iters):
        print(f"| {row['batch']} | {row['context']} | {row[names[0]]:.2f} | {row[names[1]]:.2f} | "
              f"{row[names[0]] / row[names[1]]:.2f}x |")
    print(f"\n## Default-model decode step (SmolLM2-135M float32, B=64), ms, median of {rounds}\n")
    print(f"| context | {names[0]} | {names[1]} | speedup |\n|---:|---:|---:|---:|")
    for context in (80, 512):
        ms = bench_xla_decode_model_step(impls, 64, context, rounds)
        print(f"| {context} | {ms[names[0]]:.1f} | {ms[names[1]]:.1f} | {ms[names[0]] / ms[names[1]]:.2f}x |")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def format_table(results: list[Result]) -> str:
    lines = ["| kernel | impl | shape | time (ms) | TFLOP/s | GB/s | % of peak |",
             "|---|---|---|---:|---:|---:|---:|"]
    fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
    for r in results:
        lines.append(f"| {r.kernel} | {r.impl} | {r.shape} | {r.time_ms:.3f} | {fmt(r.tflops, '.3f')} | "
                     f"{fmt(r.gbps, '.1f')} | {fmt(r.percent_of_peak, '.1f')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results (and peaks) to this JSON file")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per case")
    parser.add_argument("--no-interpret", action="store_true", help="on CPU, skip the tiny interpret-mode cases")
    parser.add_argument("--xla-decode", action="store_true",
                        help="only the CPU decode-attention comparison against --baseline")
    parser.add_argument("--baseline", default=XLA_DECODE_BASELINE,
                        help=f"commit whose XLA attention --xla-decode compares against ({XLA_DECODE_BASELINE})")
    args = parser.parse_args(argv)
    if args.xla_decode:
        run_xla_decode(args.baseline, iters=args.iters or 10, rounds=args.iters or 10)
        return

    on_gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    print(f"# device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if on_gpu:
        print(f"# pallas lowering: {backend.resolve_lowering()} (${backend.LOWERING_ENV_VAR})")

    if on_gpu:
        peak_bw = measure_peak_bandwidth(1 << 30)
        peak_dtype = jnp.bfloat16
        peak_flops = measure_peak_flops(8192, peak_dtype)
        iters = args.iters or 20
    else:
        peak_bw = measure_peak_bandwidth(1 << 27)
        peak_dtype = jnp.float32  # the CPU xla paths compute in float32
        peak_flops = measure_peak_flops(1024, peak_dtype)
        iters = args.iters or 3
    print(f"# measured peak: {peak_bw / 1e9:.1f} GB/s (copy), "
          f"{peak_flops / 1e12:.3f} TFLOP/s ({jnp.dtype(peak_dtype).name} matmul)\n")

    results: list[Result] = []
    if on_gpu:
        dtype = jnp.bfloat16
        flash_cases = [(1, 4096, 32, 8, 128), (4, 2048, 32, 8, 128), (8, 1024, 9, 3, 64)]
        decode_cases = [(64, 2048, 32, 8, 128, 16), (128, 1024, 32, 8, 128, 16), (32, 4096, 9, 3, 64, 64)]
        update_cases = [(256, 8, 8192, 16, 128)]
        if args.quick:
            flash_cases, decode_cases = flash_cases[:1], decode_cases[:1]
        for case in flash_cases:
            results.append(bench_flash(*case, dtype, "pallas", peak_flops, iters))
            results.append(bench_flash(*case, dtype, "xla", peak_flops, iters))
        for case in decode_cases:
            results.append(bench_paged_decode(*case, dtype, "pallas", peak_bw, iters))
            results.append(bench_paged_decode(*case, dtype, "xla", peak_bw, iters))
        for case in update_cases:
            results.append(bench_kv_update(*case, dtype, "pallas", peak_bw, iters))
            results.append(bench_kv_update(*case, dtype, "xla", peak_bw, iters))
    else:
        dtype = jnp.float32
        flash_cases = [(1, 512, 9, 3, 64), (1, 1024, 8, 2, 64)]
        decode_cases = [(16, 1024, 9, 3, 64, 16), (64, 512, 8, 2, 64, 16)]
        if args.quick:
            flash_cases, decode_cases = flash_cases[:1], decode_cases[:1]
        for case in flash_cases:
            results.append(bench_flash(*case, dtype, "xla", peak_flops, iters))
        for case in decode_cases:
            results.append(bench_paged_decode(*case, dtype, "xla", peak_bw, iters))
        results.append(bench_kv_update(64, 2, 1024, 16, 64, dtype, "xla", peak_bw, iters))
        if not args.no_interpret:
            results.append(bench_flash(1, 64, 2, 1, 16, dtype, "pallas_interpret", peak_flops, 1))
            results.append(bench_paged_decode(4, 64, 2, 1, 16, 8, dtype, "pallas_interpret", peak_bw, 1))
            results.append(bench_kv_update(8, 1, 16, 8, 16, dtype, "pallas_interpret", peak_bw, 1))

    print(format_table(results))
    if not on_gpu:
        print("\n(CPU: caches and other processes make '% of peak' approximate; small working sets can exceed "
              "the measured copy bandwidth. Interpret-mode rows only guard against pathological slowdowns.)")
    if args.json:
        payload = {
            "device": device.device_kind,
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "pallas_lowering": backend.resolve_lowering() if on_gpu else None,
            "peak_bandwidth_gbps": peak_bw / 1e9,
            "peak_tflops": peak_flops / 1e12,
            "peak_flops_dtype": jnp.dtype(peak_dtype).name,
            "results": [dataclasses.asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
