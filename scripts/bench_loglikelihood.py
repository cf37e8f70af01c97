"""Multiple-choice loglikelihood: the packed scorer (inference.scoring.score_tokens) given every
(context, choice) pair at once -- through the lm-eval backend's `score_continuations` and through `LLM.score`
of the whole texts -- vs one text per call (what `LLM.score` did before it batched).

Synthetic questions with a long shared context and short answers, as in MMLU/HellaSwag-style tasks. Both
paths run once to compile, then are timed; the results are checked equal before any time is reported.

    python scripts/bench_loglikelihood.py                         # 16 questions x 4 choices, ~100-token contexts
    python scripts/bench_loglikelihood.py --questions 64 --model PATH --attn-impl pallas
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--attn-impl", default="auto")
    args = ap.parse_args(argv)

    from inference.llm import LLM
    from inference.scoring import score_continuations, token_logprobs

    llm = LLM(args.model, attn_impl=args.attn_impl, max_num_seqs=8, max_num_batched_tokens=256)
    enc = llm.tokenizer.encode
    passage = ("The lighthouse stood at the end of a narrow spit of rock, where the sea met the land in a constant "
               "argument of foam and stone. For more than a hundred years, keepers had climbed its spiral stairs "
               "each evening to light the lamp. ")
    answers = [" the keeper", " the sea", " a storm at night", " nobody at all", " the lamp", " the stairs"]
    pairs = []
    for q in range(args.questions):
        ctx = enc(f"{passage}Question {q}: who climbed the stairs every evening? Answer:")
        pairs += [(ctx, enc(answers[(q + c) % len(answers)])) for c in range(args.choices)]
    params, cfg, impl = llm.engine.runner.params, llm.config, llm.engine.engine_cfg.attn_impl

    def packed():
        return [lp for lp, _ in score_continuations(params, cfg, pairs, attn_impl=impl)]

    def one_at_a_time():
        return [token_logprobs(params, cfg, ctx + cont, attn_impl=impl)[-len(cont):] for ctx, cont in pairs]

    texts = [llm.tokenizer.decode(ctx + cont) for ctx, cont in pairs]

    def llm_score():  # whole texts: every token scored, the tail compared
        scores = llm.score(texts)
        assert all(s.token_ids == ctx + cont for s, (ctx, cont) in zip(scores, pairs)), "texts re-tokenize"
        return [np.array(s.token_logprobs[-len(cont):]) for s, (_, cont) in zip(scores, pairs)]

    rows = []
    for name, fn in (("packed, shared context (lm-eval backend)", packed),
                     ("LLM.score(all texts): packed, shared pages", llm_score),
                     ("one text per call", one_at_a_time)):
        fn()  # compile
        t0 = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - t0, out))
    worst = max(float(np.abs(a - b).max()) for row in rows[1:] for a, b in zip(rows[0][2], row[2]))
    if worst > 1e-3:
        raise SystemExit(f"the two paths disagree: max |diff| = {worst}")
    print(f"{args.questions} questions x {args.choices} choices, context {len(pairs[0][0])} tokens, "
          f"backend {__import__('jax').default_backend()}, max |diff| {worst:.1e}")
    print("| path | seconds | requests/s |\n|---|---|---|")
    for name, seconds, _ in rows:
        print(f"| {name} | {seconds:.3f} | {len(pairs) / seconds:.1f} |")


if __name__ == "__main__":
    main()
