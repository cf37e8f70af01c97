"""An exception or Ctrl-C anywhere in an engine step leaves the engine usable: the step is rolled back
(or, once the scheduler took its results, completed), the interrupted call's requests are aborted with
their pages freed, and what runs next equals a fresh engine. Also: KV pool sizing checked up front."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from inference.engine import Engine, EngineConfig
from inference.llm import LLM
from inference.sampling_params import SamplingParams
from model.config import PRESETS
from model.llama import init_params

CFG = dataclasses.replace(PRESETS["tiny"], num_heads=4, num_kv_heads=2, max_position_embeddings=256)
ENGINE_KW = dict(page_size=4, num_pages=40, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128,
                 attn_impl="xla")


class IdTokenizer:
    """LLM needs a tokenizer; prompts here are token ids, so only decode / eos are used."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(3))


def workload():
    """Prompts (some sharing a prefix) with greedy, penalised, seeded and logprobs sampling: a rolled-back
    step must not leak into penalty counts, seeded streams or logprobs."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, CFG.vocab_size, int(n)).tolist() for n in (3, 17, 9, 26, 1, 12)]
    prompts.append(prompts[1][:12] + [7])
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    params = [greedy, dataclasses.replace(greedy, max_tokens=20),
              SamplingParams(temperature=0.9, seed=11, max_tokens=14, ignore_eos=True),
              dataclasses.replace(greedy, repetition_penalty=1.5, frequency_penalty=0.5),
              dataclasses.replace(greedy, max_tokens=25), dataclasses.replace(greedy, logprobs=2),
              dataclasses.replace(greedy, max_tokens=9)]
    return prompts, params


def summary(out):
    c = out.outputs[0]
    logprobs = None if c.logprobs is None else [sorted(d.items()) for d in c.logprobs]
    return c.token_ids, c.finish_reason, logprobs


def make_engine(params, **kw):
    return Engine(CFG, params, tokenizer=None, engine_cfg=EngineConfig(**{**ENGINE_KW, **kw}))


def run_collecting(engine, got):
    engine.run(on_output=lambda o: got.__setitem__(o.request_id, summary(o)) if o.finished else None)


def assert_idle(engine):
    """Nothing queued or held: every page free (cached prefix pages count as free), every penalty slot back."""
    assert not engine.has_unfinished_requests() and not engine._requests
    assert engine.allocator.num_free == engine.allocator.num_pages
    assert sorted(engine._free_slots) == list(range(engine.engine_cfg.max_num_seqs))


class Fault(Exception):
    pass


def inject(monkeypatch, obj, name, nth, exc, after=False, then=None):
    """Makes obj.name raise `exc` on its nth call: before running it, or after (then `then()` first)."""
    original = getattr(obj, name)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            raise exc
        out = original(*args, **kwargs)
        if calls[0] == nth:
            if then is not None:
                then()
            raise exc
        return out

    monkeypatch.setattr(obj, name, wrapped)


def _lose_cache(engine):
    # The step program consumed (donated) the pool, but its result never reached runner.cache.
    for a in jax.tree.leaves(engine.runner.cache):
        a.delete()


# (object, attribute, raise after it ran) for each point of a step. The engine calls `tokens_left` once per
# sampling row while the step's tokens are taken in, so a fault there stops output processing half way.
FAULT_POINTS = {
    "propose": (lambda e: e, "_attach_lookahead", False),
    "inside_schedule": (lambda e: e.scheduler, "_allocate_pages", False),
    "before_device": (lambda e: e.runner, "_run", False),
    "after_device": (lambda e: e.runner, "_run", True),
    "cache_lost": (lambda e: e.runner, "_run", True),
    # Each emitted token's stop checks (also inside the batched checks of a step's one-token rows).
    "output_processing": (lambda e: sys.modules["inference.stop"].StopChecker, "_take", False),
    "before_commit": (lambda e: e.scheduler, "update_from_output", False),
    "after_commit": (lambda e: e.scheduler, "update_from_output", True),
}


@pytest.fixture(scope="module")
def reference(params):
    prompts, sps = workload()
    engine = make_engine(params)
    ids = [engine.add_request(None, p, sp, stream=False) for p, sp in zip(prompts, sps)]
    final = engine.run()
    return [summary(final[i]) for i in ids]


@pytest.mark.parametrize("point", list(FAULT_POINTS))
@pytest.mark.parametrize("exc,overlap", [(KeyboardInterrupt, False), (Fault, False), (KeyboardInterrupt, True)],
                         ids=["interrupt", "fault", "interrupt_overlapped"])
def test_fault_anywhere_in_a_step_rolls_it_back(params, reference, monkeypatch, point, exc, overlap):
    """With overlap (async_scheduling) the pending step, whose tokens were not read yet, is part of it."""
    prompts, sps = workload()
    engine = make_engine(params, async_scheduling=overlap)
    ids = [engine.add_request(None, p, sp, stream=False) for p, sp in zip(prompts, sps)]
    target, name, after = FAULT_POINTS[point]
    nth = 9 if point == "output_processing" else 4  # a few steps in: decodes, prefills and a prefix hit mixed
    inject(monkeypatch, target(engine), name, nth, exc(), after,
           then=(lambda: _lose_cache(engine)) if point == "cache_lost" else None)
    got = {}
    with pytest.raises(exc):
        run_collecting(engine, got)
    monkeypatch.undo()
    run_collecting(engine, got)  # the same engine, same requests: they carry on
    want = dict(zip(ids, reference))
    if point == "after_commit":
        # The scheduler had taken the step's results: the step stands, but the outputs of requests it
        # finished were never returned (LLM.generate aborts such a call's requests anyway).
        assert len(got) >= len(ids) - 4 and all(got[i] == want[i] for i in got)
    else:
        assert got == want
    if point == "cache_lost":
        assert engine.scheduler.num_preemptions > 0  # recomputed into a fresh pool
    assert_idle(engine)


@pytest.mark.slow  # compiles the multi-step and verify programs
@pytest.mark.parametrize("engine_kw", [dict(num_decode_steps=4),
                                       dict(speculative=dict(method="ngram", num_speculative_tokens=3))],
                         ids=["multi_step", "ngram_spec"])
@pytest.mark.parametrize("point", ["after_device", "output_processing"])
def test_fault_with_lookahead_or_drafts_rolls_back(params, monkeypatch, engine_kw, point):
    """Multi-step lookahead placeholders and speculative drafts are part of the step and go with it."""
    prompts, sps = workload()
    fresh = make_engine(params, **engine_kw)
    reference = [fresh.add_request(None, p, sp, stream=False) for p, sp in zip(prompts, sps)]
    final = fresh.run()
    reference = [summary(final[i]) for i in reference]
    engine = make_engine(params, **engine_kw)
    ids = [engine.add_request(None, p, sp, stream=False) for p, sp in zip(prompts, sps)]
    target, name, after = FAULT_POINTS[point]
    got = {}
    for nth in (3, 8):  # twice in one run
        inject(monkeypatch, target(engine), name, nth, KeyboardInterrupt(), after)
        with pytest.raises(KeyboardInterrupt):
            run_collecting(engine, got)
        monkeypatch.undo()
    run_collecting(engine, got)
    assert got == dict(zip(ids, reference))
    assert_idle(engine)


def tiny_llm(params, **kw):
    return LLM(_loaded=(CFG, params, IdTokenizer()), dtype="float32", unroll_layers=False, **{**ENGINE_KW, **kw})


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
def test_interrupted_generate_then_next_generate_matches_a_fresh_llm(params, monkeypatch, overlap):
    prompts, sps = workload()
    fresh = tiny_llm(params)
    want = [o.outputs[0].token_ids for o in fresh.generate(prompts, sps)]
    llm = tiny_llm(params, async_scheduling=overlap)
    for nth, after in ((2, False), (5, True), (9, False)):
        inject(monkeypatch, llm.engine.runner, "_run", nth, KeyboardInterrupt(), after)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, sps)
        monkeypatch.undo()
        assert llm.stats()["num_running"] == llm.stats()["num_waiting"] == 0  # the call's requests are gone
        assert_idle(llm.engine)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sps)] == want
    # A stream interrupted in a step is aborted too; the next one is complete.
    inject(monkeypatch, llm.engine.runner, "_run", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        for _ in llm.generate_stream(prompts[1], sps[1]):
            pass
    monkeypatch.undo()
    assert_idle(llm.engine)
    streamed = [t for d in llm.generate_stream(prompts[1], sps[1]) for t in d.token_ids]
    assert streamed == want[1]


_SIGINT_CHILD = textwrap.dedent("""
    import dataclasses, json, signal, sys
    # A parent started in the background (`cmd &` in a script) passes SIGINT on as ignored: take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import jax
    from inference.llm import LLM
    from inference.sampling_params import SamplingParams
    from tests.test_interrupts import CFG, ENGINE_KW, IdTokenizer
    from model.llama import init_params

    llm = LLM(_loaded=(CFG, init_params(CFG, jax.random.key(3)), IdTokenizer()), dtype="float32",
              unroll_layers=False, **ENGINE_KW)
    short = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    prompts = [[5, 6, 7], [9] * 20, [1, 2]]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, short)]
    llm.generate(prompts, long)  # compiles what the loop below runs
    print("ready", flush=True)
    calls = 0
    try:
        while True:
            llm.generate(prompts, long)
            calls += 1
    except KeyboardInterrupt:
        pass
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, short)]
    stats = llm.stats()
    print(json.dumps({"same": got == want, "calls": calls, "running": stats["num_running"],
                      "waiting": stats["num_waiting"], "pages_free": stats["pages_free"],
                      "num_pages": llm.engine.allocator.num_pages}), flush=True)
""")


def test_real_sigint_during_generate_then_generate_works():
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]), "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", _SIGINT_CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    watchdog = threading.Timer(240, child.kill)  # bounds the readline below too
    watchdog.start()
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(0.5)  # inside generate(): the loop has no other place to be
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"same": True, "calls": result["calls"], "running": 0, "waiting": 0,
                      "pages_free": result["num_pages"], "num_pages": result["num_pages"]}


# ------------------------------------------------------------------ KV pool sizing
def test_pool_smaller_than_an_explicit_max_model_len_is_refused(params):
    with pytest.raises(ValueError, match=r"2 pages of 4 tokens holds 8 tokens.*max_model_len=64.*16 pages"):
        make_engine(params, num_pages=2, max_model_len=64)


def test_pool_smaller_than_the_model_context_lowers_max_model_len(params):
    with pytest.warns(UserWarning, match="lowering max_model_len to 24"):
        engine = make_engine(params, num_pages=6, max_model_len=None)  # the model's 256
    assert engine.engine_cfg.max_model_len == 24
    with pytest.raises(ValueError, match="max_model_len=24"):
        engine.add_request(None, list(range(1, 30)), SamplingParams(max_tokens=4))
    # A request never outgrows the pool now: it ends at the (lowered) context with its tokens.
    rid = engine.add_request(None, [3, 4, 5], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    out = engine.run()[rid].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (21, "length")
    assert_idle(engine)


def test_request_outgrowing_the_pool_returns_its_tokens(params):
    """If the pool still runs out mid-run (here: pages held outside the scheduler), the request ends with
    what it generated, finish_reason "length" and a stop_reason naming the KV pool."""
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    fresh = make_engine(params, num_pages=16, max_model_len=64)
    rid = fresh.add_request(None, list(range(1, 11)), sp)
    want = fresh.run()[rid].outputs[0].token_ids
    engine = make_engine(params, num_pages=16, max_model_len=64)
    held = engine.allocator.allocate_many(10)  # 6 pages (24 tokens) left for the request
    rid = engine.add_request(None, list(range(1, 11)), sp)
    out = engine.run()[rid].outputs[0]
    assert out.finish_reason == "length" and "KV pool" in out.stop_reason
    assert len(out.token_ids) == 24 - 10 + 1 and out.token_ids == want[:len(out.token_ids)]
    engine.allocator.free_all(held)
    assert_idle(engine)


@pytest.mark.slow  # compiles the draft programs
def test_interrupt_after_draft_proposal_rebuilds_the_lost_pool(params, monkeypatch):
    """The draft proposal runs on the device with the draft's pool donated: interrupted after it ran but before
    its new pool was stored, that pool is gone; the engine rebuilds both pools and recomputes every request."""
    from inference import spec_runner

    spec = dict(method="draft", num_speculative_tokens=3, draft_num_layers=1)
    prompts, sps = workload()
    fresh = make_engine(params, speculative=spec)
    ids = [fresh.add_request(None, p, sp, stream=False) for p, sp in zip(prompts, sps)]
    final = fresh.run()
    want = {i: summary(final[i]) for i in ids}
    engine = make_engine(params, speculative=spec)
    ids = [engine.add_request(None, p, sp, stream=False) for p, sp in zip(prompts, sps)]
    programs = spec_runner._propose_fn

    class Interrupted:  # the 3rd proposal program runs (consuming the donated pool), then the interrupt comes
        calls = 0

        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *args):
            out = self.fn(*args)
            Interrupted.calls += 1
            if Interrupted.calls == 3:
                raise KeyboardInterrupt()
            return out

    monkeypatch.setattr(spec_runner, "_propose_fn", lambda *key: Interrupted(programs(*key)))
    got = {}
    with pytest.raises(KeyboardInterrupt):
        run_collecting(engine, got)
    monkeypatch.undo()
    assert engine.runner.cache is not None and not engine.runner.cache_lost()
    run_collecting(engine, got)
    # Greedy requests give the same tokens (recomputed KV differs from the first one by float rounding,
    # which can move logprobs and the draws of the seeded request, as any recompute under speculation).
    greedy = [i for i, sp in zip(ids, sps) if sp.temperature == 0]
    assert [got[i][0] for i in greedy] == [w[0] for i, w in zip(ids, want.values()) if i in greedy]
    assert set(got) == set(ids) and engine.scheduler.num_preemptions > 0
    assert_idle(engine)
