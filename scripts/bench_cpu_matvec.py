"""Decode-shaped matmuls on the CPU, side by side: float32 XLA vs quantized XLA vs the jax.ffi kernel.

    python scripts/bench_cpu_matvec.py [--rows 1] [--shapes 576x1536,1536x576,576x49152,1536x4608]
                                       [--formats int8,q8_0,q4_1] [--rounds 15] [--threads1]
                                       [--model-step [--int8-head]] [--json out.json]

For each [rows, K] @ [K, N] shape: the time of one jitted call (median over `rounds` rounds; in each round the
implementations run one after another, so a busy shared machine slows them alike) and the effective bandwidth,
the bytes each implementation must read (its stored weight: float32 4 B/weight, int8 1 B + scales, int4
0.5 B + scales and zeros) divided by that time. "speedup" is float32 XLA time / this time: what batch-1 decode
gains per weight matrix. Implementations: "f32 xla" (x @ w), "<format> xla" (quantized_matmul impl="xla":
dequantize then dot), "<format> ffi" (pallas_kernels/cpu_quantized_matmul.py; for w8a8 the int8-dot kernel), and with --threads1 the
kernel on one thread. The SmolLM2-135M projections are 576x576 (q, o), 576x192 (k, v), 576x1536 (gate, up)
and 1536x576 (down); 576x49152 is its (tied) LM head's shape.

--model-step: one decode step of the default model (batch --rows, 64 tokens of context), float32 weights
(layers unrolled, the CPU default) vs int8 weights (layer scan, the CPU default for quantized models) on the
XLA path vs on the kernel, and int8 unrolled on the kernel, all with the float (tied embedding) LM head;
--int8-head adds the kernel variants with an int8 head (quantize_params(..., quantize_lm_head=True)), and
W8A8 (quantize_params(..., "w8a8", quantize_lm_head=True): int8 activations, pallas_kernels/cpu_int8_dot.cc).
Each variant is traced with the kernel on or off and AOT-compiled, then all are timed round-robin like the
matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model.quantize import quantize_int4, quantize_int8, with_int8_activations  # noqa: E402
from pallas_kernels import cpu_quantized_matmul as cpu  # noqa: E402
from pallas_kernels.quantized_matmul import quantized_matmul  # noqa: E402

QUANTIZERS = {
    "int8": lambda w: quantize_int8(w),                    # per channel (LLM(quantization="int8"))
    "q8_0": lambda w: quantize_int8(w, group_size=32),     # GGUF Q8_0's layout
    "q4_1": lambda w: quantize_int4(w, group_size=32),     # GGUF Q4_1's layout
    "w8a8": lambda w: with_int8_activations(quantize_int8(w)),  # int8 activations too (cpu_int8_dot.cc)
}


def _time_once(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def bench_shape(rows: int, k: int, n: int, formats, rounds: int, threads1: bool, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)
    x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
    cases = [("f32 xla", jax.jit(lambda x, w: x @ w), jnp.asarray(w), 4 * k * n)]
    for fmt in formats:
        qw = jax.device_put(QUANTIZERS[fmt](w))
        cases.append((f"{fmt} xla", jax.jit(lambda x, q: quantized_matmul(x, q, impl="xla")), qw, qw.nbytes))
        if fmt == "w8a8":
            if cpu.int8_dot_available():
                cases.append((f"{fmt} ffi", jax.jit(lambda x, q: cpu.cpu_int8_dot_matmul(x, q)), qw, qw.nbytes))
        elif cpu.available():
            cases.append((f"{fmt} ffi", jax.jit(lambda x, q: cpu.cpu_quantized_matmul(x, q)), qw, qw.nbytes))
            if threads1:
                one = cpu.CpuMatmulConfig(tile_vecs=cpu.CpuMatmulConfig.get_default(n=n).tile_vecs, max_threads=1)
                cases.append((f"{fmt} ffi 1 thread",
                              jax.jit(lambda x, q: cpu.cpu_quantized_matmul(x, q, config=one)), qw, qw.nbytes))
    # Enough calls per round for ~20 ms of the slowest case, so timer resolution and dispatch don't dominate.
    for _, fn, arg, _ in cases:
        jax.block_until_ready(fn(x, arg))
    slowest = max(_time_once(fn, x, arg) for _, fn, arg, _ in cases)
    calls = max(1, min(200, int(0.02 / max(slowest, 1e-6))))
    times = {name: [] for name, *_ in cases}
    for _ in range(rounds):
        for name, fn, arg, _ in cases:
            t0 = time.perf_counter()
            for _ in range(calls):
                out = fn(x, arg)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / calls)
    f32 = statistics.median(times["f32 xla"])
    rows_out = []
    for name, _, _, nbytes in cases:
        t = statistics.median(times[name])
        rows_out.append(dict(shape=f"{rows}x{k}x{n}", impl=name, us=t * 1e6, gb_s=nbytes / t / 1e9,
                             speedup=f32 / t, weight_mb=nbytes / 1e6))
    return rows_out


def bench_model_step(batch: int, rounds: int, context: int = 64, page_size: int = 16,
                     int8_head: bool = False) -> list[dict]:
    from model.checkpoint import load_model
    from model.llama import StepInputs, forward, init_cache, unstack_layers
    from model.quantize import quantize_params

    cfg, params, _ = load_model(None)
    params = jax.device_put(params)
    int8 = jax.device_put(quantize_params(params, "int8"))
    pages = -(-(context + 1) // page_size)
    tables = np.arange(batch * pages, dtype=np.int32).reshape(batch, pages)
    pos = np.full(batch, context, np.int32)
    inputs = StepInputs(
        tokens=jnp.ones(batch, jnp.int32), positions=jnp.asarray(pos),
        slot_mapping=jnp.asarray(tables[:, context // page_size] * page_size + context % page_size),
        cu_q_lens=jnp.arange(batch + 1, dtype=jnp.int32), kv_lens=jnp.asarray(pos + 1),
        block_tables=jnp.asarray(tables), num_seqs=jnp.asarray([batch], jnp.int32),
        logits_indices=jnp.arange(batch, dtype=jnp.int32))
    variants = {"float32, unrolled": (unstack_layers(params), False), "int8, scan, xla": (int8, False),
                "int8, scan, ffi": (int8, True), "int8, unrolled, ffi": (unstack_layers(int8), True)}
    if int8_head:
        int8_h = jax.device_put(quantize_params(params, "int8", quantize_lm_head=True))
        w8a8_h = jax.device_put(quantize_params(params, "w8a8", quantize_lm_head=True))
        variants.update({"int8+head, scan, ffi": (int8_h, True),
                         "int8+head, unr., ffi": (unstack_layers(int8_h), True),
                         "w8a8+head, scan, ffi": (w8a8_h, True)})
    steps = {}
    saved = os.environ.get(cpu.ENV_DISABLE)
    try:
        for name, (p, use_kernel) in variants.items():
            os.environ[cpu.ENV_DISABLE] = "1" if use_kernel else "0"
            cpu._reset_for_tests()
            if use_kernel and not cpu.available():
                continue
            jax.clear_caches()  # quantized_matmul's trace remembers the kernel setting
            cache = init_cache(cfg, batch * pages, page_size)
            compiled = jax.jit(lambda p, c, i: forward(p, c, i, cfg), donate_argnums=(1,)).lower(
                p, cache, inputs).compile()
            state = {"cache": cache}

            def step(p=p, compiled=compiled, state=state):
                logits, state["cache"] = compiled(p, state["cache"], inputs)
                return logits

            jax.block_until_ready(step())
            steps[name] = step
    finally:
        if saved is None:
            os.environ.pop(cpu.ENV_DISABLE, None)
        else:
            os.environ[cpu.ENV_DISABLE] = saved
        cpu._reset_for_tests()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(5):
                out = step()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / 5)
    base = statistics.median(times["float32, unrolled"])
    return [dict(variant=name, batch=batch, ms=statistics.median(t) * 1e3, tok_s=batch / statistics.median(t),
                 speedup=base / statistics.median(t)) for name, t in times.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1, help="M: rows of x (the decode batch)")
    parser.add_argument("--shapes", default="576x1536,1536x576,576x49152,1536x4608", help="KxN,...")
    parser.add_argument("--formats", default="int8,q8_0,q4_1", help=f"any of {','.join(QUANTIZERS)}")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads1", action="store_true", help="also time the kernel on one thread")
    parser.add_argument("--model-step", action="store_true", help="also time the default model's decode step")
    parser.add_argument("--int8-head", action="store_true",
                        help="with --model-step: also the kernel variants with an int8 LM head")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        if f not in QUANTIZERS:
            parser.error(f"--formats: {f!r} is not one of {list(QUANTIZERS)}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
          f"ffi kernel available: {cpu.available()}")
    results = []
    print(f"{'shape':>14} {'impl':>18} {'us':>9} {'GB/s':>7} {'x f32':>6}")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        for r in bench_shape(args.rows, k, n, formats, args.rounds, args.threads1):
            print(f"{r['shape']:>14} {r['impl']:>18} {r['us']:9.1f} {r['gb_s']:7.1f} {r['speedup']:6.2f}")
            results.append(r)
    if args.model_step:
        print(f"\ndefault model, one decode step, batch {args.rows}, 64 tokens of context")
        print(f"{'variant':>22} {'ms':>8} {'tok/s':>7} {'x f32':>6}")
        for r in bench_model_step(args.rows, args.rounds, int8_head=args.int8_head):
            print(f"{r['variant']:>22} {r['ms']:8.2f} {r['tok_s']:7.1f} {r['speedup']:6.2f}")
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
