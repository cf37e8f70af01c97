"""Offline throughput of the continuous-batching engine, side by side in one run with:
  - the same prompts generated one at a time (the non-optimised single-sequence path),
  - llama.cpp (llama-cpp-python) on the same GGUF, same prompts and lengths, when installed,
  - prefix caching on vs off for prompts sharing a long system prompt.

Usage: python scripts/bench_throughput.py [--prompts 16] [--max-tokens 32] [--json out.json]
Everything is greedy with EOS ignored, so every system generates exactly the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from inference.llm import LLM  # noqa: E402
from inference.sampling_params import SamplingParams  # noqa: E402
from inference.simple import greedy_generate  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.weights import default_model_path  # noqa: E402

TOPICS = ["the ocean", "a robot", "mountains", "a city at night", "coffee", "the moon", "trains", "a library",
          "winter", "a garden", "music", "the desert", "bicycles", "a storm", "friendship", "volcanoes"]


def make_prompts(n: int) -> list[str]:
    # Mixed lengths: short questions and longer instructions.
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        if i % 3 == 0:
            out.append(f"Write a short story about {topic}.")
        elif i % 3 == 1:
            out.append(f"Explain in simple words why people like {topic}, and give three examples "
                       f"from everyday life that a child would understand.")
        else:
            out.append(f"List some facts about {topic}:")
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-llamacpp", action="store_true")
    args = ap.parse_args()

    loaded = load_model(None)
    cfg, _, tok = loaded
    prompts = make_prompts(args.prompts)
    ids = [tok.encode(p) for p in prompts]
    total_new = args.prompts * args.max_tokens
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []

    # Prefix caching off here: neither baseline reuses work across prompts (it is measured separately below),
    # and cache hits on the repeated run would change the step shapes the warm-up compiled.
    llm = LLM(_loaded=loaded, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=512,
              enable_prefix_caching=False)
    # Warm-up: compile every shape bucket the timed runs use.
    llm.generate(prompts, sp)
    outs, t_engine = timed(lambda: llm.generate(prompts, sp))
    engine_tokens = [o.token_ids for o in outs]
    rows.append(("ridgeline engine (continuous batching)", t_engine, total_new / t_engine))

    params = llm.engine.runner.params
    for p in ids:  # warm-up: every prompt length is its own prefill program on this path
        greedy_generate(params, cfg, p, args.max_tokens)
    single, t_single = timed(lambda: [greedy_generate(params, cfg, p, args.max_tokens)[0] for p in ids])
    rows.append(("ridgeline one prompt at a time", t_single, total_new / t_single))
    same = sum(a == b for a, b in zip(engine_tokens, single))

    if not args.skip_llamacpp:
        try:
            from llama_cpp import Llama
        except ImportError:
            Llama = None
        if Llama is not None:
            llama = Llama(model_path=str(default_model_path()), n_ctx=2048, n_threads=os.cpu_count(),
                          verbose=False, logits_all=False)

            def run_llamacpp():
                for p in ids:
                    llama.reset()
                    n = 0
                    for _ in llama.generate(p, temp=0.0, top_k=1, reset=True):
                        n += 1
                        if n >= args.max_tokens:
                            break

            run_llamacpp()  # warm-up
            _, t_llama = timed(run_llamacpp)
            rows.append((f"llama.cpp (llama-cpp-python, one at a time, {os.cpu_count()} threads)", t_llama,
                         total_new / t_llama))

    # Prefix caching: prompts sharing a long system prompt.
    system = ("You are a meticulous assistant. Follow the rules: answer briefly, cite sources when you can, "
              "never invent facts, prefer simple words, and format lists with dashes. ") * 6
    def shared_prompts(round_):
        return [system + f"Question {i}.{round_}: tell me about {TOPICS[(i + round_) % len(TOPICS)]}."
                for i in range(args.prompts)]

    shared = shared_prompts(2)
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prefix_rows = []
    for caching in (False, True):
        with LLM(_loaded=loaded, max_num_seqs=args.max_num_seqs, enable_prefix_caching=caching) as l2:
            for round_ in (0, 1):  # warm-up: compiles the step shapes (and, with caching, caches the system prompt)
                l2.generate(shared_prompts(round_), short)
            before = dict(l2.stats())
            _, t = timed(lambda: l2.generate(shared, short))
            after = l2.stats()
            prefix_rows.append((caching, t, after["tokens_computed"] - before["tokens_computed"],
                                after["prefix_hits"] - before["prefix_hits"]))

    print(f"\n## Offline throughput — {cfg.name}, {args.prompts} prompts x {args.max_tokens} new tokens, "
          f"greedy, CPU ({os.cpu_count()} cores)\n")
    print("| system | seconds | generated tok/s | vs one-at-a-time |")
    print("| --- | ---: | ---: | ---: |")
    for name, t, tps in rows:
        print(f"| {name} | {t:.2f} | {tps:.1f} | {t_single / t:.2f}x |")
    print(f"\nengine tokens identical to one-at-a-time for {same}/{len(ids)} prompts")
    print("\n## Prefix caching — shared system prompt "
          f"({len(tok.encode(system))} tokens), {args.prompts} requests x 4 new tokens\n")
    print("| prefix caching | seconds | prompt+decode tokens computed | pages reused |")
    print("| --- | ---: | ---: | ---: |")
    for caching, t, computed, hits in prefix_rows:
        print(f"| {'on' if caching else 'off'} | {t:.2f} | {computed} | {hits} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"throughput": rows, "prefix": prefix_rows, "identical": same}, f, indent=2)


if __name__ == "__main__":
    main()
