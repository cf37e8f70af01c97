"""The lm-evaluation-harness backend (inference/lm_eval_backend.py) on the default model.

Local tasks in tests/fixtures/lm_eval_task (JSONL + YAML, no download). References: the dense scorer behind
`LLM.score` / `prompt_logprobs` (flash attention over the whole text, a different path from the paged
shared-context scorer the backend uses), HF float32 logits of the same weights, and `LLM.generate`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TASKS = FIXTURES / "lm_eval_task"
REF = json.loads((FIXTURES / "smollm2_hf_reference.json").read_text())
ARR = np.load(FIXTURES / "smollm2_hf_reference.npz")


def dense_logprobs(llm, ids):
    """log p(ids[i] | ids[:i]) and whether ids[i] is the argmax, for i >= 1: the dense scorer behind
    LLM.score and LLM.generate(prompt_logprobs=1)."""
    from inference.scoring import prompt_top_logprobs

    entries = prompt_top_logprobs(llm.engine.runner.params, llm.config, ids, 1,
                                  attn_impl=llm.engine.engine_cfg.attn_impl)[1:]
    logprobs = np.array([e[t] for e, t in zip(entries, ids[1:])])
    greedy = np.array([max(e, key=e.get) == t for e, t in zip(entries, ids[1:])])
    return logprobs, greedy


@pytest.fixture(scope="module")
def lm(default_llm):
    pytest.importorskip("lm_eval")
    from inference.lm_eval_backend import RidgelineLM

    return RidgelineLM(llm=default_llm)


def requests(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in args_list]


def test_score_continuations_matches_dense_scorer(default_llm):
    """Shared contexts across a page boundary, a one-token context, several chunks: equal to whole-text scoring."""
    from inference.scoring import score_continuations

    llm = default_llm
    enc = llm.tokenizer.encode
    long_ctx = enc("Question: which of these cities is the capital of France, the country in western Europe? "
                   "Answer:")
    assert len(long_ctx) > 16  # longer than one page: the shared pages are prefilled once
    pairs = [(long_ctx, enc(" Paris")), (long_ctx, enc(" London, the capital of England")), (long_ctx, enc(" Rome")),
             (long_ctx[:17], enc(" the")), (long_ctx[:17], enc(" a city")),  # one page shared, one token recomputed
             (enc("Hello"), enc(" world, how are you today?"))]
    results = score_continuations(llm.engine.runner.params, llm.config, pairs,
                                  attn_impl=llm.engine.engine_cfg.attn_impl, max_tokens_per_step=96)
    for (ctx, cont), (logprobs, greedy) in zip(pairs, results):
        want, want_greedy = dense_logprobs(llm, ctx + cont)
        np.testing.assert_allclose(logprobs, want[-len(cont):], atol=1e-4)
        assert greedy.tolist() == want_greedy[-len(cont):].tolist()
    assert any(g.any() for _, g in results) and not all(g.all() for _, g in results)


def test_loglikelihood_matches_hf_reference(lm):
    """Continuations of the HF fixture texts: the sum of HF float32 log-probs and HF's argmax."""
    context = "The quick brown fox"
    continuation = REF["allpos"]["prompt"][len(context):]  # " jumps over the lazy dog because it"
    ids = [int(t) for t in ARR["allpos_ids"]]
    split = len(lm.tok_encode(context))
    assert lm.tok_encode(context + continuation) == ids and split == 4
    hf_logits = ARR["allpos_logits"].astype(np.float64)
    top = hf_logits.max(-1, keepdims=True)
    hf_logprobs = hf_logits - top - np.log(np.exp(hf_logits - top).sum(-1, keepdims=True))
    want = sum(hf_logprobs[i - 1, ids[i]] for i in range(split, len(ids)))
    want_greedy = all(int(np.argmax(hf_logits[i - 1])) == ids[i] for i in range(split, len(ids)))

    text = (FIXTURES / REF["perplexity"]["file"]).read_text()
    ppl_ids = [int(t) for t in ARR["ppl_ids"]]
    first = lm.tok_decode(ppl_ids[:1])
    (got, got_greedy), (got_ppl, _) = lm.loglikelihood(
        requests("loglikelihood", [(context, continuation), (first, text[len(first):])]), disable_tqdm=True)
    assert abs(got - want) < 1e-3
    assert got_greedy == want_greedy
    # 364 tokens predicted from their full prefix, as in HF's perplexity run (per-token atol 2e-3 there).
    assert abs(got_ppl + ARR["ppl_token_nll"].sum()) < 0.05


def test_empty_context_and_trailing_space(lm):
    llm = lm.llm
    (empty, _), (spaced, _), (plain, _) = lm.loglikelihood(requests("loglikelihood", [
        ("", "Paris is a city"), ("The capital of France is ", "Paris"), ("The capital of France is", " Paris")]),
        disable_tqdm=True)
    cont = llm.tokenizer.encode("Paris is a city")
    want, _ = dense_logprobs(llm, [lm.prefix_token_id] + cont)  # empty context: the prefix token conditions
    assert abs(empty - want.sum()) < 1e-4
    assert spaced == plain  # the trailing space moves to the continuation, as TemplateLM does


def test_rolling_windows_cover_every_token_once(default_llm):
    """max_length=128 over a 365-token text: 3 windows, each scored against the dense scorer."""
    pytest.importorskip("lm_eval")
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from inference.lm_eval_backend import RidgelineLM

    lm = RidgelineLM(llm=default_llm, max_length=128)
    text = (FIXTURES / REF["perplexity"]["file"]).read_text()
    (total,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    ids = default_llm.tokenizer.encode(text, add_special_tokens=False)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_token_id, 128, 1)]
    assert len(windows) == 3 and sum((c for _, c in windows), []) == ids
    want = sum(dense_logprobs(default_llm, ctx + cont)[0][-len(cont):].sum() for ctx, cont in windows)
    assert abs(total - want) < 1e-3


@pytest.mark.slow
def test_simple_evaluate_local_tasks(lm, monkeypatch):
    """simple_evaluate on the three local tasks: log-likelihoods equal LLM.score, the rolling total equals
    the dense scorer (and the HF reference past the prefix token), generations equal LLM.generate."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the YAMLs name their JSONL files relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    llm = lm.llm
    out = lm_eval.simple_evaluate(model=lm, tasks=["ridgeline_tiny_mc", "ridgeline_tiny_rolling", "ridgeline_tiny_gen"],
                                  task_manager=TaskManager(include_path=str(TASKS)), log_samples=True, limit=3)
    samples = out["samples"]
    assert 0 <= out["results"]["ridgeline_tiny_mc"]["acc,none"] <= 1

    mc = [(args, resp[0]) for s in samples["ridgeline_tiny_mc"] for args, resp in zip(s["arguments"], s["resps"])]
    assert len(mc) == 10  # 3 questions, 4 + 3 + 3 choices
    scores = llm.score([ctx + cont for (ctx, cont), _ in mc])
    for ((ctx, cont), (logprob, _)), score in zip(mc, scores):
        n = len(score.token_ids) - len(llm.tokenizer.encode(ctx))
        assert abs(logprob - sum(score.token_logprobs[-n:])) < 1e-4

    text = (FIXTURES / REF["perplexity"]["file"]).read_text()
    rolling = {s["doc"]["text"]: s["resps"][0][0] for s in samples["ridgeline_tiny_rolling"]}
    ids = [int(t) for t in ARR["ppl_ids"]]
    logprobs, _ = dense_logprobs(llm, [lm.prefix_token_id] + ids)
    assert abs(rolling[text] - logprobs.sum()) < 1e-3
    # Past the first token (predicted from the prefix token, which HF's run did not have), the rolling
    # score conditions on "<prefix> + text"; HF's on "text" alone: close but not equal.
    hf_total = -float(ARR["ppl_token_nll"].sum())
    assert abs((rolling[text] - logprobs[0]) - hf_total) / abs(hf_total) < 0.02

    for s in samples["ridgeline_tiny_gen"]:
        context, gen_kwargs = s["arguments"][0]
        want = llm.generate(context, SamplingParams(temperature=0, max_tokens=gen_kwargs["max_gen_toks"],
                                                    stop=gen_kwargs["until"]))[0].text
        assert s["resps"][0][0] == want


@pytest.mark.slow
def test_ridgeline_eval_cli(tmp_path):
    """`ridgeline eval --model ridgeline ...` in a fresh process: lm-eval's CLI finds the registered model."""
    pytest.importorskip("lm_eval")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "inference.cli", "eval", "--model", "ridgeline",
           "--model_args", "pretrained=default,max_num_seqs=4,max_num_batched_tokens=128,max_model_len=256",
           "--tasks", "ridgeline_tiny_mc", "--include_path", str(TASKS), "--limit", "2",
           "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = tmp_path.rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]["ridgeline_tiny_mc"]
    assert 0 <= results["acc,none"] <= 1
    assert "ridgeline_tiny_mc" in proc.stdout  # lm-eval's results table


def test_bad_arguments_are_named(lm, default_llm):
    from inference.lm_eval_backend import RidgelineLM
    from inference.scoring import score_continuations

    with pytest.raises(ValueError, match="max_length=100000"):
        RidgelineLM(llm=default_llm, max_length=100000)
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until(requests("generate_until", [("Hi", {"until": ["\n"], "num_beams": 4})]))
    with pytest.raises(ValueError, match="request 1: context"):
        score_continuations(default_llm.engine.runner.params, default_llm.config, [([1, 2], [3]), ([1], [])])
