import random

import numpy as np
import pytest

from inference.kv_pool import BlockAllocator
from inference.scheduler import Scheduler, SequenceStatus


def next_token(history):
    """The toy model: a deterministic function of the whole token history."""
    return hash(tuple(int(t) for t in history)) % 100


class ToyRunner:
    """Stands in for the device runner: consumes `to_step_arrays`, writes (position, token) into a fake paged
    KV cache through slot_mapping, and computes each sampled row's token from the history it *reads back*
    through block_tables. Wrong slots, block tables, prefix hits or preemption bookkeeping change outputs."""

    def __init__(self, num_pages, page_size, draft_fn=None):
        self.page_size = page_size
        self.kv = np.full((num_pages * page_size, 2), -1, np.int64)   # (position, token) per slot
        self.draft_fn = draft_fn                                       # history -> proposed drafts
        self.steps = []

    def read_history(self, block_table, upto):
        ps = self.page_size
        slots = [block_table[j // ps] * ps + j % ps for j in range(upto + 1)]
        pos, tok = self.kv[slots, 0], self.kv[slots, 1]
        assert (pos == np.arange(upto + 1)).all(), "KV read back at the wrong position"
        return tok.tolist()

    def step(self, out):
        a = out.to_step_arrays(pad_tokens_to=out.num_batched_tokens + 3, pad_seqs_to=len(out.scheduled) + 1,
                               pad_pages_to=64)
        self.steps.append((out, a))
        valid = a["slot_mapping"] >= 0
        self.kv[a["slot_mapping"][valid]] = np.stack([a["positions"][valid], a["tokens"][valid]], axis=1)
        # Map logits rows back to sequences via cu_q_lens.
        seq_of_row = np.searchsorted(a["cu_q_lens"], np.arange(len(a["tokens"])), side="right") - 1
        preds = [next_token(self.read_history(a["block_tables"][seq_of_row[r]], a["positions"][r]))
                 for r in a["logits_indices"]]
        sampled, row = {}, 0
        for (rid, n), s in zip(out.sampling_layout, [s for s in out.scheduled if s.samples]):
            p = preds[row:row + n]
            row += n
            drafts = s.token_ids[len(s.token_ids) - s.num_draft_tokens:]
            accepted = 0   # greedy verification: keep drafts while they match the model
            while accepted < len(drafts) and drafts[accepted] == p[accepted]:
                accepted += 1
            sampled[rid] = drafts[:accepted] + [p[accepted]]
        return sampled


def reference_output(prompt, n):
    hist = list(prompt)
    for _ in range(n):
        hist.append(next_token(hist))
    return hist[len(prompt):]


def run(sched, runner, max_steps=5000, check=None, before_step=None):
    """Drive the scheduler to completion; returns {request_id: finished Sequence}."""
    done = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return done
        if before_step:
            before_step(sched)
        out = sched.schedule()
        if check:
            check(sched, out)
        for seq in out.failed + out.out_of_pool:
            done[seq.request_id] = seq
        for seq in sched.update_from_output(runner.step(out)):
            done[seq.request_id] = seq
    raise AssertionError("scheduler did not finish (deadlock?)")


def make(num_pages=64, page_size=4, max_num_seqs=8, budget=32, max_model_len=256, chunked=True, caching=True):
    alloc = BlockAllocator(num_pages, page_size, enable_prefix_caching=caching)
    return Scheduler(alloc, max_num_seqs, budget, max_model_len, enable_chunked_prefill=chunked), \
        ToyRunner(num_pages, page_size)


def random_prompts(n, lo, hi, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(100) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


# ----- basic contract -----------------------------------------------------------------------------------------

def test_single_request_matches_reference():
    sched, runner = make()
    sched.add_request("a", [1, 2, 3, 4, 5, 6, 7], max_tokens=10)
    done = run(sched, runner)
    assert done["a"].output_token_ids == reference_output([1, 2, 3, 4, 5, 6, 7], 10)
    assert done["a"].finish_reason == "length"
    assert sched.allocator.num_free == sched.allocator.num_pages  # everything released


def test_token_budget_and_max_num_seqs_respected_every_step():
    sched, runner = make(num_pages=256, budget=20, max_num_seqs=5)
    prompts = random_prompts(12, 3, 40, seed=1)
    for i, p in enumerate(prompts):
        sched.add_request(f"r{i}", p, max_tokens=8)

    def check(s, out):
        assert out.num_batched_tokens <= 20
        assert len(out.scheduled) <= 5 and len(s.running) <= 5
        assert len({x.request_id for x in out.scheduled}) == len(out.scheduled)

    done = run(sched, runner, check=check)
    for i, p in enumerate(prompts):
        assert done[f"r{i}"].output_token_ids == reference_output(p, 8)


def test_chunked_prefill_across_steps():
    sched, runner = make(budget=16)
    prompt = list(range(50))
    sched.add_request("long", prompt, max_tokens=3)
    chunks = []
    for _ in range(4):
        out = sched.schedule()
        (s,) = out.scheduled
        chunks.append((s.num_computed_tokens, s.num_new_tokens, s.samples, s.kv_len))
        assert s.positions == list(range(s.num_computed_tokens, s.kv_len))
        assert s.token_ids == prompt[s.num_computed_tokens:s.kv_len]
        sched.update_from_output(runner.step(out))
    assert chunks == [(0, 16, False, 16), (16, 16, False, 32), (32, 16, False, 48), (48, 2, True, 50)]
    assert len(sched.get_request("long").output_token_ids) == 1
    done = run(sched, runner)
    assert done["long"].output_token_ids == reference_output(prompt, 3)


def test_without_chunking_prompt_waits_for_a_whole_step():
    alloc = BlockAllocator(64, 4)
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(alloc, 4, 16, 64, enable_chunked_prefill=False)
    sched = Scheduler(alloc, 4, 64, 64, enable_chunked_prefill=False)
    runner = ToyRunner(64, 4)
    sched.add_request("a", list(range(10)), max_tokens=5)
    sched.update_from_output(runner.step(sched.schedule()))
    sched.add_request("b", list(range(100, 160)), max_tokens=2)
    out = sched.schedule()       # budget 64 - 1 decode = 63 >= 60: b fits whole
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 60)]
    sched.update_from_output(runner.step(out))
    sched.add_request("c", list(range(200, 263)), max_tokens=2)
    out = sched.schedule()       # 64 - 2 decodes = 62 < 63: c must not be chunked, it waits
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 1)]
    assert [s.request_id for s in sched.update_from_output(runner.step(out))] == ["b"]
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("c", 63)]
    (c,) = sched.update_from_output(runner.step(out))   # 64 tokens = max_model_len: done
    assert c.output_token_ids == reference_output(list(range(200, 263)), 1) and c.finish_reason == "length"


def test_decodes_prioritised_then_chunked_prefill_then_waiting():
    sched, runner = make(budget=8)
    sched.add_request("a", [1, 2, 3], max_tokens=20)
    sched.update_from_output(runner.step(sched.schedule()))          # a prefilled, now decoding
    sched.add_request("b", list(range(30)), max_tokens=5)              # long prompt: chunked
    sched.add_request("c", [5, 6], max_tokens=5)
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    sched.update_from_output(runner.step(out))
    out = sched.schedule()
    # Decode first, then b's continuing chunk takes the rest; c still waits (FCFS behind b).
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    assert sched.get_request("c").status is SequenceStatus.WAITING
    sched.update_from_output(runner.step(out))
    done = run(sched, runner)
    assert done["b"].output_token_ids == reference_output(list(range(30)), 5)


def test_fcfs_admission_order():
    sched, runner = make(num_pages=256, budget=8, max_num_seqs=2)
    prompts = random_prompts(6, 2, 12, seed=3)
    for i, p in enumerate(prompts):
        sched.add_request(f"r{i}", p, max_tokens=3)
    first_scheduled = []

    def check(s, out):
        for x in out.scheduled:
            if x.request_id not in first_scheduled:
                first_scheduled.append(x.request_id)

    run(sched, runner, check=check)
    assert first_scheduled == [f"r{i}" for i in range(6)]


def test_requests_join_and_leave_each_step():
    sched, runner = make(budget=64)
    prompts = random_prompts(8, 2, 10, seed=4)
    done = {}
    for step in range(200):
        if step < len(prompts):
            sched.add_request(f"r{step}", prompts[step], max_tokens=1 + step % 4)
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        if step < len(prompts):
            assert f"r{step}" in [s.request_id for s in out.scheduled]   # joins the very next step
        for seq in sched.update_from_output(runner.step(out)):
            done[seq.request_id] = seq
            assert seq.block_table == [] and seq not in sched.running
    assert len(done) == len(prompts)
    for i, p in enumerate(prompts):
        assert done[f"r{i}"].output_token_ids == reference_output(p, 1 + i % 4)
    assert sched.allocator.num_free == sched.allocator.num_pages


def test_caller_finishes_requests():
    sched, runner = make()
    sched.add_request("a", [1, 2, 3])
    sched.add_request("b", [4, 5, 6])
    out = sched.schedule()
    done = sched.update_from_output(runner.step(out), finished=["a"])
    assert [s.request_id for s in done] == ["a"] and done[0].finish_reason == "stop"
    assert len(done[0].output_token_ids) == 1
    assert sched.abort("b") and not sched.abort("b")
    assert not sched.has_unfinished_requests()
    assert sched.allocator.num_free == sched.allocator.num_pages


def test_abort_while_step_in_flight():
    sched, runner = make()
    sched.add_request("a", [1, 2, 3], max_tokens=5)
    sched.add_request("b", [4, 5, 6], max_tokens=5)
    out = sched.schedule()
    sampled = runner.step(out)
    sched.abort("a")
    sched.update_from_output(sampled)
    assert sched.get_request("b").output_token_ids == reference_output([4, 5, 6], 1)
    run(sched, runner)


# ----- preemption -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("caching", [True, False])
def test_preemption_keeps_outputs_identical(caching):
    prompts = random_prompts(10, 5, 30, seed=5)
    max_tokens = [20 + 3 * i for i in range(10)]
    # Small pool: 24 pages of 4 tokens = 96 tokens for 10 requests of up to ~60 tokens each.
    sched, runner = make(num_pages=24, page_size=4, max_num_seqs=10, budget=32, caching=caching)
    for i, p in enumerate(prompts):
        sched.add_request(f"r{i}", p, max_tokens=max_tokens[i])
    done = run(sched, runner, check=lambda s, out: _check_pages(s))
    assert sched.num_preemptions > 0
    assert sum(seq.num_preemptions for seq in done.values()) == sched.num_preemptions
    for i, p in enumerate(prompts):
        alone, alone_runner = make(num_pages=512)
        alone.add_request("x", p, max_tokens=max_tokens[i])
        expected = run(alone, alone_runner)["x"].output_token_ids
        assert expected == reference_output(p, max_tokens[i])
        assert done[f"r{i}"].output_token_ids == expected, f"r{i}"
        assert done[f"r{i}"].error is None
    assert sched.allocator.num_free == sched.allocator.num_pages


def _check_pages(sched):
    # No page is used by two sequences unless it is a shared cached prefix page.
    seen = {}
    for seq in sched.running:
        for p in seq.block_table:
            if p in seen:
                assert sched.allocator.is_cached(p)
            seen[p] = seq.request_id
    for seq in sched.waiting:
        assert seq.block_table == []


def test_preempted_request_goes_to_front_of_waiting():
    sched, runner = make(num_pages=6, page_size=2, max_num_seqs=4, budget=16)
    sched.add_request("old", [1, 2, 3], max_tokens=50)
    sched.add_request("new", [4, 5, 6], max_tokens=50)
    sched.add_request("later", [7, 8, 9], max_tokens=1)
    for _ in range(20):
        out = sched.schedule()
        if out.preempted_request_ids:
            break
        sched.update_from_output(runner.step(out))
    assert out.preempted_request_ids == ["new"]        # the most recently arrived running request
    assert sched.waiting[0].request_id == "new"
    assert sched.get_request("new").status is SequenceStatus.PREEMPTED
    sched.update_from_output(runner.step(out))


def test_request_too_big_for_pool_fails_without_deadlock():
    sched, runner = make(num_pages=4, page_size=4, max_num_seqs=4, budget=32, max_model_len=100)
    sched.add_request("huge", list(range(20)), max_tokens=2)       # 5 pages > 4
    sched.add_request("grows", [1, 2, 3], max_tokens=30)            # fits, then outgrows the pool
    sched.add_request("ok", [9, 9], max_tokens=3)
    done = run(sched, runner)
    assert done["huge"].finish_reason == "error"
    assert "length 20" in done["huge"].error and "only 4 pages of 4 tokens" in done["huge"].error
    # Outgrowing the pool mid-run keeps what it generated: finish_reason "length", the message names the pool.
    assert done["grows"].finish_reason == "length" and "only 4 pages" in done["grows"].error
    assert len(done["grows"].output_token_ids) == 16 - 3 + 1   # generated until the 16 KV slots ran out
    assert done["grows"].output_token_ids == reference_output([1, 2, 3], 14)
    assert done["ok"].output_token_ids == reference_output([9, 9], 3)
    assert sched.num_failed == 1 and sched.num_out_of_pool == 1


def test_prompt_longer_than_max_model_len_rejected():
    sched, _ = make(max_model_len=32)
    with pytest.raises(ValueError, match="prompt length 33 exceeds max_model_len=32"):
        sched.add_request("x", list(range(33)))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request("y", [])
    sched.add_request("z", [1])
    with pytest.raises(ValueError, match="already exists"):
        sched.add_request("z", [1])


def test_max_model_len_finishes_with_length():
    sched, runner = make(max_model_len=12)
    sched.add_request("a", list(range(8)))
    done = run(sched, runner)
    assert done["a"].finish_reason == "length" and done["a"].num_tokens == 12
    assert max(a["kv_lens"].max() for _, a in runner.steps) <= 12


# ----- prefix caching ---------------------------------------------------------------------------------------

def test_prefix_cache_hits_for_shared_prefix():
    sched, runner = make(num_pages=128, page_size=4, budget=64)
    system = random_prompts(1, 40, 41, seed=6)[0]     # 40-token shared prefix = 10 pages
    sched.add_request("first", system + [1, 2, 3], max_tokens=4)
    done = run(sched, runner)
    hits_before = sched.allocator.stats.prefix_hits
    sched.add_request("second", system + [7, 8], max_tokens=4)
    sched.add_request("third", system + [5], max_tokens=4)
    done.update(run(sched, runner))
    assert done["second"].num_cached_tokens == 40 and done["third"].num_cached_tokens == 40
    assert sched.allocator.stats.prefix_hits - hits_before == 20
    assert sched.allocator.stats.prefix_tokens_saved >= 80
    # The toy runner read the shared pages back: outputs are still exact.
    assert done["second"].output_token_ids == reference_output(system + [7, 8], 4)
    assert done["third"].output_token_ids == reference_output(system + [5], 4)
    # Prefill of "second" only computed its suffix.
    second_steps = [s for out, _ in runner.steps for s in out.scheduled if s.request_id == "second"]
    assert second_steps[0].num_computed_tokens == 40 and second_steps[0].num_new_tokens == 2


def test_concurrent_identical_prompts_share_after_registration():
    sched, runner = make(num_pages=64, page_size=4, budget=64)
    prompt = list(range(17))
    sched.add_request("a", prompt, max_tokens=6)
    sched.add_request("b", prompt, max_tokens=6)       # same step: no hit yet, duplicates stay private
    done = run(sched, runner)
    assert done["a"].output_token_ids == done["b"].output_token_ids == reference_output(prompt, 6)


# ----- speculative decoding / rollback ----------------------------------------------------------------------

def test_speculative_drafts_are_verified_and_rejected_kv_dropped():
    sched, runner = make(num_pages=64, page_size=4, budget=64)
    prompt = [3, 1, 4, 1, 5]
    sched.add_request("a", prompt, max_tokens=30)
    rng = random.Random(0)

    def propose(s):
        for seq in s.running:
            if seq.is_decoding:
                # A draft model that is right ~70% of the time per token.
                hist, drafts = list(seq.all_token_ids), []
                for _ in range(3):
                    t = next_token(hist) if rng.random() < 0.7 else 100 + rng.randrange(10)
                    drafts.append(t)
                    hist.append(t)
                s.set_draft_tokens(seq.request_id, drafts)

    done = run(sched, runner, before_step=propose)
    assert done["a"].output_token_ids == reference_output(prompt, 30)
    spec_steps = [s for out, _ in runner.steps for s in out.scheduled if s.num_draft_tokens]
    assert spec_steps and all(s.num_logits_rows == 1 + s.num_draft_tokens for s in spec_steps)
    assert len(runner.steps) < 30   # accepted drafts saved steps
    assert sched.allocator.num_free == sched.allocator.num_pages


def test_speculative_logits_indices_cover_all_draft_rows():
    sched, runner = make()
    sched.add_request("a", [1, 2, 3], max_tokens=10)
    sched.add_request("b", [4, 5], max_tokens=10)
    sched.update_from_output(runner.step(sched.schedule()))
    sched.set_draft_tokens("a", [7, 7, 7])
    out = sched.schedule()
    a = out.to_step_arrays()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 4), ("b", 1)]
    assert a["logits_indices"].tolist() == [0, 1, 2, 3, 4]
    assert out.sampling_layout == [("a", 4), ("b", 1)]
    seq = sched.get_request("a")
    pages_before = list(seq.block_table)
    # Reject all drafts: KV back to 3 tokens + no draft pages kept beyond what 4 tokens need.
    sched.update_from_output({"a": [11], "b": [12]})
    assert seq.output_token_ids[-1] == 11 and seq.num_computed_tokens == seq.num_tokens - 1 == 4
    assert seq.block_table == pages_before[:1]
    sched.schedule()
    with pytest.raises(ValueError, match="expected 1..1"):
        sched.update_from_output({"a": [1, 2], "b": [3]})
    with pytest.raises(ValueError, match="no sampled token for request 'b'"):
        sched.update_from_output({"a": [1]})
    assert seq.num_computed_tokens == 4          # the bad calls changed nothing
    sched.update_from_output({"a": [1], "b": [3]})
    assert seq.num_computed_tokens == 5 and seq.output_token_ids[-1] == 1


def test_to_step_arrays_shapes_and_padding():
    sched, runner = make(page_size=4, budget=32)
    sched.add_request("a", list(range(10)), max_tokens=5)
    sched.add_request("b", [1, 2, 3], max_tokens=5)
    out = sched.schedule()
    a = out.to_step_arrays(pad_tokens_to=16, pad_seqs_to=4, pad_pages_to=8, pad_logits_to=4)
    assert {k: v.shape for k, v in a.items()} == {
        "tokens": (16,), "positions": (16,), "slot_mapping": (16,), "cu_q_lens": (5,), "kv_lens": (4,),
        "block_tables": (4, 8), "num_seqs": (1,), "logits_indices": (4,)}
    assert all(v.dtype == np.int32 for v in a.values())
    assert a["tokens"][:13].tolist() == list(range(10)) + [1, 2, 3]
    assert a["positions"][:13].tolist() == list(range(10)) + [0, 1, 2]
    assert (a["slot_mapping"][13:] == -1).all() and (a["slot_mapping"][:13] >= 0).all()
    assert a["cu_q_lens"].tolist() == [0, 10, 13, 13, 13]
    assert a["kv_lens"].tolist() == [10, 3, 0, 0]
    assert a["num_seqs"].tolist() == [2]
    assert a["logits_indices"][:2].tolist() == [9, 12]
    ta, tb = out.scheduled[0].block_table, out.scheduled[1].block_table
    assert a["block_tables"][0, :3].tolist() == ta and a["block_tables"][1, :1].tolist() == tb
    assert a["slot_mapping"][5] == ta[1] * 4 + 1
    exact = out.to_step_arrays()
    assert exact["tokens"].shape == (13,) and exact["block_tables"].shape == (2, 3)
    with pytest.raises(ValueError, match="pad_tokens_to=8 is smaller than the step's size 13"):
        out.to_step_arrays(pad_tokens_to=8)
    sched.update_from_output(runner.step(out))
    with pytest.raises(RuntimeError):
        sched.schedule()
        sched.schedule()


def test_empty_step():
    sched, _ = make()
    out = sched.schedule()
    assert out.is_empty
    a = out.to_step_arrays(pad_tokens_to=8, pad_seqs_to=2)
    assert a["num_seqs"].tolist() == [0] and (a["slot_mapping"] == -1).all()
    assert sched.update_from_output({}) == []


# ----- randomized stress ------------------------------------------------------------------------------------

def _check_invariants(sched):
    alloc = sched.allocator
    refs = {}
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert seq.num_computed_tokens <= seq.num_tokens - 1 or not seq.output_token_ids
        assert len(seq.block_table) == -(-seq.num_computed_tokens // alloc.page_size)
        for p in seq.block_table:
            refs[p] = refs.get(p, 0) + 1
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    for p in range(alloc.num_pages):
        assert alloc.ref_count(p) == refs.get(p, 0), f"page {p} refcount"
    assert alloc.num_used == len(refs)


@pytest.mark.parametrize("seed", range(8))
def test_random_workloads_match_reference(seed):
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 8])
    num_pages = rng.randrange(48, 160) // page_size + 8
    max_model_len = min(64, num_pages * page_size)
    budget = rng.choice([8, 16, 64])
    chunked = budget < max_model_len or rng.random() < 0.5
    sched = Scheduler(BlockAllocator(num_pages, page_size, enable_prefix_caching=rng.random() < 0.8),
                      rng.randrange(1, 7), budget, max_model_len, enable_chunked_prefill=chunked)
    runner = ToyRunner(num_pages, page_size)
    shared = [rng.randrange(100) for _ in range(rng.randrange(0, 20))]
    expected, done, aborted = {}, {}, set()
    use_drafts = rng.random() < 0.5
    for step in range(3000):
        if step < 40 and rng.random() < 0.5:
            rid = f"r{step}"
            prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(100) for _ in range(rng.randrange(1, 25))]
            prompt = prompt[:max_model_len - 1]
            n = rng.randrange(1, max_model_len - len(prompt) + 1)
            sched.add_request(rid, prompt, max_tokens=n)
            expected[rid] = reference_output(prompt, n)
        elif step >= 40 and not sched.has_unfinished_requests():
            break
        if sched.running and rng.random() < 0.03:
            victim = rng.choice(sched.running).request_id
            sched.abort(victim)
            aborted.add(victim)
        for seq in list(sched.running):
            if use_drafts and seq.is_decoding:
                hist, drafts = list(seq.all_token_ids), []
                for _ in range(rng.randrange(0, 4)):
                    t = next_token(hist) if rng.random() < 0.7 else rng.randrange(100)
                    drafts.append(t)
                    hist.append(t)
                sched.set_draft_tokens(seq.request_id, drafts)
        out = sched.schedule()
        assert out.num_batched_tokens <= budget and len(sched.running) <= sched.max_num_seqs
        for seq in out.failed + out.out_of_pool:
            done[seq.request_id] = seq
        for seq in sched.update_from_output(runner.step(out)):
            done[seq.request_id] = seq
        _check_invariants(sched)
    else:
        raise AssertionError("did not finish")
    assert sched.allocator.num_free == sched.allocator.num_pages
    for rid, want in expected.items():
        if rid in aborted:
            continue
        seq = done[rid]
        assert seq.error is None, seq.error
        got = seq.output_token_ids
        assert got == want, rid


def test_colliding_prefix_hashes_never_serve_foreign_kv():
    """Every page gets the same hash: the toy runner reads KV back through the block tables, so a foreign
    page served as a prefix hit would change the outputs."""
    alloc = BlockAllocator(128, 4, hash_fn=lambda parent, tokens: b"collision")
    sched, runner = Scheduler(alloc, 8, 64, 256), ToyRunner(128, 4)
    prompts = random_prompts(6, 9, 30, seed=11)
    for i, p in enumerate(prompts):
        sched.add_request(f"r{i}", p, max_tokens=6)
        done = run(sched, runner)   # one at a time, so each later prompt could hit earlier pages
        assert done[f"r{i}"].output_token_ids == reference_output(p, 6)
        assert done[f"r{i}"].num_cached_tokens == 0


@pytest.mark.parametrize("caching", [True, False])
def test_cancelled_steps_change_no_output_and_free_their_pages(caching):
    """An interrupted step (schedule() and the device write done, update_from_output never called) is
    cancelled: the KV it wrote is never read (the toy runner checks every read), outputs equal the
    reference, and every page is free at the end. Covers admissions, chunked prefill, drafts, preemption."""
    sched, runner = make(num_pages=12, page_size=4, max_num_seqs=4, budget=12, caching=caching)
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randrange(100) for _ in range(rng.randrange(1, 30))] for i in range(8)}
    prompts["shared"] = prompts["r0"][:9] + [5]
    lens = {rid: rng.randrange(1, 15) for rid in prompts}
    for rid, p in prompts.items():
        sched.add_request(rid, p, max_tokens=lens[rid])
    done, cancelled = {}, 0
    for _ in range(2000):
        if not sched.has_unfinished_requests():
            break
        for seq in sched.running:
            if seq.is_decoding and rng.random() < 0.5:
                hist, drafts = list(seq.all_token_ids), []
                for _ in range(2):
                    drafts.append(next_token(hist) if rng.random() < 0.7 else 100 + rng.randrange(10))
                    hist.append(drafts[-1])
                sched.set_draft_tokens(seq.request_id, drafts)
        out = sched.schedule()
        done.update({seq.request_id: seq for seq in out.failed + out.out_of_pool})
        sampled = runner.step(out)  # the device wrote this step's KV ...
        if rng.random() < 0.3:
            sched.cancel_step()     # ... and then the step was interrupted
            cancelled += 1
            continue
        done.update({seq.request_id: seq for seq in sched.update_from_output(sampled)})
    assert cancelled > 10 and sched.num_preemptions > 0
    assert {rid: s.output_token_ids for rid, s in done.items()} == \
        {rid: reference_output(p, lens[rid]) for rid, p in prompts.items()}
    assert sched.allocator.num_free == sched.allocator.num_pages


def test_cancel_step_repairs_a_request_caught_between_the_queues():
    """An interrupt inside schedule() can leave an admitted request out of both queues with pages."""
    sched, runner = make(num_pages=16, page_size=4)
    sched.add_request("a", [1, 2, 3, 4, 5, 6], max_tokens=4)
    seq = sched.waiting.popleft()   # schedule() stopped right after taking it from the queue
    seq.block_table = sched.allocator.allocate_many(2)
    sched.cancel_step()
    assert sched.allocator.num_free == 16 and list(sched.waiting) == [seq]
    assert run(sched, runner)["a"].output_token_ids == reference_output([1, 2, 3, 4, 5, 6], 4)
