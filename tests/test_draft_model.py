"""Speculative decoding with a draft model (`SpeculativeConfig(method="draft", model=...)`).

Greedy output must be token-for-token the output without speculation whatever the draft (a random
model that accepts ~nothing, the target quantized, the target itself in a separate pool); sampled
output must keep the target's distribution (a chi-square test against the exact target
probabilities); the draft's pool follows the target's pages through prefix caching, preemption and
aborts (a full-depth copy of the target as draft is accepted always, which only holds if its K/V
pages are right).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference.engine import Engine, EngineConfig
from inference.sampling_params import SamplingParams
from inference.spec_runner import DraftRunner, SpeculativeConfig
from model.config import PRESETS
from model.llama import StepInputs, forward, init_cache, init_params
from test_speculative import ALPHA, chi2_pvalue
from test_spec_engine import CFG, greedy, make_engine, run, tokens, workload

# A different, smaller architecture with the target's vocabulary (random weights: accepts ~nothing).
SMALL = dataclasses.replace(PRESETS["tiny"], hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=16, vocab_size=CFG.vocab_size, max_position_embeddings=256,
                            name="small-draft")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(7))


@pytest.fixture(scope="module")
def reference(params):
    prompts, lens = workload(8, seed=3)
    outs = run(make_engine(params), prompts, [greedy(n) for n in lens])
    return prompts, lens, tokens(outs)


def draft_spec(model, **kw):
    return SpeculativeConfig(**{**dict(method="draft", model=model, num_speculative_tokens=3, adaptive=False), **kw})


def test_random_small_draft_greedy_identical(params, reference):
    prompts, lens, want = reference
    small = (SMALL, init_params(SMALL, jax.random.key(1)))
    engine = make_engine(params, draft_spec(small))
    assert isinstance(engine.runner.draft, DraftRunner) and engine.runner.draft.num_layers == SMALL.num_layers
    assert tokens(run(engine, prompts, [greedy(n) for n in lens])) == want
    st = engine.spec_stats
    assert st.num_draft_tokens > 0 and st.acceptance_rate < 0.5


def test_quantized_target_draft_greedy_identical(params, reference):
    """The target's own weights in int8: a genuinely different draft that agrees with it almost always."""
    prompts, lens, want = reference
    engine = make_engine(params, draft_spec(None, quantization="int8"))
    assert engine.runner.draft.num_layers == CFG.num_layers  # a quantized draft runs every layer by default
    assert tokens(run(engine, prompts, [greedy(n) for n in lens])) == want
    assert engine.spec_stats.acceptance_rate > 0.8


def test_full_copy_draft_follows_pages_through_preemption_and_abort(params, reference):
    """A copy of the target as a separate draft model: its guesses are the target's greedy tokens as long as
    its own pool holds the right K/V at the target's page ids, through chunked prefill, prefix-cache hits,
    preemption (pages freed and handed to others), aborts and recomputation."""
    prompts, lens, want = reference
    copy = (dataclasses.replace(CFG, name="copy"), jax.tree.map(lambda a: a + 0, params))
    engine = make_engine(params, draft_spec(copy), num_pages=24, max_num_seqs=8, max_num_batched_tokens=16)
    # Two requests aborted mid-run give their pages back to the others.
    doomed = [engine.add_request(f"abort{i}", prompts[i], greedy(40)) for i in range(2)]
    for _ in range(4):
        engine.step()
    for rid in doomed:
        assert engine.abort(rid)
    got = run(engine, prompts + prompts[:3], [greedy(n) for n in lens + lens[:3]])  # repeats: prefix hits
    assert tokens(got) == want + want[:3]
    assert engine.scheduler.num_preemptions > 0 and engine.allocator.stats.prefix_hits > 0
    assert engine.spec_stats.acceptance_rate > 0.98
    assert engine.allocator.num_used == 0


# An 8-token vocabulary: the joint distribution of three tokens has few cells.
VOCAB8 = dataclasses.replace(CFG, vocab_size=8, name="vocab8")


@pytest.mark.slow  # 2,000 requests through the engine: 1.5-5 minutes on a shared 2-core CPU
def test_sampled_output_keeps_target_distribution():
    """Many seeded requests of one prompt, three sampled tokens each (the first from prefill, the next two
    from speculative steps with the target's int4 weights as a sampled draft: q close to p but not equal, so
    most guesses are accepted and some are resampled from the residual): the joint distribution of the three
    tokens must be the target's, computed exactly from plain target forwards. A low temperature makes p
    peaked, where verify with a wrong q (e.g. one-hot, as for deterministic guesses) is far off."""
    target = init_params(VOCAB8, jax.random.key(11))
    prompt, temperature, n = [5, 1, 7, 3, 2, 6], 0.3, 2000

    def dist(context):  # the target's sampling distribution after `context`, [8]: one plain forward
        L = len(context)
        inputs = StepInputs(tokens=jnp.asarray(context, jnp.int32), positions=jnp.arange(L, dtype=jnp.int32),
                            slot_mapping=jnp.arange(L, dtype=jnp.int32), cu_q_lens=jnp.array([0, L], jnp.int32),
                            kv_lens=jnp.array([L], jnp.int32), block_tables=jnp.arange(4, dtype=jnp.int32)[None],
                            num_seqs=jnp.array([1], jnp.int32), logits_indices=jnp.array([L - 1], jnp.int32))
        logits, _ = forward(target, init_cache(VOCAB8, 4, 4), inputs, VOCAB8, attn_impl="xla")
        return np.asarray(jax.nn.softmax(logits[0] / temperature), np.float64)

    expected = np.zeros((8, 8, 8))
    p1 = dist(prompt)
    for t1 in range(8):
        p2 = dist(prompt + [t1])
        for t2 in range(8):
            expected[t1, t2] = p1[t1] * p2[t2] * dist(prompt + [t1, t2])

    engine = Engine(VOCAB8, target, tokenizer=None, engine_cfg=EngineConfig(
        page_size=4, num_pages=512, max_num_seqs=64, max_num_batched_tokens=256, attn_impl="xla",
        speculative=draft_spec(None, quantization="int4", num_speculative_tokens=2)))
    sps = [SamplingParams(temperature=temperature, seed=1000 + i, max_tokens=3, ignore_eos=True) for i in range(n)]
    observed = np.zeros((8, 8, 8))
    for t in tokens(run(engine, [prompt] * n, sps)):
        observed[tuple(t)] += 1
    # (Verify with another row's q instead -- a wrong draft-probs row mapping -- gives p ~ 1e-14 here.)
    assert chi2_pvalue(observed, expected) > ALPHA
    assert 0.5 < engine.spec_stats.acceptance_rate < 0.98  # both the accept and the residual paths ran


def test_bad_draft_configs_are_named(params):
    wrong_vocab = dataclasses.replace(SMALL, vocab_size=CFG.vocab_size + 7)
    with pytest.raises(ValueError, match=rf"vocab_size={CFG.vocab_size + 7}.*vocab_size={CFG.vocab_size}"):
        make_engine(params, draft_spec((wrong_vocab, init_params(wrong_vocab, jax.random.key(0)))))
    with pytest.raises(ValueError, match="quantization='int3'"):
        draft_spec(None, quantization="int3")
    with pytest.raises(ValueError, match="draft model of type dict"):
        draft_spec({"weights": 1})
    with pytest.raises(ValueError, match="needs method='draft', not method='ngram'"):
        SpeculativeConfig(method="ngram", model="some/path.gguf")
    with pytest.raises(ValueError, match="draft_num_layers=3 exceeds the draft model's num_layers=1"):
        make_engine(params, draft_spec((SMALL, init_params(SMALL, jax.random.key(0))), draft_num_layers=3))
    assert EngineConfig(speculative={"method": "draft", "model": "x.gguf", "quantization": "int4"}).speculative \
        == SpeculativeConfig(method="draft", model="x.gguf", quantization="int4")


@pytest.fixture(scope="module")
def smollm_reference(default_model):
    from inference.llm import LLM

    prompts = [{"messages": [{"role": "user", "content": "Name three colours of the rainbow."}]},
               "The capital of France is"]
    sp = SamplingParams(temperature=0, max_tokens=12)
    with LLM(_loaded=default_model, max_num_seqs=4) as llm:
        return prompts, sp, [o.token_ids for o in llm.generate(prompts, sp)]


@pytest.mark.parametrize("draft", ["int8", pytest.param("random", marks=pytest.mark.slow)])
def test_default_model_with_draft_same_tokens(default_model, smollm_reference, draft):
    """SmolLM2-135M through `LLM(speculative=...)` with its own int8 weights, or a random tiny model with its
    vocabulary, as the draft: the same greedy tokens as without speculation."""
    from inference.llm import LLM

    cfg = default_model[0]
    prompts, sp, want = smollm_reference
    if draft == "int8":
        spec = {"method": "draft", "quantization": "int8", "num_speculative_tokens": 3}
    else:
        tiny = dataclasses.replace(SMALL, vocab_size=cfg.vocab_size)
        spec = {"method": "draft", "model": (tiny, init_params(tiny, jax.random.key(2))), "num_speculative_tokens": 3}
    with LLM(_loaded=default_model, max_num_seqs=4, speculative=spec) as llm:
        got = [o.token_ids for o in llm.generate(prompts, sp)]
        rate = llm.engine.spec_stats.acceptance_rate
    assert got == want
    if draft == "int8":
        assert rate > 0.7
