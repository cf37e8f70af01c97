"""Overlapped dispatch (EngineConfig.async_scheduling): each step is launched before the previous one's
tokens are read, which then feed it on the device. The output must equal the synchronous loop's, token
for token, with greedy and seeded sampling, stop strings, EOS, min_tokens, max_tokens, penalties,
logprobs, n > 1, aborts and preemption."""

import dataclasses

import jax
import numpy as np
import pytest

from inference.engine import Engine, EngineConfig
from inference.llm import LLM
from inference.sampling_params import SamplingParams
from model.config import PRESETS
from model.llama import init_params

CFG = dataclasses.replace(PRESETS["tiny"], num_heads=4, num_kv_heads=2, max_position_embeddings=256)
ENGINE_KW = dict(page_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=96, attn_impl="xla")
EOS = 3


class IdTokenizer:
    """Text is the ids joined by spaces, so stop strings such as "13" fire on many ids."""

    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def encode(self, text, add_special_tokens=False):
        return [int(t) for t in text.split()]


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(5))


def job(count=64, seed=0):
    """Mixed prompt and output lengths; greedy and seeded rows, some with stop strings, EOS (others
    ignore it), min_tokens, penalties, logprobs and n = 2."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, CFG.vocab_size, int(rng.integers(1, 40))).tolist() for _ in range(count)]
    sps = []
    for i in range(count):
        sps.append(SamplingParams(
            temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=int(rng.integers(1, 40)),
            ignore_eos=i % 5 == 1, stop=["13"] if i % 3 == 0 else None, min_tokens=3 if i % 6 == 2 else 0,
            repetition_penalty=1.3 if i % 4 == 1 else 1.0, frequency_penalty=0.4 if i % 8 == 3 else 0.0,
            logprobs=2 if i % 5 == 0 else None, n=2 if i % 7 == 0 else 1))
    return prompts, sps


def summary(out):
    """Tokens, text and finish/stop reasons of every sample (compared exactly)."""
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs]


def logprobs(out):
    """Every sample's top-logprob ids and values, cumulative logprob last."""
    ids, values = [], []
    for c in out.outputs:
        for d in c.logprobs or []:
            ids.append(sorted(d))
            values += [d[k] for k in sorted(d)]
        if c.cumulative_logprob is not None:  # with logprobs requested (as in vLLM)
            values.append(c.cumulative_logprob)
    return ids, np.array(values)


def assert_same_logprobs(got, want):
    """Batches of another composition (overlap admits requests one step later) may round differently."""
    for g, w in zip(got, want):
        assert g[0] == w[0]
        np.testing.assert_allclose(g[1], w[1], rtol=1e-5, atol=1e-5)


def tiny_llm(params, **kw):
    return LLM(_loaded=(CFG, params, IdTokenizer()), dtype="float32", unroll_layers=False, **{**ENGINE_KW, **kw})


def launch_order(monkeypatch, runner):
    """Records the runner's launches ("d") and reads ("f") of plain steps."""
    events = []
    for name, tag in (("dispatch", "d"), ("fetch", "f")):
        original = getattr(runner, name)

        def wrapped(*args, _original=original, _tag=tag, **kwargs):
            events.append(_tag)
            return _original(*args, **kwargs)

        monkeypatch.setattr(runner, name, wrapped)
    return events


@pytest.fixture(scope="module")
def sync_outputs(params):
    prompts, sps = job()
    with tiny_llm(params, num_pages=400) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sps)
        return [summary(o) for o in outs], [logprobs(o) for o in outs]


def test_overlapped_job_equals_synchronous(params, sync_outputs, monkeypatch):
    prompts, sps = job()
    with tiny_llm(params, num_pages=400, async_scheduling=True) as llm:
        events = launch_order(monkeypatch, llm.engine.runner)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sps)
    got = [summary(o) for o in outs]
    assert got == sync_outputs[0]
    assert_same_logprobs([logprobs(o) for o in outs], sync_outputs[1])
    reasons = {c[2] for out in got for c in out}
    assert reasons == {"stop", "length"} and any(c[3] == "13" for out in got for c in out)
    assert any(c[3] is None and c[2] == "stop" for out in got for c in out)  # EOS fired somewhere
    # The steps really overlapped: most launches came before the previous step was read.
    unread, overlapped = 0, 0
    for e in events:
        overlapped += e == "d" and unread > 0
        unread += 1 if e == "d" else -1
    assert overlapped > events.count("d") // 2


def test_overlapped_equals_synchronous_under_preemption(params):
    """A pool of 40 pages for 8 running sequences: requests are preempted and recomputed (their pending
    token included) at other points than in the synchronous loop, and still give the same tokens."""
    prompts, sps = job(32, seed=1)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    results = []
    for overlap in (False, True):
        with tiny_llm(params, num_pages=40, async_scheduling=overlap) as llm:
            results.append([summary(o) for o in llm.generate(inputs, sps)])
            assert llm.stats()["num_preemptions"] > 0
    assert results[0] == results[1]


def test_abort_mid_run(params):
    """Requests aborted while a step is pending end with no output and free their pages; the others
    are unaffected."""
    prompts, sps = job(24, seed=2)
    sps = [dataclasses.replace(sp, n=1) for sp in sps]
    finals = []
    for overlap in (False, True):
        engine = Engine(CFG, params, IdTokenizer(), EngineConfig(num_pages=400, async_scheduling=overlap,
                                                                **ENGINE_KW))
        ids = [engine.add_request(None, p, sp, stream=False) for p, sp in zip(prompts, sps)]
        final = {}
        for step in range(200):
            if step == 6:
                assert engine._pending is not None or not overlap  # aborted while their tokens are unread
                for rid in ids[::5]:
                    engine.abort(rid)
            for out in engine.step():
                final[out.request_id] = summary(out)
            if not engine.has_unfinished_requests():
                break
        assert not engine.has_unfinished_requests()
        assert engine.allocator.num_free == engine.allocator.num_pages
        assert sorted(engine._free_slots) == list(range(engine.engine_cfg.max_num_seqs))
        finals.append(final)
    aborted = set(ids[::5])
    survivors = {rid: out for rid, out in finals[0].items() if rid not in aborted}
    assert {rid: out for rid, out in finals[1].items() if rid not in aborted} == survivors
    assert len(survivors) == len(ids) - len(aborted)


def test_overlap_falls_back_for_bad_words(params, monkeypatch):
    """A bad_words request's bans follow its last token on the host: steps sampling for it are read
    before the next launch, and its output equals the synchronous loop's."""
    prompts, sps = job(8, seed=3)
    sps = [dataclasses.replace(sp, n=1, bad_words=["7 9"] if i < 2 else None) for i, sp in enumerate(sps)]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    with tiny_llm(params, num_pages=400) as llm:
        want = [summary(o) for o in llm.generate(inputs, sps)]
    with tiny_llm(params, num_pages=400, async_scheduling=True) as llm:
        got = [summary(o) for o in llm.generate(inputs, sps)]
    assert got == want
    assert not any(" 7 9" in f" {c[1]}" for out in got[:2] for c in out)


def test_async_scheduling_refuses_drafts_and_multi_step():
    with pytest.raises(ValueError, match="num_decode_steps=4"):
        EngineConfig(async_scheduling=True, num_decode_steps=4)
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(async_scheduling=True, speculative=dict(method="ngram", num_speculative_tokens=2))
