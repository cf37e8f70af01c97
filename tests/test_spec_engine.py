"""Speculative decoding inside the continuous-batching engine (tiny random model, tokenizer=None).

The central property: greedy output with speculation is token-for-token the output without it, for
many prompts in one batch, with chunked prefill, preemption, penalties, logprobs and stops in the
middle of an accepted block. A random tiny model's greedy output tends to loop, so n-gram guesses do
get accepted; the full-depth self-draft must be accepted (almost) always, which checks the draft's
use of the shared KV pool.
"""

import dataclasses

import jax
import numpy as np
import pytest

from inference.engine import Engine, EngineConfig
from inference.sampling_params import SamplingParams
from inference.spec_runner import SpeculativeConfig
from model.config import PRESETS
from model.llama import init_params

CFG = dataclasses.replace(PRESETS["tiny"], num_heads=4, num_kv_heads=2, max_position_embeddings=256)
NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=4)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(7))


def make_engine(params, speculative=None, tokenizer=None, **kw):
    defaults = dict(page_size=4, num_pages=256, max_num_seqs=16, max_num_batched_tokens=64, attn_impl="xla")
    return Engine(CFG, params, tokenizer=tokenizer,
                  engine_cfg=EngineConfig(**{**defaults, **kw}, speculative=speculative))


def run(engine, prompts, params_list, speculate=None):
    speculate = speculate or [None] * len(prompts)
    ids = [engine.add_request(None, p, sp, speculate=s) for p, sp, s in zip(prompts, params_list, speculate)]
    final = engine.run()
    return [final[i] for i in ids]


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def workload(count=20, seed=0):
    """Random prompts plus repetitive / input-grounded ones (patterns the n-gram proposer can copy)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        if i % 2:
            pattern = list(rng.integers(1, CFG.vocab_size, int(rng.integers(2, 7))))
            prompts.append(pattern * int(rng.integers(2, 6)) + pattern[: int(rng.integers(0, len(pattern)))])
        else:
            prompts.append(list(rng.integers(1, CFG.vocab_size, int(rng.integers(1, 30)))))
    lens = [int(n) for n in rng.integers(8, 24, count)]
    return prompts, lens


def tokens(outs):
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(params):
    """Greedy outputs of the workload without speculation (and the engine's step count)."""
    prompts, lens = workload()
    engine = make_engine(params)
    outs = run(engine, prompts, [greedy(n) for n in lens])
    return prompts, lens, outs, engine.stats["steps"]


def test_ngram_greedy_identical_in_one_batch(params, reference):
    prompts, lens, want, plain_steps = reference
    engine = make_engine(params, NGRAM)
    got = run(engine, prompts, [greedy(n) for n in lens])
    assert tokens(got) == tokens(want)
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    st = engine.spec_stats
    assert st.num_accepted_tokens > 0 and st.mean_tokens_per_forward > 1.0
    # Accepted guesses saved target forwards: fewer (row, forward) pairs than tokens. (Engine steps only
    # drop when the longest request speculates well: the batch runs until its last request is done.)
    assert st.num_steps < sum(lens) == st.num_output_tokens
    assert engine.stats["steps"] <= plain_steps
    stats = engine.scheduler_stats()
    assert 0 < stats["spec_acceptance_rate"] <= 1 and stats["spec_tokens_per_forward"] > 1


def test_penalties_min_tokens_and_logprobs_identical(params, reference):
    """Rows with penalties (guesses update the counts of later positions), a min_tokens ban, and logprobs."""
    prompts = reference[0][:4]
    sps = [greedy(16, repetition_penalty=1.3), greedy(16, frequency_penalty=0.5, presence_penalty=0.2),
           greedy(16, logprobs=2), greedy(16, min_tokens=6, stop_token_ids=[7, 8])]
    want = run(make_engine(params), prompts, sps)
    engine = make_engine(params, NGRAM)
    got = run(engine, prompts, sps)
    assert tokens(got) == tokens(want)
    assert engine.spec_stats.num_accepted_tokens > 0
    for g, w in zip(got, want):
        if w.outputs[0].logprobs is not None:
            assert len(g.outputs[0].logprobs) == len(g.token_ids)
            for dg, dw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                assert dg.keys() == dw.keys()
                np.testing.assert_allclose(list(dg.values()), list(dw.values()), atol=1e-4)


@pytest.mark.parametrize("method", ["ngram", pytest.param("draft", marks=pytest.mark.slow)])
def test_chunked_prefill_and_preemption_identical(params, reference, method):
    prompts, lens, want, _ = reference
    spec = SpeculativeConfig(method=method, num_speculative_tokens=4, draft_num_layers=1)
    engine = make_engine(params, spec, num_pages=24, max_num_seqs=8, max_num_batched_tokens=16)
    got = run(engine, prompts, [greedy(n) for n in lens])
    assert engine.scheduler.num_preemptions > 0
    assert tokens(got) == tokens(want)
    assert engine.spec_stats.num_draft_tokens > 0


# Draft = all layers of the target: its guesses are the target's own greedy tokens, so only a draft
# reading wrong K/V (pages, scratch slots, positions) could get one rejected.
FULL_DRAFT = SpeculativeConfig(method="draft", num_speculative_tokens=4, draft_num_layers=CFG.num_layers,
                               adaptive=False)


def _blocks(engine, prompts, sps):
    """Runs step by step; returns (final outputs, per request the token counts emitted by each step)."""
    ids = [engine.add_request(None, p, sp) for p, sp in zip(prompts, sps)]
    seen = {i: 0 for i in ids}
    blocks = {i: [] for i in ids}
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if len(out.token_ids) > seen[out.request_id]:
                blocks[out.request_id].append(len(out.token_ids) - seen[out.request_id])
                seen[out.request_id] = len(out.token_ids)
            if out.finished:
                final[out.request_id] = out
    return [final[i] for i in ids], [blocks[i] for i in ids]


@pytest.fixture(scope="module")
def full_draft_run(params, reference):
    prompts, lens, _, _ = reference
    engine = make_engine(params, FULL_DRAFT)
    outs, blocks = _blocks(engine, prompts, [greedy(n) for n in lens])
    return engine, outs, blocks


def test_full_depth_self_draft_identical_and_always_accepted(reference, full_draft_run):
    _, _, want, plain_steps = reference
    engine, got, blocks = full_draft_run
    assert tokens(got) == tokens(want)
    assert engine.spec_stats.acceptance_rate > 0.98
    assert engine.stats["steps"] < plain_steps / 2
    assert max(max(b) for b in blocks) == 1 + FULL_DRAFT.num_speculative_tokens


def test_self_draft_with_unstacked_layers(params, reference):
    """LLM unstacks the layers on CPU (model.llama.unstack_layers); the draft then loops over a list."""
    unstack_layers = getattr(__import__("model.llama", fromlist=["x"]), "unstack_layers", None)
    if unstack_layers is None:
        pytest.skip("model.llama has no unstack_layers")
    prompts, lens, want, _ = reference
    engine = make_engine(unstack_layers(params), FULL_DRAFT)
    assert tokens(run(engine, prompts[:4], [greedy(n) for n in lens[:4]])) == tokens(want[:4])
    assert engine.spec_stats.acceptance_rate > 0.98


@pytest.mark.slow
def test_truncated_self_draft_identical(params, reference):
    prompts, lens, want, _ = reference
    engine = make_engine(params, SpeculativeConfig(method="draft", num_speculative_tokens=4, draft_num_layers=1))
    assert tokens(run(engine, prompts, [greedy(n) for n in lens])) == tokens(want)
    assert engine.spec_stats.num_accepted_tokens > 0


def test_seeded_sampling_reproducible(params, reference):
    prompts, lens, _, _ = reference
    sps = [SamplingParams(temperature=(0.3, 0.8)[i % 2], top_k=40, top_p=0.95, seed=100 + i, max_tokens=n,
                          ignore_eos=True) for i, n in enumerate(lens)]
    first = make_engine(params, NGRAM)
    a = tokens(run(first, prompts, sps))
    assert tokens(run(make_engine(params, NGRAM), prompts, sps)) == a
    reseeded = [dataclasses.replace(sp, seed=sp.seed + 1000) for sp in sps]
    assert tokens(run(make_engine(params, NGRAM), prompts, reseeded)) != a
    assert first.spec_stats.num_accepted_tokens > 0


def test_opt_out_requests_never_speculate(params, reference):
    prompts, lens, want, _ = reference
    n = 8
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)
    sps = [greedy(m) for m in lens[:n]] + [sampled]
    speculate = [i % 2 == 0 for i in range(n)] + [False]
    engine = make_engine(params, NGRAM)
    ids = [engine.add_request(f"r{i}", p, sp, speculate=s)
           for i, (p, sp, s) in enumerate(zip(prompts[:n + 1], sps, speculate))]
    final = engine.run()
    assert [final[i].token_ids for i in ids[:n]] == tokens(want[:n])
    for rid, s in zip(ids, speculate):
        m = engine.request_spec_metrics(rid)
        assert (m.num_draft_tokens > 0) == s, (rid, m)
        if not s:
            assert m.num_output_tokens == m.num_steps  # one token per target forward
    # An opted-out sampled request samples exactly as in an engine without speculation.
    plain = run(make_engine(params), [prompts[n]], [sampled])[0]
    assert final[ids[n]].token_ids == plain.token_ids
    with pytest.raises(ValueError, match="no speculative config"):
        make_engine(params).add_request(None, [1, 2], greedy(2), speculate=True)


def _stop_inside_block(out_tokens, block_sizes):
    """A position j strictly inside a multi-token block whose token first appears at j (a stop there
    fires at j and discards the rest of the block)."""
    start = 0
    for size in block_sizes:
        for j in range(start, start + size - 1):
            if out_tokens[j] not in out_tokens[:j]:
                return j
        start += size
    return None


def test_stop_token_and_max_tokens_mid_block(params, reference, full_draft_run):
    prompts, lens, want, _ = reference
    _, _, blocks = full_draft_run
    picks = [(i, _stop_inside_block(w.token_ids, b)) for i, (w, b) in enumerate(zip(want, blocks))]
    picks = [(i, j) for i, j in picks if j is not None]
    assert len(picks) >= 5, "too few multi-token blocks with a fresh token: the test lost its point"
    sps, expect = [greedy(n) for n in lens], tokens(want)
    for i, j in picks:
        sps[i] = greedy(lens[i], stop_token_ids=[want[i].token_ids[j]])
        expect[i] = want[i].token_ids[:j + 1]
    engine = make_engine(params, FULL_DRAFT)
    got = run(engine, prompts, sps)
    assert tokens(got) == expect
    assert tokens(run(make_engine(params), prompts, sps)) == expect  # the same without speculation
    for i, j in picks:
        assert got[i].finish_reason == "stop" and got[i].outputs[0].stop_reason == want[i].token_ids[j]
    # Verified tokens after the stops were emitted by the device and discarded.
    st = engine.spec_stats
    assert st.num_accepted_tokens + st.num_steps > st.num_output_tokens
    # max_tokens: never exceeded (k is clipped to the room left), output is a prefix of the longer run.
    short = run(make_engine(params, NGRAM), prompts, [greedy(max(1, n // 2)) for n in lens])
    assert tokens(short) == [w.token_ids[:max(1, n // 2)] for w, n in zip(want, lens)]
    assert all(o.finish_reason == "length" for o in short)


class _LetterTokenizer:
    """Token t renders as one letter: enough for stop strings."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids)


def test_stop_string_mid_block(params, reference, full_draft_run):
    prompts, lens, want, _ = reference
    _, _, blocks = full_draft_run
    tok = _LetterTokenizer()
    sps, cases = [greedy(n) for n in lens], 0
    for i, (w, b) in enumerate(zip(want, blocks)):
        j = _stop_inside_block(w.token_ids, b)
        if j is not None and j >= 1:
            sps[i] = greedy(lens[i], stop=[tok.decode(w.token_ids[j - 1:j + 1])])
            cases += 1
    assert cases >= 5
    want_stop = run(make_engine(params, tokenizer=tok), prompts, sps)
    got = run(make_engine(params, FULL_DRAFT, tokenizer=tok), prompts, sps)
    assert tokens(got) == tokens(want_stop)
    assert [o.text for o in got] == [o.text for o in want_stop]
    assert [(o.finish_reason, o.outputs[0].stop_reason) for o in got] == \
        [(o.finish_reason, o.outputs[0].stop_reason) for o in want_stop]
    assert sum(o.finish_reason == "stop" for o in got) >= 5


def test_adaptive_k_backs_off_when_guesses_are_wrong(params, reference):
    prompts, lens = reference[0][:6], [24] * 6
    want = tokens(run(make_engine(params), prompts, [greedy(n) for n in lens]))
    truth = {tuple(p): w for p, w in zip(prompts, want)}

    class WrongProposer:
        """Proposes (true next greedy token + 1): every guess is rejected."""

        def propose(self, history, k):
            for p, w in truth.items():
                if tuple(history[:len(p)]) == p:
                    return np.array([(w[len(history) - len(p)] + 1) % CFG.vocab_size] * k, np.int32)

    drafted = {}
    for adaptive in (True, False):
        engine = make_engine(params, dataclasses.replace(NGRAM, adaptive=adaptive))
        engine.proposer = WrongProposer()
        assert tokens(run(engine, prompts, [greedy(n) for n in lens])) == want
        assert engine.spec_stats.num_accepted_tokens == 0
        drafted[adaptive] = engine.spec_stats.num_draft_tokens
    # k shrinks 4, 3, 2, 1 and then speculation is switched off (until a probe much later).
    assert drafted[True] <= 6 * (4 + 3 + 2 + 1)
    assert drafted[True] < drafted[False] / 2


def test_config_validation():
    with pytest.raises(ValueError, match="method='medusa'"):
        SpeculativeConfig(method="medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        SpeculativeConfig(num_speculative_tokens=0)
    assert EngineConfig(speculative={"method": "draft", "draft_num_layers": 1}).speculative == \
        SpeculativeConfig(method="draft", draft_num_layers=1)
    with pytest.raises(ValueError, match="draft_num_layers=5 exceeds"):
        SpeculativeConfig(method="draft", draft_num_layers=5).draft_layers(CFG)


@pytest.mark.slow
def test_llm_facade_speculative_same_text(default_model):
    """The default model through `LLM(speculative=...)`: same greedy text on an input-grounded prompt."""
    from inference.llm import LLM

    text = "The quick brown fox jumps over the lazy dog. " * 3
    prompt = f"Repeat this text exactly: {text}\nRepeated: "
    sp = SamplingParams(temperature=0, max_tokens=24)
    with LLM(_loaded=default_model, max_num_seqs=4) as plain:
        want = plain.generate(prompt, sp)[0]
    with LLM(_loaded=default_model, max_num_seqs=4, speculative={"method": "ngram"}) as llm:
        got = llm.generate(prompt, sp)[0]
        assert llm.stats()["spec_accepted_tokens"] > 0
    assert got.token_ids == want.token_ids and got.text == want.text
