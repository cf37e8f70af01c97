"""Speculative decoding in the batching engine: tokens per target forward and end-to-end speed-up.

Side by side in one run, on the same prompts (greedy, so every configuration must produce the same
tokens; the table says whether it did):
  (a) input-grounded prompts (repeat / summarise a text given in the prompt, edit code), where
      n-gram prompt lookup should shine, and
  (b) general prompts (stories, explanations), where it has little to copy;
for no speculation, n-gram speculation, the layer-truncated self-draft, and draft models: the target's
own weights quantized to int8 / int4 (a cheaper model with the same vocabulary; sampled and greedy
requests verify exactly). With --batch-sizes the prompt sets are replaced by mixed workloads of that
many concurrent requests (e.g. 1 and 16: latency and batched throughput).

Usage:
  python scripts/bench_speculative.py                      # the default model (SmolLM2-135M-Instruct)
  python scripts/bench_speculative.py --preset smollm2-135m  # random weights at the same shapes
  python scripts/bench_speculative.py --methods none,int8 --batch-sizes 1,16 --max-tokens 32
  options: --max-tokens 64 --k 4 --draft-layers 8,30 --prompts 4 --methods none,ngram,self,int8,int4
           --json out.json
On CPU a quantized draft is not faster than the float target (XLA:CPU dequantizes slowly); its
acceptance is what carries over to an accelerator (scripts/gpu_check.py times a Llama-3.2-1B-shaped
draft against a Llama-3-8B-shaped target).
Each configuration runs its workload once untimed first, so compilation is not in the timings; the
timed runs are interleaved across configurations and the best of --repeats is reported. CPU seconds
(process time, all threads) are printed beside wall time: on a shared CPU machine they are the
steadier measure of the work saved or added.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from inference.llm import LLM  # noqa: E402
from inference.sampling_params import SamplingParams  # noqa: E402
from model.checkpoint import load_model  # noqa: E402

TEXT = ("The river town woke slowly. Fishermen pushed their boats into the grey water, the baker opened "
        "his shutters, and the old bell in the square rang seven times. Children ran to school along the "
        "stone bridge, and the market filled with the smell of bread, apples and fresh fish.")
CODE = '''def total_price(items, tax):
    total = 0
    for item in items:
        total = total + item.price * item.quantity
    total = total + total * tax
    return total
'''

GROUNDED = [
    f"Repeat the following text exactly, word for word:\n\n{TEXT}",
    f"Summarise this text in two sentences, reusing its words:\n\n{TEXT}",
    f"Rename the variable `total` to `amount` in this Python code and print the whole code:\n\n{CODE}",
    f"Add a docstring to this function and return the full code:\n\n{CODE}",
    f"Copy this text, then list every noun in it:\n\n{TEXT}",
    f"Rewrite this function to use sum() and show the complete code:\n\n{CODE}",
]
GENERAL = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a ten year old.",
    "Give me three tips for staying focused while studying.",
    "What are the main differences between cats and dogs as pets?",
    "Describe a perfect day at the beach.",
    "Why do leaves change colour in autumn?",
]


METHODS = ("none", "ngram", "self", "int8", "int4")


def configs(args):
    out = []
    for method in args.methods:
        if method == "none":
            out.append(("none", None))
        elif method == "ngram":
            out.append((f"ngram k={args.k}", {"method": "ngram", "num_speculative_tokens": args.k}))
        elif method == "self":
            out += [(f"self-draft {n}L k={args.k}", {"method": "draft", "num_speculative_tokens": args.k,
                                                      "draft_num_layers": n}) for n in args.draft_layers]
        else:  # the target's own weights quantized, all layers
            out.append((f"draft {method} k={args.k}", {"method": "draft", "quantization": method,
                                                        "num_speculative_tokens": args.k}))
    return out


def spec_counters(llm):
    st = llm.engine.spec_stats
    return (0, 0, 0, 0) if st is None else (st.num_steps, st.num_draft_tokens, st.num_accepted_tokens,
                                            st.num_output_tokens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None, help="random weights at a model.config.PRESETS shape")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per set")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--draft-layers", default=None,
                    help="comma-separated self-draft depths (default: a quarter of the layers)")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--methods", default="none,ngram,self,int8",
                    help=f"comma-separated, from {METHODS} (the first is the baseline)")
    ap.add_argument("--batch-sizes", default=None,
                    help="comma-separated concurrent request counts of a mixed workload (replaces the two sets)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (the best is kept)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods {bad} not in {METHODS}")

    cfg, params, tok = load_model(None)  # the tokenizer is needed for --preset too
    if args.preset is not None:
        from model.config import PRESETS
        from model.llama import init_params

        cfg = PRESETS[args.preset]
        params = init_params(cfg, jax.random.key(0))
    args.draft_layers = ([int(n) for n in args.draft_layers.split(",")] if args.draft_layers
                         else [max(1, cfg.num_layers // 4)])
    loaded = (cfg, params, tok)
    if args.batch_sizes:
        mixed = [p for pair in zip(GROUNDED, GENERAL) for p in pair]
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        sets = {f"mixed x{b}": [mixed[i % len(mixed)] for i in range(b)] for b in sizes}
        args.max_num_seqs = max(sizes + [args.max_num_seqs])
    else:
        sets = {"grounded": GROUNDED[:args.prompts], "general": GENERAL[:args.prompts]}
    prompts = {name: [{"messages": [{"role": "user", "content": p}]} for p in ps] for name, ps in sets.items()}
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)

    # One engine per configuration, all alive at once, so that the timed runs can be interleaved
    # (round-robin, best of --repeats): on a shared or throttling machine, drift then hits every
    # configuration alike. Prefix caching is off so the warm-up run compiles exactly the shapes
    # the timed runs use (a cache hit would change the prefill shapes).
    llms = {}
    for label, spec in configs(args):
        llms[label] = LLM(_loaded=loaded, max_num_seqs=args.max_num_seqs, speculative=spec,
                          enable_prefix_caching=False, max_model_len=2048, kv_cache_memory_bytes=256 << 20)
        for name in sets:
            llms[label].generate(prompts[name], sp)  # warm-up: compile every shape this workload uses

    results = {}  # (set, config) -> dict
    for _ in range(args.repeats):
        for name in sets:
            for label, llm in llms.items():
                c0, s0 = spec_counters(llm), llm.engine.stats["steps"]
                t0, cpu0 = time.perf_counter(), time.process_time()
                outs = llm.generate(prompts[name], sp)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                c1, s1 = spec_counters(llm), llm.engine.stats["steps"]
                row_forwards, drafted, accepted, emitted = (b - a for a, b in zip(c0, c1))
                prev = results.get((name, label))
                results[(name, label)] = {
                    "set": name, "config": label, "token_ids": [o.token_ids for o in outs],
                    "tokens": sum(len(o.token_ids) for o in outs), "engine_steps": s1 - s0,
                    "tokens_per_forward": emitted / row_forwards if row_forwards else 1.0,
                    "acceptance": accepted / drafted if drafted else None,
                    "seconds": seconds if prev is None else min(seconds, prev["seconds"]),
                    "cpu_seconds": cpu if prev is None else min(cpu, prev["cpu_seconds"]),
                }
    for llm in llms.values():
        llm.close()

    rows = []
    baseline_label = configs(args)[0][0]
    for name in sets:
        base = results[(name, baseline_label)]
        for label in llms:
            r = results[(name, label)]
            r.update(tok_per_s=r["tokens"] / r["seconds"], speedup=base["seconds"] / r["seconds"],
                     cpu_speedup=base["cpu_seconds"] / r["cpu_seconds"],
                     same_as_baseline=r["token_ids"] == base["token_ids"])
            rows.append(r)
    for r in rows:
        del r["token_ids"]

    device = jax.devices()[0]
    title = args.preset + " (random weights)" if args.preset else f"{cfg.name} (default model)"
    per_set = args.batch_sizes or args.prompts
    print(f"\n## Speculative decoding -- {title}, {per_set} prompts per set, greedy, max_tokens "
          f"{args.max_tokens}, batch <= {args.max_num_seqs}, best of {args.repeats}, "
          f"{device.platform} ({device.device_kind})\n")
    print("| prompts | speculation | tokens | engine steps | tokens / target forward | acceptance | "
          "seconds | tok/s | speed-up | CPU seconds | CPU-time speed-up | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(f"| {r['set']} | {r['config']} | {r['tokens']} | {r['engine_steps']} | {r['tokens_per_forward']:.2f} | "
              f"{acc} | {r['seconds']:.2f} | {r['tok_per_s']:.1f} | {r['speedup']:.2f}x | {r['cpu_seconds']:.2f} | "
              f"{r['cpu_speedup']:.2f}x | {'yes' if r['same_as_baseline'] else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": title, "max_tokens": args.max_tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
