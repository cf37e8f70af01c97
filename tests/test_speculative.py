"""Tests for inference/speculative.py: proposers, exact verification, adaptive k, metrics.

The distribution-preservation tests are chi-square goodness-of-fit tests at significance level
ALPHA = 0.001 against the target's exact distribution, computed independently in numpy. All seeds
are fixed, so the tests are deterministic (a pass is not luck that can change between runs).
"""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference.sampler import BAN_PAD, STREAM_USER, SamplingTensors, sample
from inference.sampling_params import SamplingParams
from inference.speculative import (PAD_TOKEN, AdaptiveK, NgramProposer,
                                   SpecDecodeStats, acceptance_rate, draft_probs_to_proposal,
                                   mean_tokens_per_forward, verify)

ALPHA = 1e-3  # significance level of every chi-square test below


# ----------------------------------------------------------------------------- n-gram proposer


def _ngram_reference(h, k, min_n, max_n):
    """Brute force: longest n first, then the most recent earlier occurrence."""
    h = list(h)
    L = len(h)
    for n in range(max_n, min_n - 1, -1):
        if n >= L:
            continue
        suffix = h[L - n:]
        for start in range(L - n - 1, -1, -1):  # earlier occurrence: ends before the last token
            if h[start:start + n] == suffix:
                return h[start + n: start + n + k]
    return []


def test_ngram_repetition():
    assert NgramProposer(3).propose([1, 2, 3, 4, 1, 2, 3]).tolist() == [4, 1, 2]


def test_ngram_no_match():
    assert NgramProposer(3).propose([1, 2, 3, 4]).tolist() == []
    assert NgramProposer(3).propose([7]).tolist() == []
    assert NgramProposer(3).propose([]).tolist() == []
    assert NgramProposer(0).propose([1, 1, 1]).tolist() == []


def test_ngram_prefers_longest_match_then_most_recent():
    h = [5, 6, 7, 8, 9, 7, 0, 5, 6, 7]
    # The 3-gram [5, 6, 7] (followed by 8) beats the more recent 1-gram match [7] (followed by 0).
    assert NgramProposer(2, max_n=4).propose(h).tolist() == [8, 9]
    assert NgramProposer(2, max_n=1).propose(h).tolist() == [0, 5]
    # Among equally long matches the most recent one wins.
    assert NgramProposer(2).propose([1, 9, 1, 8, 1]).tolist() == [8, 1]
    # min_n: a 1-gram match is not enough when min_n = 2.
    assert NgramProposer(2, min_n=2).propose([1, 9, 3, 1]).tolist() == []
    assert NgramProposer(2, min_n=1).propose([1, 9, 3, 1]).tolist() == [9, 3]


def test_ngram_proposal_at_end_of_history_is_shorter():
    # [1, 2] matched at the start: only 3 tokens follow it.
    assert NgramProposer(5).propose([1, 2, 3, 1, 2]).tolist() == [3, 1, 2]
    # Per-call k overrides the default.
    assert NgramProposer(5).propose([1, 2, 3, 1, 2], k=1).tolist() == [3]


def test_ngram_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    for trial in range(300):
        h = rng.integers(0, 4, size=rng.integers(0, 30)).tolist()
        min_n, max_n = sorted(rng.integers(1, 5, size=2).tolist())
        k = int(rng.integers(1, 6))
        got = NgramProposer(k, min_n, max_n).propose(h).tolist()
        assert got == _ngram_reference(h, k, min_n, max_n), (h, k, min_n, max_n)


def test_ngram_speed_on_long_history():
    rng = np.random.default_rng(1)
    long = rng.integers(0, 50, size=4000)
    prop = NgramProposer(4)
    t0 = time.perf_counter()
    for _ in range(20):
        prop.propose(long)
    assert (time.perf_counter() - t0) / 20 < 0.02  # generous: ~0.1 ms expected
    assert prop.propose([1, 2, 1], k=2).tolist() == [2, 1] and prop.propose([3, 4]).size == 0


# ----------------------------------------------------------------------------- helpers


def _tensors(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0, presence=0.0,
             frequency=0.0, step=0, seed_offset=0):
    """SamplingTensors built directly (from_params loops in Python: slow for 20k rows)."""
    f = lambda v, dt: jnp.asarray(np.broadcast_to(np.asarray(v, dt), (B,)).copy())
    return SamplingTensors(
        f(temperature, np.float32), f(top_k, np.int32), f(top_p, np.float32), f(min_p, np.float32),
        f(rep, np.float32), f(presence, np.float32), f(frequency, np.float32),
        jnp.asarray(np.arange(B, dtype=np.uint32) + np.uint32(seed_offset)), f(0, np.uint32),
        f(STREAM_USER, np.uint32), f(step, np.uint32), jnp.full((B, 1), BAN_PAD, jnp.int32))


def _target_dist(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, counts=None, rep=1.0,
                 presence=0.0, frequency=0.0):
    """Independent numpy reference of the sampler's distribution for one row of logits."""
    x = np.asarray(logits, np.float64).copy()
    if counts is not None:
        seen = counts > 0
        x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
        x = x - frequency * counts - presence * seen
    x = x / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.ones_like(x, bool)
    if 0 < top_k < x.size:
        keep &= x >= x[order[top_k - 1]]
    if top_p < 1.0:
        z = np.where(keep, x, -np.inf)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        sorted_p = probs[order]
        mass_before = np.cumsum(sorted_p) - sorted_p
        kept = order[mass_before < top_p]
        keep &= np.isin(np.arange(x.size), kept) | (x >= x[kept].min())
    if min_p > 0:
        keep &= x >= x.max() + np.log(min_p)
    z = np.where(keep, x, -np.inf)
    p = np.exp(z - z.max())
    return p / p.sum()


def chi2_sf(x, df):
    """Survival function of the chi-square distribution, Q(df/2, x/2) (regularised upper gamma).

    Series for P when x/2 < a + 1, Lentz continued fraction for Q otherwise (Numerical Recipes
    6.2); both accurate to ~1e-14, so no scipy is needed.
    """
    a, z = df / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    log_prefactor = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:
        term = total = 1.0 / a
        n = 0
        while abs(term) > 1e-16 * abs(total):
            n += 1
            term *= z / (a + n)
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    tiny = 1e-300
    b = z + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return math.exp(log_prefactor) * h


def chi2_pvalue(observed, expected_probs, min_expected=5.0):
    """Pearson chi-square goodness of fit. Zero-probability cells must be empty (checked exactly);
    cells expected below `min_expected` are pooled into one so the chi-square approximation holds."""
    observed = np.asarray(observed, np.float64).reshape(-1)
    probs = np.asarray(expected_probs, np.float64).reshape(-1)
    n = observed.sum()
    assert observed[probs == 0].sum() == 0, "a token outside the target's support was emitted"
    expected = probs * n
    small = (expected < min_expected) & (probs > 0)
    big = expected >= min_expected
    obs = list(observed[big]) + ([observed[small].sum()] if small.any() else [])
    exp = list(expected[big]) + ([expected[small].sum()] if small.any() else [])
    obs, exp = np.array(obs), np.array(exp)
    stat = float(((obs - exp) ** 2 / exp).sum())
    return chi2_sf(stat, len(obs) - 1)


def test_chi2_sf_matches_tabulated_critical_values():
    # Upper 0.001 critical values of the chi-square distribution (standard tables).
    for df, crit in [(1, 10.828), (2, 13.816), (7, 24.322), (10, 29.588), (60, 99.607)]:
        assert chi2_sf(crit, df) == pytest.approx(1e-3, rel=2e-3)
    for x in (0.5, 2.0, 40.0, 500.0):  # df = 2 is exponential: sf = exp(-x / 2)
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10)
    assert chi2_sf(3.0, 40) == pytest.approx(1.0, abs=1e-12) and chi2_sf(1e4, 7) < 1e-100


# ----------------------------------------------------------------------------- greedy verify


def _sequential_reference(logits, drafts, num_draft, params, steps, counts0=None, eos=None):
    """What plain decoding does: `sample` each position in turn, accepting while it equals the guess."""
    B, K1, V = logits.shape
    acc, outs = [], []
    for b in range(B):
        counts = np.zeros(V, np.int32) if counts0 is None else counts0[b].copy()
        out = []
        for i in range(K1):
            t = SamplingTensors.from_params([params[b]], steps=[steps[b] + i], eos_token_id=eos)
            tok = int(sample(logits[b:b + 1, i], t, jnp.asarray(counts[None]), None).tokens[0])
            out.append(tok)
            if i >= num_draft[b] or tok != drafts[b, i]:
                break
            counts[tok] += 1
        acc.append(len(out) - 1)
        outs.append(out)
    return acc, outs


def test_greedy_verify_is_the_argmax_chain():
    rng = np.random.default_rng(2)
    B, K, V = 64, 4, 16
    logits = rng.normal(size=(B, K + 1, V)).astype(np.float32)
    argmax = logits.argmax(-1)
    # Guesses right up to a random break point, then wrong.
    drafts = argmax[:, :K].copy()
    brk = rng.integers(0, K + 1, size=B)
    for b in range(B):
        if brk[b] < K:
            drafts[b, brk[b]] = (argmax[b, brk[b]] + 1 + rng.integers(V - 1)) % V
    num_draft = rng.integers(0, K + 1, size=B)
    tensors = _tensors(B, temperature=0.0)
    out = verify(jnp.asarray(logits), jnp.asarray(drafts), None, jnp.asarray(num_draft), tensors)
    expected_acc = np.minimum(brk, num_draft)
    np.testing.assert_array_equal(out.accepted_counts, expected_acc)
    np.testing.assert_array_equal(out.num_output, expected_acc + 1)
    for b in range(B):
        n = expected_acc[b]
        assert out.output_tokens[b, : n + 1].tolist() == argmax[b, : n + 1].tolist()
        assert (np.asarray(out.output_tokens[b, n + 1:]) == PAD_TOKEN).all()
    # Draft probabilities are irrelevant for greedy rows.
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, K, V)), jnp.float32))
    out_q = verify(jnp.asarray(logits), jnp.asarray(drafts), q, jnp.asarray(num_draft), tensors)
    np.testing.assert_array_equal(out_q.output_tokens, out.output_tokens)


def test_greedy_with_penalties_and_min_tokens_matches_plain_decoding():
    """Guesses feed the penalty counts of later positions, and the min_tokens ban lifts mid-block,
    exactly as if the tokens had been decoded one at a time."""
    rng = np.random.default_rng(3)
    B, K, V = 6, 3, 8
    eos = 0
    logits = rng.normal(size=(B, K + 1, V)).astype(np.float32)
    logits[:, :, eos] += 2.0  # make eos tempting so the ban matters
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.7,
                             presence_penalty=0.5, min_tokens=2) for _ in range(B)]
    steps = [0, 1, 2, 0, 1, 3]
    counts0 = rng.integers(0, 2, size=(B, V)).astype(np.int32)
    # Guesses: plain-decoding tokens with one mistake, so positions past the first see penalties.
    drafts = np.zeros((B, K), np.int32)
    for b in range(B):
        # Re-run the reference with correct guesses so far to obtain the full greedy chain.
        chain = []
        counts = counts0[b].copy()
        for i in range(K + 1):
            t = SamplingTensors.from_params([params[b]], steps=[steps[b] + i], eos_token_id=eos)
            tok = int(sample(jnp.asarray(logits[b:b + 1, i]), t, jnp.asarray(counts[None]), None).tokens[0])
            chain.append(tok)
            counts[tok] += 1
        drafts[b] = chain[:K]
    drafts[1, 2] = (drafts[1, 2] + 1) % V
    drafts[4, 0] = (drafts[4, 0] + 1) % V
    num_draft = np.array([3, 3, 2, 1, 3, 0])
    acc, outs = _sequential_reference(logits, drafts, num_draft, params, steps, counts0, eos)
    tensors = SamplingTensors.from_params(params, steps=steps, eos_token_id=eos)
    ban_len = np.maximum(2 - np.array(steps), 0)
    out = verify(jnp.asarray(logits), jnp.asarray(drafts), None, jnp.asarray(num_draft), tensors,
                 token_counts=jnp.asarray(counts0), ban_len=jnp.asarray(ban_len))
    assert out.accepted_counts.tolist() == acc
    for b in range(B):
        assert out.output_tokens[b, : acc[b] + 1].tolist() == outs[b]
    assert acc == [3, 2, 2, 1, 0, 0]


def test_no_guesses_reproduces_the_sampler_bit_for_bit():
    rng = np.random.default_rng(4)
    B, K, V = 16, 3, 32
    params = [SamplingParams(temperature=0.0 if b % 4 == 0 else 0.7 + 0.1 * (b % 3), top_k=b % 5,
                             top_p=1.0 if b % 2 else 0.8, min_p=0.05 * (b % 3), seed=100 + b)
              for b in range(B)]
    steps = list(range(B))
    tensors = SamplingTensors.from_params(params, steps=steps)
    logits = jnp.asarray(rng.normal(size=(B, K + 1, V)) * 2, jnp.float32)
    drafts = jnp.asarray(rng.integers(0, V, size=(B, K)), jnp.int32)
    out = verify(logits, drafts, None, jnp.zeros(B, jnp.int32), tensors, num_logprobs=3)
    ref = sample(logits[:, 0], tensors, num_logprobs=3)
    np.testing.assert_array_equal(out.output_tokens[:, 0], ref.tokens)
    np.testing.assert_array_equal(out.output_tokens[:, 1:], PAD_TOKEN)
    np.testing.assert_allclose(out.chosen_logprob[:, 0], ref.chosen_logprob, rtol=1e-6)
    np.testing.assert_allclose(out.top_logprobs[:, 0], ref.top_logprobs, rtol=1e-6)
    np.testing.assert_array_equal(out.top_ids[:, 0], ref.top_ids)
    # K = 0 arrays (a batch where nobody speculates) work too.
    out0 = verify(logits[:, :1], drafts[:, :0], None, jnp.zeros(B, jnp.int32), tensors)
    np.testing.assert_array_equal(out0.output_tokens[:, 0], ref.tokens)


def test_rows_are_reproducible_and_independent_of_batch_position():
    rng = np.random.default_rng(5)
    B, K, V = 32, 3, 8
    logits = jnp.asarray(rng.normal(size=(B, K + 1, V)), jnp.float32)
    drafts = jnp.asarray(rng.integers(0, V, size=(B, K)), jnp.int32)
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, K, V)), jnp.float32))
    num_draft = jnp.asarray(rng.integers(0, K + 1, size=B), jnp.int32)
    tensors = _tensors(B, temperature=1.0, step=5)
    a = verify(logits, drafts, q, num_draft, tensors)
    b = verify(logits, drafts, q, num_draft, tensors)
    np.testing.assert_array_equal(a.output_tokens, b.output_tokens)
    perm = rng.permutation(B)
    permuted = jax.tree.map(lambda x: x[perm], tensors)
    c = verify(logits[perm], drafts[perm], q[perm], num_draft[perm], permuted)
    np.testing.assert_array_equal(c.output_tokens, np.asarray(a.output_tokens)[perm])
    # Explicit keys are honoured too.
    keys = jax.random.split(jax.random.key(0), B)
    d = verify(logits, drafts, q, num_draft, tensors, keys)
    e = verify(logits[perm], drafts[perm], q[perm], num_draft[perm], permuted, keys[perm])
    np.testing.assert_array_equal(e.output_tokens, np.asarray(d.output_tokens)[perm])


# ----------------------------------------------------------------------------- distribution preservation

N = 20000            # speculative steps per statistical test, vectorised as one batch
V_TOY, K_TOY = 8, 3  # toy vocab; every test uses K = 3 arrays (k = 2 rows via num_draft)
PREFIX = 3           # the token the toy request ends with


def _toy_tables(seed):
    """A tiny bigram "model": logits of the next token indexed by the previous token."""
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(V_TOY, V_TOY)) * 1.5
    draft = target + rng.normal(size=(V_TOY, V_TOY)) * 1.5  # related but clearly different
    return target.astype(np.float32), draft.astype(np.float32)


def _draw_drafts(rng, table, prev, k, temperature=1.0):
    """Guesses sampled in numpy from softmax(table[prev] / T): returns tokens [N, k] and q [N, k, V]."""
    toks, qs = [], []
    for _ in range(k):
        z = table[prev] / temperature
        q = np.exp(z - z.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        prev = (rng.random((len(prev), 1)) > np.cumsum(q, -1)).sum(-1).clip(0, V_TOY - 1)
        toks.append(prev)
        qs.append(q)
    return np.stack(toks, 1).astype(np.int32), np.stack(qs, 1).astype(np.float32)


def _spec_two_tokens(target, propose, tensors_kw, num_draft, penalties=False, rng_seed=0):
    """First two emitted tokens of N requests ending in PREFIX, via speculative steps.

    propose(prev [N], step) -> (draft_tokens [N, K], draft_probs [N, K, V] or None).
    A row whose first step emits a single token gets a second step (step = 1) for its second token.
    """
    first, second = None, None
    prev = np.full(N, PREFIX)
    counts = np.zeros((N, V_TOY), np.int32)
    for step in range(2):
        drafts, q = propose(prev, step)
        ctx = np.concatenate([prev[:, None], drafts], 1)  # token before each position
        logits = jnp.asarray(target[ctx])
        tensors = _tensors(N, step=step, seed_offset=rng_seed, **tensors_kw)
        extra = dict(token_counts=jnp.asarray(counts)) if penalties else {}
        out = verify(logits, jnp.asarray(drafts), None if q is None else jnp.asarray(q),
                     jnp.asarray(num_draft), tensors, **extra)
        toks, n_out = np.asarray(out.output_tokens), np.asarray(out.num_output)
        assert ((n_out >= 1) & (n_out <= np.asarray(num_draft) + 1)).all()
        if step == 0:
            first = toks[:, 0]
            second = np.where(n_out >= 2, toks[:, 1], -1)
            prev = first
            counts[np.arange(N), first] += 1
        else:
            second = np.where(second < 0, toks[:, 0], second)
    return first, second


def _check_two_token_distribution(target, first, second, dist_kw, penalties=False):
    p1 = _target_dist(target[PREFIX], **dist_kw)
    pair = np.zeros((V_TOY, V_TOY))
    for y in range(V_TOY):
        counts = np.eye(V_TOY, dtype=np.int64)[y] if penalties else None
        pair[y] = p1[y] * _target_dist(target[y], counts=counts, **dist_kw)
    assert chi2_pvalue(np.bincount(first, minlength=V_TOY), p1) > ALPHA
    assert chi2_pvalue(np.bincount(first * V_TOY + second, minlength=V_TOY ** 2), pair) > ALPHA
    return p1


@pytest.mark.parametrize("case", ["t1_k3", "t1_mixed_k", "filtered_k2"])
def test_rejection_sampling_preserves_target_distribution(case):
    target, draft = _toy_tables(10)
    rng = np.random.default_rng(11)
    dist_kw = dict(temperature=1.0)
    num_draft = np.full(N, 3)
    if case == "t1_mixed_k":
        num_draft = rng.integers(0, K_TOY + 1, size=N)  # per-row k 0..3 in one batch
    if case == "filtered_k2":
        dist_kw = dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.02)
        num_draft = np.full(N, 2)
    draft_T = dist_kw["temperature"]

    def propose(prev, step):
        # Unfiltered q: guesses outside the target's top-k/top-p support occur and must be rejected.
        return _draw_drafts(rng, draft, prev, K_TOY, draft_T)

    first, second = _spec_two_tokens(target, propose, dist_kw, num_draft)
    p1 = _check_two_token_distribution(target, first, second, dist_kw)

    if case != "filtered_k2":
        # Power check: the guesses themselves (the draft distribution) fail the same test decisively.
        guesses, _ = _draw_drafts(rng, draft, np.full(N, PREFIX), 1, draft_T)
        assert chi2_pvalue(np.bincount(guesses[:, 0], minlength=V_TOY), p1) < 1e-6


def test_deterministic_proposals_preserve_target_distribution_with_penalties():
    """n-gram style guesses (one-hot q, draft_probs=None), with penalties fed by the guesses."""
    target, _ = _toy_tables(20)

    def propose(prev, step):
        # A deterministic guess that repeats itself: the target's favourite next token, K times.
        # Repeats are what penalties act on, so later positions depend on the guesses' counts.
        guess = target[prev].argmax(-1)
        return np.repeat(guess[:, None], K_TOY, 1).astype(np.int32), None

    dist_kw = dict(temperature=1.0, rep=1.3, presence=0.4, frequency=0.6)
    first, second = _spec_two_tokens(target, propose, dist_kw, np.full(N, K_TOY), penalties=True,
                                     rng_seed=50_000)
    _check_two_token_distribution(target, first, second, dist_kw, penalties=True)


def test_sampled_draft_guesses_preserve_target_distribution():
    """Guesses drawn on device by draft_probs_to_proposal, autoregressively (keys derived like the sampler's,
    as spec_runner.DraftRunner draws them)."""
    target, draft = _toy_tables(30)
    draft_table = jnp.asarray(draft)
    dist_kw = dict(temperature=0.9, top_k=6)

    def propose(prev, step):
        tensors = _tensors(N, step=step, seed_offset=70_000, **dist_kw)
        tok, tokens, probs = jnp.asarray(prev, jnp.int32), [], []
        for i in range(K_TOY):
            tok, q = draft_probs_to_proposal(draft_table[tok], tensors, i)
            tokens.append(tok)
            probs.append(q)
        return np.stack(tokens, 1), np.stack(probs, 1)

    first, second = _spec_two_tokens(target, propose, dist_kw, np.full(N, K_TOY), rng_seed=70_000)
    _check_two_token_distribution(target, first, second, dist_kw)


# ----------------------------------------------------------------------------- draft helpers


def test_draft_probs_to_proposal():
    rng = np.random.default_rng(6)
    B, V = 8, 10
    logits = jnp.asarray(rng.normal(size=(B, V)) * 2, jnp.float32)
    tensors = _tensors(B, temperature=np.array([0.0, 1.0] * 4), top_k=3)
    tok, q = draft_probs_to_proposal(logits, tensors, 0)
    argmax = np.asarray(logits).argmax(-1)
    q = np.asarray(q)
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)
    assert (q[np.arange(B), np.asarray(tok)] > 0).all()
    assert ((q > 0).sum(-1)[1::2] == 3).all()                # top-k 3 on sampled rows
    np.testing.assert_array_equal(np.asarray(tok)[::2], argmax[::2])  # greedy rows: argmax, one-hot q
    np.testing.assert_array_equal(q[::2], np.eye(V)[argmax[::2]])
    g_tok, g_q = draft_probs_to_proposal(logits, tensors, 0, greedy=True)
    np.testing.assert_array_equal(g_tok, argmax)
    np.testing.assert_array_equal(g_q, np.eye(V)[argmax])


# ----------------------------------------------------------------------------- adaptive k


def test_adaptive_k_grows_with_high_acceptance():
    ak = AdaptiveK(k_max=5, k_init=1)
    for _ in range(10):
        k = ak.next_k()
        ak.update(k, k)  # everything accepted
    assert ak.next_k() == 5 and ak.alpha == 1.0


def test_adaptive_k_shrinks_disables_and_reprobes():
    ak = AdaptiveK(k_max=4, k_min=1, patience=3, probe_every=5)
    ks = []
    for _ in range(3):
        k = ak.next_k()
        ks.append(k)
        ak.update(k, 0)  # nothing accepted
    assert ks == [4, 3, 2]  # shrinks one step at a time...
    assert ak.disabled and ak.next_k() == 0  # ...and after `patience` bad steps turns speculation off
    # While disabled: k = 0 steps until the probe interval, then one probe with k_min.
    for _ in range(5):
        assert ak.next_k() == 0
        ak.update(0, 0)
    assert ak.next_k() == 1
    ak.update(1, 0)  # failed probe: stays off and waits for the next interval
    assert ak.disabled and ak.next_k() == 0
    for _ in range(5):
        ak.update(0, 0)
    assert ak.next_k() == 1
    ak.update(1, 1)
    ak.update(0, 0)  # e.g. the proposer found no match: no effect while enabled
    ak.update(1, 1)  # (a second success lifts the stale EMA past disable_below)
    assert not ak.disabled and ak.next_k() >= 1


def test_adaptive_k_alpha_estimate_does_not_depend_on_k():
    rng = np.random.default_rng(7)
    for k in (1, 5):
        ak = AdaptiveK(k_max=k, k_init=k, decay=0.995, grow_above=1.0, shrink_below=0.0, disable_below=0.0)
        for _ in range(3000):
            accepted = int(np.argmin(np.append(rng.random(k) < 0.6, False)))  # leading successes
            ak.update(k, accepted)
        assert ak.alpha == pytest.approx(0.6, abs=0.06)


# ----------------------------------------------------------------------------- metrics


def test_metrics():
    assert acceptance_rate([2, 0, 3], [3, 2, 3]) == pytest.approx(5 / 8)
    assert acceptance_rate([0], [0]) == 0.0
    assert mean_tokens_per_forward([3, 1, 4]) == pytest.approx(8 / 3)
    stats = SpecDecodeStats()
    stats.update(np.array([3, 2, 0]), np.array([2, 0, 0]))
    stats.update([1], [1], [2])
    assert (stats.num_steps, stats.num_draft_tokens, stats.num_accepted_tokens) == (4, 6, 3)
    assert stats.acceptance_rate == pytest.approx(0.5)
    assert stats.mean_tokens_per_forward == pytest.approx((3 + 1 + 1 + 2) / 4)
    assert stats.accepted_at_position == [2, 1, 0]
