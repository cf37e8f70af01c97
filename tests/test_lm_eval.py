"""The lm-evaluation-harness backend: log-likelihoods against LLM.score and the HF fixture, and
`lm_eval.simple_evaluate` over local YAML tasks (tests/fixtures/lm_eval, no download)."""

import json
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from inference.lm_eval_backend import RidgelineLM  # noqa: E402
from inference.sampling_params import SamplingParams  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TASKS = FIXTURES / "lm_eval"


@pytest.fixture(scope="module")
def lm(default_llm):
    return RidgelineLM(llm=default_llm, max_gen_toks=8)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loglikelihood_equals_score_and_hf(lm, default_llm):
    arr = np.load(FIXTURES / "smollm2_hf_reference.npz")
    ids = [int(t) for t in arr["allpos_ids"]]
    hf = _log_softmax(arr["allpos_logits"].astype(np.float64))  # [11, vocab]: row i predicts ids[i + 1]
    k = 4
    (logprob, greedy), = lm._loglikelihood_tokens([(("", ""), ids[:k], ids[k:])])
    score = default_llm.score([{"prompt_token_ids": ids}])[0]
    assert logprob == pytest.approx(sum(score.token_logprobs[k:]), abs=1e-4)
    hf_logprob = sum(hf[i - 1, ids[i]] for i in range(k, len(ids)))
    assert logprob == pytest.approx(hf_logprob, abs=1e-2)
    assert greedy == all(hf[i - 1].argmax() == ids[i] for i in range(k, len(ids)))

    context = default_llm.tokenizer.encode("The capital of France is")
    continuation = default_llm.generate({"prompt_token_ids": context}, SamplingParams(temperature=0, max_tokens=3))[0]
    assert lm._loglikelihood_tokens([(("", ""), context, continuation.token_ids)])[0][1] is True
    unlikely = default_llm.tokenizer.encode(" zebra zebra")
    assert lm._loglikelihood_tokens([(("", ""), context, unlikely)])[0][1] is False


def test_simple_evaluate_local_tasks(lm, default_llm, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASKS)  # the YAMLs name their JSONL files relative to this folder
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(model=lm, tasks=["ridgeline_choice", "ridgeline_generate", "ridgeline_rolling"],
                                  task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)
    results, samples = out["results"], out["samples"]
    assert results["ridgeline_choice"]["acc,none"] == 1.0  # " Paris", " Celsius"
    generated = samples["ridgeline_generate"][0]["resps"][0][0]
    assert "\n" not in generated and "Paris" in generated  # stopped at the `until` string

    # Every multiple-choice log-likelihood is LLM.score's sum over the choice's tokens.
    doc = samples["ridgeline_choice"][0]
    for (context, choice), [(logprob, _)] in zip(doc["arguments"], doc["resps"]):
        context_ids, choice_ids = lm._encode_pair(context, choice)
        score = default_llm.score([{"prompt_token_ids": context_ids + choice_ids}])[0]
        assert logprob == pytest.approx(sum(score.token_logprobs[len(context_ids):]), abs=1e-4)

    # The rolling log-likelihood covers every token once: the document after the prefix token.
    text = json.loads((TASKS / "documents.jsonl").read_text().splitlines()[0])["text"]
    rolling = float(samples["ridgeline_rolling"][0]["resps"][0][0])
    ids = [lm.prefix_token_id] + default_llm.tokenizer.encode(text, add_special_tokens=False)
    assert rolling == pytest.approx(default_llm.score([{"prompt_token_ids": ids}])[0].total_logprob, abs=1e-3)
