"""ridgeline against llama.cpp on llama-batched-bench's workload, in one run, on the same GGUF file.

    python scripts/bench_vs_llamacpp.py \\
        --llama-batched-bench ~/.cache/ridgeline/llamacpp/.../build/bin/llama-batched-bench \\
        --llama-bench ~/.cache/ridgeline/llamacpp/.../build/bin/llama-bench
    python scripts/bench_vs_llamacpp.py --configs default,float32,int8 --batches 1,16  # ridgeline only

The workload (llama-batched-bench -npp 64 -ntg 32 -npl 1,4,16,64): B independent sequences of 64 random
prompt tokens, then 32 new tokens each; the time is the whole job, prefill plus decode. What each side
times:
  - llama.cpp: its own T_PP + T_TG (model forward of the batch, logits of the last tokens; it feeds
    random tokens instead of sampling, and nothing is detokenized).
  - ridgeline: `LLM.generate` of the B prompts (token ids) with greedy sampling, EOS ignored, prefix
    caching off, after one untimed run of the same job that compiled every program: scheduler, step
    programs, on-device sampling, host results and detokenized outputs. "device wait" is the part of it the
    host spent blocked on step results (the rest is host work overlapping nothing).
Both use the same thread count (`--threads`, 2 by default: ridgeline's XLA:CPU uses every core of this
process, so pin it with `taskset` on a bigger machine). `--llama-bench` adds llama-bench's pp512 / tg128.

Roofline share: the job's FLOPs (inference.roofline.step_cost: the prefill plus every decode step at its
context length) over the time, as a fraction of the float32 matmul peak measured in this process, and of the
W8A8 kernel's own rate on a large compute-bound product (the ceiling of int8-dot configurations, ~2x the f32
peak on AVX-512 VNNI), when that kernel is available.

Configurations (`--configs`, comma separated): a preset name below, or NAME:JSON with LLM keyword
arguments, e.g. `'int8-64:{"quantization": "int8", "max_num_seqs": 64}'`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# LLM keyword arguments of each preset (on top of enable_prefix_caching=False).
PRESETS = {
    "default": {},  # what LLM() picks on this backend (W8A8 on a CPU with AVX-512 VNNI)
    "float32": {"dtype": "float32"},
    "int8": {"dtype": "float32", "quantization": "int8"},
    "w8a8": {"dtype": "float32", "quantization": "w8a8"},
    "int4": {"dtype": "float32", "quantization": "int4"},
    "gguf": {"dtype": "float32", "quantization": "gguf"},
}


def parse_configs(text: str) -> list[tuple[str, dict]]:
    """'float32,int8,name:{json}' -> [(name, LLM kwargs)]. JSON objects may contain commas."""
    configs, rest = [], text.strip()
    while rest:
        name, sep, tail = re.match(r"([^,:]+)(:?)(.*)", rest).groups()
        name = name.strip()
        if sep:
            kwargs, end = json.JSONDecoder().raw_decode(tail)
            if not isinstance(kwargs, dict):
                raise ValueError(f"config {name!r}: {tail[:end]!r} must be a JSON object of LLM arguments")
            rest = tail[end:]
        else:
            if name not in PRESETS:
                raise ValueError(f"config {name!r} is not one of {sorted(PRESETS)} (or use NAME:JSON)")
            kwargs, rest = PRESETS[name], tail
        configs.append((name, dict(kwargs)))
        rest = rest.lstrip().removeprefix(",").lstrip()
    return configs


@dataclasses.dataclass
class Result:
    system: str    # "llama.cpp" or "ridgeline <config>"
    batch: int
    seconds: float
    device_wait_seconds: Optional[float] = None


# ------------------------------------------------------------------------------------------ llama.cpp
_TABLE_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6)


def parse_batched_bench(output: str) -> dict[int, float]:
    """{B: total seconds} from llama-batched-bench's output (its jsonl lines or its markdown table)."""
    totals = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{") and '"pl"' in line:
            row = json.loads(line)
            totals[int(row["pl"])] = float(row["t"])
        elif m := _TABLE_ROW.match(line):
            totals[int(m.group(3))] = float(m.group(9))  # PP, TG, B, N_KV, T_PP, S_PP, T_TG, S_TG, T, S
    return totals


def run_llama_batched_bench(binary: str, model: str, batches: Sequence[int], prompt_tokens: int,
                            new_tokens: int, threads: int) -> dict[int, float]:
    # Every sequence keeps its own prompt (no -pps); at least 512 for the tool's 16-token warm-up batch.
    ctx = max(512, max(batches) * (prompt_tokens + new_tokens))
    cmd = [binary, "-m", model, "-c", str(ctx), "-b", "2048", "-ub", "512", "-t", str(threads),
           "-npp", str(prompt_tokens), "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)),
           "--output-format", "jsonl"]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    totals = parse_batched_bench(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not totals:
        raise RuntimeError(f"llama-batched-bench failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return totals


def run_llama_bench(binary: str, model: str, threads: int) -> dict[str, float]:
    """{"pp512": tok/s, "tg128": tok/s} from llama-bench's JSON output."""
    cmd = [binary, "-m", model, "-p", "512", "-n", "128", "-t", str(threads), "-o", "json"]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    out = {}
    for test in json.loads(proc.stdout):
        name = f"pp{test['n_prompt']}" if test["n_gen"] == 0 else f"tg{test['n_gen']}"
        out[name] = float(test["avg_ts"])
    return out


# ------------------------------------------------------------------------------------------ ridgeline
def random_prompts(batch: int, prompt_tokens: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed + batch)
    return rng.integers(0, vocab_size, size=(batch, prompt_tokens)).tolist()


def run_ridgeline(name: str, kwargs: dict, model: str, batches: Sequence[int], prompt_tokens: int,
                  new_tokens: int) -> list[Result]:
    from inference.llm import LLM
    from inference.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    results = []
    with LLM(model, enable_prefix_caching=False, **kwargs) as llm:
        runner = llm.engine.runner
        for batch in batches:
            prompts = random_prompts(batch, prompt_tokens, llm.config.vocab_size)
            llm.generate(prompts, params)  # compiles every program the job uses
            wait0 = runner.device_wait_seconds
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - t0
            if any(len(o.outputs[0].token_ids) != new_tokens for o in outs):
                raise RuntimeError(f"ridgeline {name}: a sequence did not generate {new_tokens} tokens")
            results.append(Result(f"ridgeline {name}", batch, seconds, runner.device_wait_seconds - wait0))
            print(f"ridgeline {name} B={batch}: {seconds:.2f} s", flush=True)
    return results


def job_flops(model: str, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """FLOPs of the whole job: a prefill of the prompts, then new_tokens - 1 decode steps (the first new
    token comes out of the prefill)."""
    import gguf

    from inference.roofline import phase_cost
    from model.gguf_loader import config_from_metadata, read_metadata

    cfg = config_from_metadata(read_metadata(gguf.GGUFReader(model)))
    flops = phase_cost(cfg, "prefill", batch, prompt_tokens).flops
    flops += sum(phase_cost(cfg, "decode", batch, prompt_tokens + i).flops for i in range(new_tokens - 1))
    return flops


def measure_int8_dot_peak(seconds: float = 2.0) -> Optional[float]:
    """Integer-dot operations per second of the W8A8 CPU kernel (pallas_kernels/cpu_int8_dot.cc) on a large
    compute-bound product (1024 x 2048 @ 2048 x 2048), best of the calls in `seconds`; None without the kernel."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp
    import numpy as np

    from model.quantize import quantize_int8
    from pallas_kernels import cpu_quantized_matmul as cpu

    if not cpu.int8_dot_available():
        return None
    m, k, n = 1024, 2048, 2048
    rng = np.random.default_rng(0)
    qw = dc.replace(quantize_int8(rng.standard_normal((k, n), dtype=np.float32)), act_block=64)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    jax.block_until_ready(cpu.cpu_int8_dot_matmul(x, qw))
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        jax.block_until_ready(cpu.cpu_int8_dot_matmul(x, qw))
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def format_table(results: Sequence[Result], flops: dict[int, float], peak_flops: Optional[float],
                 int8_peak: Optional[float] = None) -> str:
    """Markdown: one row per (system, B) with seconds, llama.cpp / it, GFLOP/s and share of the peak (and of
    the int8-dot kernel's measured rate, when given: the ceiling of W8A8 configurations)."""
    reference = {r.batch: r.seconds for r in results if r.system == "llama.cpp"}
    extra = int8_peak is not None
    lines = ["| system | B | seconds | llama.cpp / this | device wait s | GFLOP/s | % f32 matmul peak |"
             + (" % int8-dot peak |" if extra else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if extra else "")]
    for r in sorted(results, key=lambda r: (r.batch, r.system != "llama.cpp", r.system)):
        ratio = f"{reference[r.batch] / r.seconds:.2f}x" if r.batch in reference else "–"
        wait = "–" if r.device_wait_seconds is None else f"{r.device_wait_seconds:.2f}"
        rate = flops[r.batch] / r.seconds
        share = "–" if peak_flops is None else f"{100 * rate / peak_flops:.0f}%"
        line = f"| {r.system} | {r.batch} | {r.seconds:.2f} | {ratio} | {wait} | {rate / 1e9:.0f} | {share} |"
        if extra:
            line += f" {100 * rate / int8_peak:.0f}% |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the cached default model)")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (ridgeline: this process's cores)")
    ap.add_argument("--configs", default="float32,int8", help=f"ridgeline configurations: {sorted(PRESETS)} or NAME:JSON")
    ap.add_argument("--llama-batched-bench", default=None, help="path of a llama-batched-bench binary")
    ap.add_argument("--llama-bench", default=None, help="path of a llama-bench binary (pp512 / tg128)")
    ap.add_argument("--peak-gflops", type=float, default=None,
                    help="f32 matmul peak for the roofline share (default: measured here, ~3 s; 0 = skip)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    from model.weights import resolve_model

    model = str(resolve_model(args.model))
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.new_tokens < 1 or args.prompt_tokens < 1 or not batches or min(batches) < 1:
        raise ValueError(f"--batches={args.batches!r}, --prompt-tokens={args.prompt_tokens} and "
                         f"--new-tokens={args.new_tokens} must all be positive")
    configs = parse_configs(args.configs)
    cores = len(os.sched_getaffinity(0))
    print(f"model {model}; ridgeline process cores {cores}; llama.cpp threads {args.threads}", flush=True)

    results: list[Result] = []
    llama_bench = None
    if args.llama_batched_bench:
        totals = run_llama_batched_bench(args.llama_batched_bench, model, batches, args.prompt_tokens,
                                         args.new_tokens, args.threads)
        results += [Result("llama.cpp", b, totals[b]) for b in batches]
        print("llama.cpp: " + ", ".join(f"B={b}: {totals[b]:.2f} s" for b in batches), flush=True)
    if args.llama_bench:
        llama_bench = run_llama_bench(args.llama_bench, model, args.threads)
    for name, kwargs in configs:
        results += run_ridgeline(name, kwargs, model, batches, args.prompt_tokens, args.new_tokens)

    peak = args.peak_gflops * 1e9 if args.peak_gflops else None
    if args.peak_gflops is None:
        from inference.roofline import measure_machine

        peak = measure_machine(seconds=3.0).flops_per_s
    int8_peak = measure_int8_dot_peak() if args.peak_gflops is None else None
    flops = {b: job_flops(model, b, args.prompt_tokens, args.new_tokens) for b in batches}
    print(f"\nB x {args.prompt_tokens} prompt + {args.new_tokens} new tokens, total seconds"
          + ("" if peak is None else f"; f32 matmul peak {peak / 1e9:.0f} GFLOP/s")
          + ("" if int8_peak is None else f"; int8-dot kernel {int8_peak / 1e9:.0f} GOP/s"))
    print(format_table(results, flops, peak, int8_peak))
    if llama_bench:
        print("llama-bench: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in llama_bench.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": [dataclasses.asdict(r) for r in results], "llama_bench": llama_bench,
                       "peak_flops": peak, "int8_dot_peak": int8_peak, "job_flops": flops, "threads": args.threads,
                       "cores": cores}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
