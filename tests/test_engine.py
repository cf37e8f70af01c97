"""Continuous-batching engine on a tiny random model: batching, chunked prefill, preemption and prefix
caching must never change a request's greedy output; seeded sampling is reproducible."""

import dataclasses

import jax
import numpy as np
import pytest

from inference.engine import Engine, EngineConfig
from inference.sampling_params import SamplingParams
from model.config import PRESETS
from model.llama import init_params

CFG = dataclasses.replace(PRESETS["tiny"], num_heads=4, num_kv_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(7))


def make_engine(params, **kw):
    defaults = dict(page_size=4, num_pages=256, max_num_seqs=16, max_num_batched_tokens=64, attn_impl="xla")
    return Engine(CFG, params, tokenizer=None, engine_cfg=EngineConfig(**{**defaults, **kw}))


def run(engine, prompts, params_list):
    ids = [engine.add_request(None, p, sp) for p, sp in zip(prompts, params_list)]
    final = engine.run()
    return [final[i] for i in ids]


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def mixed_prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, CFG.vocab_size, int(rng.integers(1, 40)))) for _ in range(count)]


@pytest.fixture(scope="module")
def alone_outputs(params):
    """Each prompt generated alone (one request in the engine at a time)."""
    prompts = mixed_prompts(64)
    engine = make_engine(params, enable_prefix_caching=False)
    lens = [int(n) for n in np.random.default_rng(1).integers(1, 12, len(prompts))]
    outs = [run(engine, [p], [greedy(n)])[0].token_ids for p, n in zip(prompts, lens)]
    return prompts, lens, outs


def test_64_mixed_prompts_batched_equal_alone(params, alone_outputs):
    prompts, lens, want = alone_outputs
    engine = make_engine(params)
    got = [o.token_ids for o in run(engine, prompts, [greedy(n) for n in lens])]
    assert got == want
    # The batch really was continuous: several sequences per step, and prefill chunks were split.
    assert engine.stats["steps"] < sum(lens)


def test_small_pool_preempts_and_output_unchanged(params, alone_outputs):
    prompts, lens, want = alone_outputs
    engine = make_engine(params, num_pages=24, max_num_seqs=8)
    got = [o.token_ids for o in run(engine, prompts[:24], [greedy(n) for n in lens[:24]])]
    assert engine.scheduler.num_preemptions > 0
    assert got == want[:24]


def test_prefix_cache_reuses_pages_and_keeps_output(params):
    rng = np.random.default_rng(5)
    system = list(rng.integers(1, CFG.vocab_size, 48))
    prompts = [system + list(rng.integers(1, CFG.vocab_size, 5)) for _ in range(6)]
    no_cache = make_engine(params, enable_prefix_caching=False)
    want = [o.token_ids for o in run(no_cache, prompts, [greedy(6)] * 6)]
    cached = make_engine(params)
    run(cached, prompts[:1], [greedy(6)])  # warm the cache with the shared prefix
    got = [o.token_ids for o in run(cached, prompts, [greedy(6)] * 6)]
    assert got == want
    # 48 shared tokens = 12 full pages of 4, reused by each later request.
    assert cached.allocator.stats.prefix_hits >= 6 * 12
    assert cached.stats["tokens_computed"] < no_cache.stats["tokens_computed"]


def test_seeded_sampling_reproducible_and_batch_independent(params):
    prompts = mixed_prompts(5, seed=3)
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    alone = run(make_engine(params), [prompts[2]], [sp])[0].token_ids
    others = [SamplingParams(temperature=1.0, seed=i, max_tokens=7, ignore_eos=True) for i in range(5)]
    others[2] = sp
    batched = run(make_engine(params), prompts, others)[2].token_ids
    assert alone == batched
    different_seed = run(make_engine(params), [prompts[2]], [dataclasses.replace(sp, seed=99)])[0].token_ids
    assert different_seed != alone


def test_bad_requests_fail_alone(params):
    engine = make_engine(params)
    good = engine.add_request(None, [1, 2, 3], greedy(4))
    with pytest.raises(ValueError, match="prompt length 300"):
        engine.add_request(None, [1] * 300, greedy(4))
    with pytest.raises(ValueError, match="token id 999 out of range"):
        engine.add_request(None, [1, 999], greedy(4))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request(None, [], greedy(4))
    final = engine.run()
    assert len(final[good].token_ids) == 4


def test_max_tokens_and_stop_token(params):
    engine = make_engine(params)
    out = run(engine, [[5, 6, 7]], [greedy(5)])[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    stop_at = out.token_ids[2]
    first = out.token_ids.index(stop_at)
    out2 = run(engine, [[5, 6, 7]], [SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[stop_at])])[0]
    assert out2.token_ids == out.token_ids[:first + 1] and out2.finish_reason == "stop"


def test_logprobs_match_scoring(params):
    """Top-k logprobs returned during generation equal a teacher-forced forward of the same tokens."""
    from inference.scoring import token_logprobs

    engine = make_engine(params)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = run(engine, [prompt], [SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)])[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4 and all(len(d) >= 3 for d in lps)
    full = prompt + out.token_ids
    want = token_logprobs(params, CFG, full, attn_impl="xla")[len(prompt) - 1:]
    got = [lps[i][t] for i, t in enumerate(out.token_ids)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert all(max(d.values()) == d[t] for d, t in zip(lps, out.token_ids))  # greedy = top-1


def test_pallas_kernel_path_agrees_with_xla_path(params):
    """The engine on the Pallas kernels (interpret mode on CPU) gives the XLA path's greedy tokens."""
    prompts = mixed_prompts(3, seed=9)
    want = [o.token_ids for o in run(make_engine(params), prompts, [greedy(4)] * 3)]
    got = [o.token_ids for o in run(make_engine(params, attn_impl="pallas_interpret"), prompts, [greedy(4)] * 3)]
    assert got == want


def _full_logits(params, ids):
    """[len(ids), V] logits of a teacher-forced dense forward (an independent path from the engine's)."""
    import jax.numpy as jnp

    from model.llama import StepInputs, hidden_states, init_cache, logits_from_hidden

    n = len(ids)
    inputs = StepInputs(tokens=jnp.asarray(ids, jnp.int32), positions=jnp.arange(n, dtype=jnp.int32),
                        slot_mapping=jnp.full((n,), -1, jnp.int32), cu_q_lens=jnp.asarray([0, n], jnp.int32),
                        kv_lens=jnp.asarray([n], jnp.int32), block_tables=jnp.zeros((1, 1), jnp.int32),
                        num_seqs=jnp.asarray([1], jnp.int32), logits_indices=jnp.arange(n, dtype=jnp.int32))
    h, _ = hidden_states(params, init_cache(CFG, 1, 1), inputs, CFG, attn_impl="xla", dense_prefill_len=n)
    return np.asarray(logits_from_hidden(params, h, CFG))


def test_penalties_on_device_match_host_reference(params):
    """Penalty counts live on the device and are updated by the step; every greedy token must be the
    argmax of the vLLM penalty formula applied on the host to teacher-forced logits, also across
    preemption (counts rebuilt at readmission) and in a batch mixing rows with and without penalties."""
    prompts = mixed_prompts(10, seed=11)
    sps = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=1.5 + 0.1 * (i % 3),
                          frequency_penalty=0.4 * (i % 2), presence_penalty=0.3 if i % 3 else 0.0)
           if i % 4 != 3 else greedy(14) for i in range(10)]
    engine = make_engine(params, num_pages=30, max_num_seqs=6)
    outs = run(engine, prompts, sps)
    assert engine.scheduler.num_preemptions > 0
    for prompt, sp, out in zip(prompts, sps, outs):
        gen = out.token_ids
        logits = _full_logits(params, prompt + gen)[len(prompt) - 1:-1]
        for i, row in enumerate(logits):
            counts = np.bincount(gen[:i], minlength=CFG.vocab_size)
            seen = (counts > 0) | np.isin(np.arange(CFG.vocab_size), prompt)
            rep = sp.repetition_penalty
            row = np.where(seen, np.where(row > 0, row / rep, row * rep), row)
            row = row - sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0)
            assert row[gen[i]] >= row.max() - 1e-4, (i, gen[i], int(row.argmax()))


def test_multi_step_decode_identical_to_one_step_at_a_time(params):
    """num_decode_steps=4 (4 decode steps per device program, sampled tokens fed back on device, stops
    checked on the host afterwards) gives exactly the one-step loop's tokens, finish reasons and
    logprobs: greedy and seeded sampling, penalties, min_tokens, and stop tokens landing mid-block."""
    prompts = mixed_prompts(12, seed=21)
    g = lambda n, **kw: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)  # noqa: E731
    sps = [g(13), g(9, repetition_penalty=1.4, frequency_penalty=0.3, logprobs=2),
           SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=11, ignore_eos=True),
           SamplingParams(temperature=1.0, seed=6, max_tokens=15, presence_penalty=0.5, ignore_eos=True),
           g(10, min_tokens=6)] * 2 + [g(1), g(2)]
    plain = run(make_engine(params), prompts, sps)
    # Stop tokens taken from the plain outputs so that they fire in the middle of a 4-step block.
    for i in (0, 5, 7):
        sps[i] = dataclasses.replace(sps[i], stop_token_ids=[plain[i].token_ids[5]])
    plain_engine = make_engine(params)
    want = run(plain_engine, prompts, sps)
    engine = make_engine(params, num_decode_steps=4)
    got = run(engine, prompts, sps)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert sum(o.finish_reason == "stop" for o in want) >= 3
    for g, w in zip(got, want):
        if w.outputs[0].logprobs is not None:
            for dg, dw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                assert dg.keys() == dw.keys()
                np.testing.assert_allclose(list(dg.values()), list(dw.values()), atol=1e-5)
    assert engine.stats["steps"] < plain_engine.stats["steps"]  # blocks of several steps did run


def test_multi_step_decode_within_a_tight_token_budget(params):
    """A token budget below num_decode_steps x the running sequences: blocks shrink to what fits for all
    of them (here 2 steps), instead of steps that part-schedule the block or compute placeholder
    positions only to discard them; the tokens are the one-step loop's."""
    prompts = mixed_prompts(12, seed=22)
    sps = [SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True, repetition_penalty=1.2)
           for i in range(12)]
    plain_engine = make_engine(params, max_num_seqs=12, max_num_batched_tokens=24)
    want = run(plain_engine, prompts, sps)
    engine = make_engine(params, max_num_seqs=12, max_num_batched_tokens=24, num_decode_steps=4)
    got = run(engine, prompts, sps)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # Every position computed once: no forward over placeholders that were thrown away.
    assert engine.stats["tokens_computed"] == plain_engine.stats["tokens_computed"]
    assert engine.stats["steps"] < 0.7 * plain_engine.stats["steps"]  # 2-step blocks did run
