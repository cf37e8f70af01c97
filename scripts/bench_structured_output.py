"""Batch throughput with structured output: 16 requests of which 1 is JSON-schema constrained vs none, one run.

Usage: python scripts/bench_structured_output.py [--prompts 16] [--max-tokens 32] [--repeats 5] [--json out.json]

Every request generates exactly --max-tokens tokens (EOS ignored; the constrained one's schema asks for a string
longer than that, so its grammar never completes early), greedy, so both batches do the same work apart from the
constraint. Each configuration runs once untimed (compiles its programs), then the two alternate --repeats times and
the best wall time of each is reported, with the host time spent computing the constrained row's mask per step.
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
from model.checkpoint import load_model  # noqa: E402

TOPICS = ["the ocean", "a robot", "mountains", "a city at night", "coffee", "the moon", "trains", "a library",
          "winter", "a garden", "music", "the desert", "bicycles", "a storm", "friendship", "volcanoes"]
# minLength keeps the grammar open for the whole run, so the constrained request is as long as the others.
SCHEMA = {"type": "object",
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "story": {"type": "string", "minLength": 2000}},
          "required": ["title", "story"], "additionalProperties": False}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    prompts = [f"Write a short story about {TOPICS[i % len(TOPICS)]} as JSON:" for i in range(args.prompts)]
    plain = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, guided_json=SCHEMA)
    configs = {"none constrained": [plain] * len(prompts),
               "1 constrained": [constrained] + [plain] * (len(prompts) - 1)}

    t0 = time.perf_counter()
    with LLM(_loaded=load_model(None), max_num_seqs=args.prompts, max_num_batched_tokens=512) as llm:
        print(f"model loaded in {time.perf_counter() - t0:.1f}s", flush=True)
        for name, params in configs.items():  # compile
            outs = llm.generate(prompts, params)
            assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outs), name
        print(f"compiled in {time.perf_counter() - t0:.1f}s; constrained output: {outs[0].outputs[0].text!r}",
              flush=True)
        times = {name: [] for name in configs}
        mask_ms = []
        steps = {}
        for _ in range(args.repeats):
            for name, params in configs.items():
                engine = llm.engine
                steps_before = engine.stats["steps"]
                mask_before = (engine.structured.mask_seconds, engine.structured.mask_steps)
                start = time.perf_counter()
                llm.generate(prompts, params)
                times[name].append(time.perf_counter() - start)
                steps[name] = engine.stats["steps"] - steps_before
                if name == "1 constrained":
                    seconds = engine.structured.mask_seconds - mask_before[0]
                    mask_ms.append(1e3 * seconds / max(1, engine.structured.mask_steps - mask_before[1]))

    best = {name: min(t) for name, t in times.items()}
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    tokens = args.prompts * args.max_tokens
    rows = []
    print(f"\n{args.prompts} requests x {args.max_tokens} tokens, greedy, best of {args.repeats}")
    print(f"{'batch':<18} {'wall s':>8} {'tokens/s':>9} {'median s':>9} {'steps':>6} {'vs none':>8}")
    for name in configs:
        tps = tokens / best[name]
        rows.append({"batch": name, "seconds": best[name], "median_seconds": median[name], "tokens_per_s": tps,
                     "steps": steps[name]})
        print(f"{name:<18} {best[name]:>8.2f} {tps:>9.1f} {median[name]:>9.2f} {steps[name]:>6} "
              f"{tps / (tokens / best['none constrained']):>7.2f}x")
    mask = min(mask_ms)
    print(f"host mask computation: {mask:.3f} ms per step with a constrained row (best run; median "
          f"{sorted(mask_ms)[len(mask_ms) // 2]:.3f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "mask_ms_per_step": mask, "prompts": args.prompts,
                       "max_tokens": args.max_tokens}, f, indent=2)


if __name__ == "__main__":
    main()
