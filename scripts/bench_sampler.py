"""Times the jitted sampler alone, per sampling-parameter combination (CPU-sized by default).

    python scripts/bench_sampler.py                    # S=64 rows, V=49152 (the default vocab)
    python scripts/bench_sampler.py --rows 8 --vocab 32000 --iters 20
    python scripts/bench_sampler.py --engine-step      # also: the sampler's share of the model's decode step
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python scripts/bench_sampler.py  # CPU ms, 1 thread

Logits are Zipf-like rows, -s * log(rank) over a random permutation with s drawn per row, so that
the top-p nucleus ranges from a few tokens to thousands (its size is printed, since it decides
which top-p path runs). Penalties are off: they are elementwise and not what this measures.

--engine-step runs the default model (the engine's default quantization) at --rows sequences per case and
reports its decode step (the program with this sampler inside, plus the host loop) beside the sampler
alone, and the sampler's share of the step. Steps are timed as (a 34-token job - a 2-token job) / 32, the
pair repeated --engine-repeats times with the cases interleaved (min of each), so that prefill and
admission cancel and the machine's noise is shared.

With glibc's default malloc, XLA:CPU's per-call temporaries above its mmap threshold (32 MB at
most) can be mapped afresh every call, and the page faults then show up here as CPU time;
MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000 shows the cost without them (the
engine's step no longer gains from them: BENCHMARKS.md, issue 12).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from inference.sampler import SamplingTensors, sample  # noqa: E402
from inference.sampling_params import SamplingParams  # noqa: E402

CASES = {
    "greedy": dict(temperature=0.0),
    "temperature 0.8": dict(temperature=0.8),
    "min_p 0.05": dict(temperature=0.8, min_p=0.05),
    "top_k 50": dict(temperature=0.8, top_k=50),
    "top_p 0.9": dict(temperature=0.8, top_p=0.9),
    "top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "top_k 50 + top_p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_k 1000 + top_p 0.9 + min_p 0.05": dict(temperature=0.8, top_k=1000, top_p=0.9, min_p=0.05),
    "top_k 40 + top_p 0.95 + min_p 0.05": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
}


def zipf_logits(rows: int, vocab: int, s_range: tuple[float, float], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.uniform(*s_range, size=(rows, 1))
    ranks = np.stack([rng.permutation(vocab) + 1 for _ in range(rows)])
    return (-s * np.log(ranks)).astype(np.float32)


def nucleus_sizes(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    x = np.sort(logits / temperature, axis=-1)[:, ::-1].astype(np.float64)
    p = np.exp(x - x[:, :1])
    p /= p.sum(-1, keepdims=True)
    return (np.cumsum(p, -1) - p < top_p).sum(-1)


def time_ms(fn, *args, iters: int) -> tuple[float, float]:
    """(wall, CPU) ms per call, each the minimum over `iters` calls after compiling and warming up.
    On a shared machine the CPU time (all of this process's threads) is the steadier figure."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(iters):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(1e3 * (time.perf_counter() - start_wall))
        cpu.append(1e3 * (time.process_time() - start_cpu))
    return min(wall), min(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--zipf", type=float, nargs=2, default=(1.1, 2.0), metavar=("S_MIN", "S_MAX"))
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="subset of: " + ", ".join(CASES))
    ap.add_argument("--engine-step", action="store_true", help="also time the default model's decode step per case")
    ap.add_argument("--engine-repeats", type=int, default=3)
    args = ap.parse_args()

    logits = zipf_logits(args.rows, args.vocab, tuple(args.zipf), seed=0)
    for top_p in (0.9, 0.95):
        n = nucleus_sizes(logits, 0.8, top_p)
        print(f"nucleus at T=0.8, top_p={top_p}: min {n.min()}, median {int(np.median(n))}, max {n.max()}")
    device_logits = jax.device_put(logits)
    alone = {}
    print(f"\n| case ({args.rows} rows, vocab {args.vocab}, {jax.default_backend()}) | wall ms | CPU ms |")
    print("|---|---|---|")
    for name in args.cases:
        params = [SamplingParams(seed=i, **CASES[name]) for i in range(args.rows)]
        tensors = SamplingTensors.from_params(params, steps=[0] * args.rows)
        # num_logprobs=None: what the engine runs when no request asks for logprobs.
        alone[name], cpu = time_ms(partial(sample, num_logprobs=None), device_logits, tensors, iters=args.iters)
        print(f"| {name} | {alone[name]:.1f} | {cpu:.1f} |", flush=True)
    if args.engine_step:
        steps = engine_decode_steps(args.rows, args.cases, args.engine_repeats)
        print(f"\n| case (default model, {args.rows} sequences) | decode step ms | sampler alone ms | sampler share |")
        print("|---|---:|---:|---:|")
        for name in args.cases:
            print(f"| {name} | {steps[name]:.1f} | {alone[name]:.1f} | {100 * alone[name] / steps[name]:.0f}% |")


def engine_decode_steps(rows: int, cases, repeats: int) -> dict:
    """Default model: ms per decode step at `rows` running sequences, per case (min over the repeats)."""
    from inference.llm import LLM

    prompts = [f"Write a short story about the number {i}." for i in range(rows)]
    best = {name: float("inf") for name in cases}
    with LLM(max_num_seqs=rows, max_model_len=256) as llm:
        def run(name, tokens):
            params = [SamplingParams(seed=i, max_tokens=tokens, ignore_eos=True, **CASES[name]) for i in range(rows)]
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - t0

        for name in cases:
            run(name, 34)  # compiles what the timed runs use
        for _ in range(repeats):
            for name in cases:
                best[name] = min(best[name], 1e3 * (run(name, 34) - run(name, 2)) / 32)
    return best


if __name__ == "__main__":
    main()
