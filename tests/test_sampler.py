"""Sampler tests against numpy references written in vLLM's own terms.

Shapes are kept to a handful ([B, 64], [20000/100000, 8], [15000, 300], [20000, 700]) so that
the jitted sampler compiles only a few times on CPU. Small vocabularies rarely reach past the
sampler's TOP_CANDIDATES, so tests of the exact fallback shrink it (`shrink_candidates`).
"""
import jax
import numpy as np
import pytest

from inference import sampler
from inference.sampler import (
    BAN_PAD, STREAM_ENGINE, SamplingTensors, apply_penalties, categorical, filter_mask, first_argmax,
    request_key, row_keys, sample)
from inference.sampling_params import SamplingParams
from pallas_kernels import cpu_top_k
from test_speculative import chi2_pvalue

V = 64


def _logits(b, v=V, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((b, v)) * scale).astype(np.float32)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# numpy references (vLLM formulation)

def ref_penalties(logits, counts, prompt_mask, rep, presence, frequency):
    out = np.array(logits, np.float64)
    b_, v_ = out.shape
    for b in range(b_):
        for v in range(v_):
            if prompt_mask[b, v] or counts[b, v] > 0:
                out[b, v] = out[b, v] / rep[b] if out[b, v] > 0 else out[b, v] * rep[b]
            out[b, v] -= frequency[b] * counts[b, v] + presence[b] * (counts[b, v] > 0)
    return out


def _ref_top_k_top_p(s_row, top_k, top_p):
    """vLLM's apply_top_k_top_p (ascending sort) on one row: [V] bool of the tokens it keeps."""
    v_ = s_row.shape[0]
    asc = np.argsort(s_row, kind="stable")
    s = np.array(s_row[asc], np.float64)
    k = v_ if top_k <= 0 else min(top_k, v_)
    s = np.where(s < s[v_ - k], -np.inf, s)
    cum = np.cumsum(_softmax(s))
    cut = cum <= 1.0 - top_p
    cut[-1] = False
    s = np.where(cut, -np.inf, s)
    keep = np.zeros(v_, bool)
    keep[asc] = np.isfinite(s)
    return keep


def _ref_min_p(s_row, min_p):
    probs = _softmax(s_row)
    return probs >= min_p * probs.max()


def ref_keep(scaled_row, top_k, top_p, min_p):
    """vLLM V1 for one row: the min-p processor, then apply_top_k_top_p on its survivors."""
    survivors = _ref_min_p(scaled_row, min_p)
    return _ref_top_k_top_p(np.where(survivors, scaled_row, -np.inf), top_k, top_p) & survivors


def ref_keep_v0(scaled_row, top_k, top_p, min_p):
    """vLLM V0 _apply_top_k_top_p (ascending sort) followed by _apply_min_p, for one row."""
    keep = _ref_top_k_top_p(scaled_row, top_k, top_p)
    probs = _softmax(np.where(keep, scaled_row, -np.inf))
    return keep & (probs >= min_p * probs.max())


def ref_keep_by_value(scaled_row, top_k, top_p, min_p):
    """The sampler's tie rule (a descending sort of the min-p survivors, cut-offs as values: tokens
    tied with the last kept one are all kept); equals `ref_keep` on rows without ties."""
    v_ = scaled_row.shape[0]
    survivors = _ref_min_p(scaled_row, min_p)
    s = np.sort(np.where(survivors, np.asarray(scaled_row, np.float64), -np.inf))[::-1]
    k = v_ if top_k <= 0 else min(top_k, v_)
    in_k = s >= s[k - 1]
    probs = np.where(in_k, np.exp(s - s[0]), 0.0)
    probs /= probs.sum()
    in_p = (np.cumsum(probs) - probs < top_p) | (top_p >= 1.0)
    return survivors & (scaled_row >= s[max(int((in_k & in_p).sum()), 1) - 1])


@pytest.fixture(params=["bisection", "cpu_kernel"])
def shrink_candidates(request, monkeypatch):
    """shrink(width, chunk_rows): narrows the top-k/top-p candidates (and the fallback chunk) so that
    most rows of a small vocab need the exact fallback; returns a fresh jit of `sample` traced with
    them. Each test runs with both fallbacks: the bisection (XLA, every backend) and the CPU kernels
    (pallas_kernels/cpu_top_k.py: candidates and cut-offs), which must give the same cut-offs."""
    kernels = request.param == "cpu_kernel"
    if kernels and not cpu_top_k.kernel_available():
        pytest.skip("the CPU kernel library is not available here")
    monkeypatch.setattr(sampler, "_selection_kernels", lambda: kernels)

    def shrink(width=4, chunk_rows=3):
        monkeypatch.setattr(sampler, "TOP_CANDIDATES", width)
        monkeypatch.setattr(sampler, "FALLBACK_ROWS", chunk_rows)

        # A new function object: JAX caches traces per function, so jit(sample.__wrapped__) could
        # reuse a trace made with the default constants.
        def traced_sample(logits, tensors, num_logprobs=0):
            return sample.__wrapped__(logits, tensors, num_logprobs=num_logprobs)

        return jax.jit(traced_sample, static_argnames=("num_logprobs",))

    return shrink


# ---------------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = _logits(8)
    t = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * 8)
    out = sample(logits, t)
    np.testing.assert_array_equal(np.asarray(out.tokens), logits.argmax(-1))
    assert out.tokens.dtype == np.int32


def test_greedy_rows_in_mixed_batch_and_top_k_1():
    logits = _logits(8, seed=1)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.7, top_k=1), SamplingParams(temperature=1.0, top_p=0.5)] * 2
    out = np.asarray(sample(logits, SamplingTensors.from_params(params)).tokens)
    for i in (0, 2, 4, 6):
        assert out[i] == logits[i].argmax()


def test_penalties_match_numpy_reference():
    b = 6
    rng = np.random.default_rng(2)
    logits = _logits(b, seed=2)
    counts = rng.integers(0, 4, size=(b, V)).astype(np.int32) * (rng.random((b, V)) < 0.3)
    prompt_mask = rng.random((b, V)) < 0.3
    rep = [1.0, 1.3, 0.8, 2.0, 1.0, 1.1]
    pres = [0.0, 0.5, -0.5, 1.0, 2.0, 0.0]
    freq = [0.0, 0.3, 0.2, -1.0, 0.0, 1.5]
    params = [SamplingParams(temperature=0.0, repetition_penalty=r, presence_penalty=p,
                             frequency_penalty=f) for r, p, f in zip(rep, pres, freq)]
    t = SamplingTensors.from_params(params)
    ref = ref_penalties(logits, counts, prompt_mask, rep, pres, freq)

    got = jax.jit(apply_penalties)(logits, t, counts.astype(np.int32), prompt_mask)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-5)
    # End to end: greedy rows take the argmax of the penalised logits.
    out = sample(logits, t, counts.astype(np.int32), prompt_mask)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.argmax(-1))
    # Penalties must not leak into the returned (raw) logprobs.
    np.testing.assert_allclose(np.asarray(out.chosen_logprob),
                               _log_softmax(logits)[np.arange(b), ref.argmax(-1)], atol=1e-5)


def test_repetition_penalty_semantics_by_hand():
    logits = np.array([[2.0, -2.0, 2.0, -2.0, 0.5]], np.float32)
    counts = np.array([[1, 0, 0, 0, 0]], np.int32)        # token 0 in output
    prompt = np.array([[False, True, False, False, False]])  # token 1 in prompt
    t = SamplingTensors.from_params([SamplingParams(repetition_penalty=2.0)])
    got = np.asarray(apply_penalties(logits, t, counts, prompt))
    np.testing.assert_allclose(got, [[1.0, -4.0, 2.0, -2.0, 0.5]])


def test_min_tokens_bans_stop_tokens_until_reached():
    logits = np.zeros((2, V), np.float32)
    logits[:, 2] = 10.0   # eos is the favourite
    logits[:, 5] = 9.0    # then the stop token
    logits[:, 7] = 8.0
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    before = SamplingTensors.from_params([p, p], steps=[0, 2], eos_token_id=2)
    np.testing.assert_array_equal(np.asarray(sample(logits, before).tokens), [7, 7])
    after = SamplingTensors.from_params([p, SamplingParams(temperature=0.0)], steps=[3, 0],
                                        eos_token_id=2)
    np.testing.assert_array_equal(np.asarray(sample(logits, after).tokens), [2, 2])
    # ignore_eos: eos is not a stop token, so it is not banned; the stop id still is.
    q = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5], ignore_eos=True)
    t = SamplingTensors.from_params([q], eos_token_id=[2, 9])
    assert np.asarray(t.banned_ids).tolist() == [[5]]
    t = SamplingTensors.from_params([p], eos_token_id=[2, 9])
    assert np.asarray(t.banned_ids).tolist() == [[5, 2, 9, BAN_PAD]]


def _mixed_filter_params(b, seed):
    rng = np.random.default_rng(seed)
    top_k = rng.choice([0, -1, 1, 2, 5, 20, V, V + 10], size=b)
    top_p = rng.choice([1.0, 0.95, 0.8, 0.5, 0.1], size=b)
    min_p = rng.choice([0.0, 0.0, 0.05, 0.3], size=b)
    return [SamplingParams(top_k=int(k), top_p=float(p), min_p=float(m))
            for k, p, m in zip(top_k, top_p, min_p)]


def test_filter_mask_matches_vllm_reference():
    b = 64
    scaled = _logits(b, seed=3)
    params = _mixed_filter_params(b, seed=3)
    keep = np.asarray(jax.jit(filter_mask)(scaled, SamplingTensors.from_params(params)))
    for i, p in enumerate(params):
        np.testing.assert_array_equal(keep[i], ref_keep(scaled[i], p.top_k, p.top_p, p.min_p),
                                      err_msg=f"row {i}: {p}")
    # The batch tells V1 from V0: rows where the nucleus over the min-p survivors is smaller.
    v0 = [ref_keep_v0(scaled[i], p.top_k, p.top_p, p.min_p) for i, p in enumerate(params)]
    assert sum((keep[i] != v0[i]).any() for i in range(b)) >= 3


def test_min_p_comes_before_top_p_as_in_vllm_v1():
    # probs 0.4, 0.3, 0.1 x 3: min_p 0.3 keeps {0, 1}; top_p 0.5 over those (0.57, 0.43) keeps {0}.
    # V0 took the nucleus over all tokens first ({0, 1}: 0.4 < 0.5), then min-p, keeping {0, 1}.
    scaled = np.log(np.array([[0.4, 0.3, 0.1, 0.1, 0.1]], np.float32))
    params = [SamplingParams(top_p=0.5, min_p=0.3)]
    keep = np.asarray(filter_mask(scaled, SamplingTensors.from_params(params)))
    np.testing.assert_array_equal(keep[0], [True, False, False, False, False])
    np.testing.assert_array_equal(ref_keep_v0(scaled[0], 0, 0.5, 0.3), [True, True, False, False, False])


def test_filter_mask_without_sorting_rows_keeps_all_but_min_p():
    scaled = _logits(4, seed=4)
    t = SamplingTensors.from_params([SamplingParams(), SamplingParams(top_k=-1),
                                     SamplingParams(min_p=0.2), SamplingParams(top_k=V)])
    keep = np.asarray(filter_mask(scaled, t))
    assert keep[[0, 1, 3]].all()
    np.testing.assert_array_equal(keep[2], ref_keep(scaled[2], 0, 1.0, 0.2))



def test_filter_mask_past_the_candidates_matches_vllm_reference(shrink_candidates):
    # 4 candidates: rows with top_k in (5, 20) or a nucleus of > 4 tokens need the bisection;
    # top_k 5/20 with a tiny nucleus are settled from bounds on the top-k mass.
    shrink_candidates(width=4, chunk_rows=3)
    b = 64
    scaled = _logits(b, seed=11)
    params = _mixed_filter_params(b, seed=11)
    keep = np.asarray(jax.jit(lambda s, t: filter_mask(s, t))(scaled, SamplingTensors.from_params(params)))
    refs = [ref_keep(scaled[i], p.top_k, p.top_p, p.min_p) for i, p in enumerate(params)]
    # The test data really needs the fallback: 4 candidates cannot settle these rows.
    top_k = np.asarray(SamplingTensors.from_params(params).top_k)
    with np.errstate(divide="ignore"):  # min_p = 0: log(0) = -inf, no floor
        min_p_cutoff = scaled.max(-1) + np.log(np.array([p.min_p for p in params], np.float32))
    _, settled, _, _ = sampler._candidate_threshold(scaled, np.where(top_k <= 0, V, np.minimum(top_k, V)),
                                                    np.array([p.top_p for p in params], np.float32),
                                                    min_p_cutoff, 4)
    assert (~np.asarray(settled)).sum() >= 12
    for i in range(b):
        np.testing.assert_array_equal(keep[i], refs[i], err_msg=f"row {i}: {params[i]}")


@pytest.mark.parametrize("width", [4, 256])
def test_filter_mask_ties_keep_every_token_tied_with_the_cutoff(shrink_candidates, width):
    shrink_candidates(width=width, chunk_rows=5)
    b = 48
    scaled = np.round(_logits(b, seed=12)) / 2  # many ties, also at the cut-offs
    params = _mixed_filter_params(b, seed=12)
    keep = np.asarray(jax.jit(lambda s, t: filter_mask(s, t))(scaled, SamplingTensors.from_params(params)))
    for i, p in enumerate(params):
        np.testing.assert_array_equal(keep[i], ref_keep_by_value(scaled[i], p.top_k, p.top_p, p.min_p),
                                      err_msg=f"row {i}: {p}")


@pytest.mark.parametrize("v", [V, 700])  # one block; several blocks with a padded last one
def test_first_argmax_equals_argmax(v):
    x = np.round(_logits(8, v=v, seed=13))  # ties: the first maximum wins
    x[1] = -np.inf
    x[2, [3, v - 9]] = np.nan
    x[3, 5] = np.inf
    x[4, [v - 1, v - 2]] = 100.0  # maximum in the padded block
    x[5, [10, v - 1]] = 100.0     # tie across blocks
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(x)), np.argmax(x, axis=-1))

# Six filter settings x 20k draws each, all in one [120000, 8] batch (a single compile).
DIST_CASES = [
    dict(top_k=3),
    dict(top_p=0.7),
    dict(min_p=0.2),
    dict(top_k=5, top_p=0.8, min_p=0.05, temperature=0.7),
    dict(temperature=1.5),
    dict(top_p=0.8, min_p=0.25),  # V1's nucleus over the min-p survivors: 3 tokens (V0: 4)
]
N_DRAWS = 20_000
TV_TOL = 0.02  # expected TV for 20k draws over <= 8 outcomes is < 0.008


def test_filtered_sampling_support_and_distribution():
    row = np.array([2.0, 1.5, 1.1, 0.7, 0.2, -0.3, -1.0, -2.0], np.float32)
    v = row.shape[0]
    params, steps = [], []
    for c, case in enumerate(DIST_CASES):
        # One seeded request observed at 20k different steps: also checks that folding in the
        # step gives independent draws.
        p = SamplingParams(seed=1234 + c, **case)
        params += [p] * N_DRAWS
        steps += range(N_DRAWS)
    logits = np.broadcast_to(row, (len(params), v))
    tokens = np.asarray(sample(logits, SamplingTensors.from_params(params, steps=steps)).tokens)
    for c, case in enumerate(DIST_CASES):
        temp = case.get("temperature", 1.0)
        scaled = row / temp
        keep = ref_keep(scaled, case.get("top_k", 0), case.get("top_p", 1.0), case.get("min_p", 0.0))
        expected = np.where(keep, _softmax(np.where(keep, scaled, -np.inf)), 0.0)
        got = tokens[c * N_DRAWS:(c + 1) * N_DRAWS]
        assert set(np.unique(got)) == set(np.flatnonzero(keep)), case  # exact support
        emp = np.bincount(got, minlength=v) / N_DRAWS
        tv = 0.5 * np.abs(emp - expected).sum()
        assert tv < TV_TOL, (case, tv, emp, expected)



def test_categorical_matches_softmax_across_blocks():
    # 700 tokens: blocks of 256, 256 and a padded 188; the middle block and a few tokens excluded.
    v, n = 700, 20_000
    logits = _logits(1, v=v, seed=14, scale=2.0)[0]
    logits[256:512] = -np.inf
    logits[[0, 600, 699]] = -np.inf
    keys = jax.random.split(jax.random.key(14), n)
    tokens = np.asarray(jax.jit(categorical)(keys, np.broadcast_to(logits, (n, v))))
    expected = _softmax(logits)
    assert chi2_pvalue(np.bincount(tokens, minlength=v), expected) > 1e-4
    assert set(np.unique(tokens)) <= set(np.flatnonzero(expected > 0))


FALLBACK_CASES = [
    dict(top_p=0.8),
    dict(top_k=40),
    dict(top_k=60, top_p=0.9, min_p=0.01, temperature=0.7),
]


def test_sampling_past_the_candidates_support_and_distribution(shrink_candidates):
    # Cut-offs past 4 candidates, 2 draw blocks: every case takes the bisection fallback.
    sample_fn = shrink_candidates(width=4, chunk_rows=4096)
    v, n = 300, 5_000
    row = _logits(1, v=v, seed=15, scale=1.5)[0]
    params, steps = [], []
    for c, case in enumerate(FALLBACK_CASES):
        params += [SamplingParams(seed=77 + c, **case)] * n
        steps += range(n)
    logits = np.broadcast_to(row, (len(params), v))
    tokens = np.asarray(sample_fn(logits, SamplingTensors.from_params(params, steps=steps)).tokens)
    for c, case in enumerate(FALLBACK_CASES):
        scaled = row / case.get("temperature", 1.0)
        keep = ref_keep(scaled, case.get("top_k", 0), case.get("top_p", 1.0), case.get("min_p", 0.0))
        assert keep.sum() > 8, case  # deeper than the candidates
        expected = np.where(keep, _softmax(np.where(keep, scaled, -np.inf)), 0.0)
        got = tokens[c * n:(c + 1) * n]
        assert set(np.unique(got)) == set(np.flatnonzero(keep)), case  # exact support
        assert chi2_pvalue(np.bincount(got, minlength=v), expected) > 1e-4, case

def _request_tokens(batch_size, row, other_params, request, logits_row, n_steps=12, sample_fn=sample):
    """Tokens of `request` sitting at `row` of a batch filled with `other_params`."""
    logits = _logits(batch_size, seed=7)
    logits[row] = logits_row
    out = []
    for step in range(n_steps):
        params = list(other_params[:batch_size])
        params[row] = request
        steps = [step + 3 * i for i in range(batch_size)]
        steps[row] = step
        t = SamplingTensors.from_params(params, steps=steps, fallback_seeds=list(range(batch_size)))
        out.append(int(sample_fn(logits, t, num_logprobs=2).tokens[row]))
    return out


@pytest.mark.parametrize("request_kwargs", [dict(temperature=1.3), dict(temperature=0.9, top_p=0.95)])
def test_seeded_request_independent_of_batch_composition(request_kwargs):
    request = SamplingParams(seed=42, **request_kwargs)
    logits_row = _logits(1, seed=8, scale=1.0)[0]
    # Batch 1: nothing but the request. Batch 5: neighbours force the sort branch, one is greedy.
    others = [SamplingParams(top_k=3, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(top_p=0.5), SamplingParams(min_p=0.1), SamplingParams(seed=9)]
    alone = _request_tokens(1, 0, others, request, logits_row)
    in_batch = _request_tokens(5, 3, others, request, logits_row)
    assert alone == in_batch
    assert len(set(alone)) > 1  # the step really changes the draw
    assert alone == _request_tokens(1, 0, others, request, logits_row)  # reproducible



def test_seeded_request_past_the_candidates_independent_of_batch(shrink_candidates):
    # With 2 candidates the request (top_p 0.95) and most neighbours take the bisection fallback in
    # chunks of 2 rows; the request still gets the same tokens alone, in a batch, and as with the
    # full candidate width (where its cut-off is found without the fallback).
    request = SamplingParams(seed=43, temperature=0.9, top_p=0.95)
    logits_row = _logits(1, seed=16, scale=1.0)[0]
    others = [SamplingParams(top_k=5, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(top_p=0.5), SamplingParams(min_p=0.1), SamplingParams(top_k=9, top_p=0.9)]
    wide = _request_tokens(1, 0, others, request, logits_row)
    sample_fn = shrink_candidates(width=2, chunk_rows=2)
    alone = _request_tokens(1, 0, others, request, logits_row, sample_fn=sample_fn)
    in_batch = _request_tokens(5, 3, others, request, logits_row, sample_fn=sample_fn)
    assert alone == in_batch == wide
    assert len(set(alone)) > 1

def test_pad_to_does_not_change_tokens():
    logits = _logits(5, seed=9)
    params = [SamplingParams(seed=s, temperature=1.0) for s in range(5)]
    a = np.asarray(sample(logits, SamplingTensors.from_params(params)).tokens)
    padded = np.concatenate([logits, np.zeros((3, V), np.float32)])
    t = SamplingTensors.from_params(params, pad_to=8)
    b = np.asarray(sample(padded, t).tokens)
    np.testing.assert_array_equal(a, b[:5])
    assert np.asarray(t.temperature)[5:].tolist() == [0.0] * 3


def test_seeds_and_keys():
    params = [SamplingParams(seed=s) for s in (1, 2, 1 + 2**32, -1)] + [SamplingParams()]
    t = SamplingTensors.from_params(params, steps=[0, 0, 0, 4, 2], fallback_seeds=[0, 0, 0, 0, 1])
    keys = row_keys(t)
    expected = [request_key(1, 0), request_key(2, 0), request_key(1 + 2**32, 0),
                request_key(-1, 4), request_key(1, 2, stream=STREAM_ENGINE)]
    for got, want in zip(keys, expected):
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
    # 64-bit seeds, seed 1 vs the engine's seed 1, all give distinct keys.
    data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}
    assert len(data) == 5
    draws = np.stack([np.asarray(sample(np.zeros((4, V), np.float32),
                                        SamplingTensors.from_params([SamplingParams(seed=s)] * 4,
                                                                    steps=range(4))).tokens)
                      for s in (1, 2)])
    assert (draws[0] != draws[1]).any()


def test_unseeded_requests_get_fresh_randomness():
    logits = np.zeros((4, V), np.float32)
    params = [SamplingParams()] * 4
    a = np.asarray(sample(logits, SamplingTensors.from_params(params)).tokens)
    b = np.asarray(sample(logits, SamplingTensors.from_params(params)).tokens)
    assert (a != b).any()
    # ...unless the engine pins a fallback seed per request.
    pinned = [SamplingTensors.from_params(params, fallback_seeds=[5, 6, 7, 8]) for _ in range(2)]
    np.testing.assert_array_equal(sample(logits, pinned[0]).tokens, sample(logits, pinned[1]).tokens)


def test_logprobs_are_raw_sorted_top_k():
    b, k = 4, 5
    logits = _logits(b, seed=10)
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.5, seed=0),
              SamplingParams(temperature=0.0, presence_penalty=1.0),
              SamplingParams(top_k=3, seed=1), SamplingParams(min_p=0.3, temperature=2.0, seed=2)]
    counts = np.zeros((b, V), np.int32)
    counts[:, :10] = 1
    out = sample(logits, SamplingTensors.from_params(params), counts, counts > 0, num_logprobs=k)
    ref = _log_softmax(logits)
    top_lp, top_ids = np.asarray(out.top_logprobs), np.asarray(out.top_ids)
    assert top_lp.shape == (b, k) and top_ids.shape == (b, k) and top_ids.dtype == np.int32
    assert (np.diff(top_lp, axis=-1) <= 0).all()
    np.testing.assert_array_equal(top_ids, np.argsort(-ref, axis=-1)[:, :k])
    np.testing.assert_allclose(top_lp, np.take_along_axis(ref, top_ids, -1), atol=1e-5)
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(np.asarray(out.chosen_logprob), ref[np.arange(b), tokens], atol=1e-5)

    none = sample(logits, SamplingTensors.from_params(params), num_logprobs=0)
    assert none.top_logprobs.shape == (b, 0) and none.top_ids.shape == (b, 0)
    np.testing.assert_allclose(np.asarray(none.chosen_logprob), ref[np.arange(b), np.asarray(none.tokens)], atol=1e-5)
    # No logprobs at all: the same tokens (the draw never reads them), chosen logprobs not computed.
    skipped = sample(logits, SamplingTensors.from_params(params), num_logprobs=None)
    np.testing.assert_array_equal(np.asarray(skipped.tokens), np.asarray(none.tokens))
    assert skipped.top_ids.shape == (b, 0) and not np.asarray(skipped.chosen_logprob).any()


# ---------------------------------------------------------------------------------------------
# logit_bias, allowed_token_ids, bad_words: vLLM V1's processors, against a plain numpy sampler

def ref_bad_word_bans(words, history):
    """vLLM's _apply_bad_words_single_batch: ban a word's last token when the history ends with the rest."""
    banned = set()
    for word in words:
        if len(word) > len(history) + 1:
            continue
        prefix = word[:-1]
        if list(history[len(history) - len(prefix):]) == list(prefix) or not prefix:
            banned.add(word[-1])
    return banned


def ref_processed(logits_row, p: SamplingParams, history=(), eos=None):
    """vLLM V1's logits before temperature for one row: allowed mask, bad words, min_tokens,
    logit_bias, penalties (here with no penalty state)."""
    x = np.array(logits_row, np.float64)
    if p.allowed_token_ids is not None:
        x[np.setdiff1d(np.arange(x.shape[0]), p.allowed_token_ids)] = -np.inf
    for t in ref_bad_word_bans(p.bad_words_token_ids, history):
        x[t] = -np.inf
    if len(history) < p.min_tokens:
        x[list(p.stop_token_ids) + ([] if p.ignore_eos or eos is None else [eos])] = -np.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    return x


def ref_probs(logits_row, p: SamplingParams, history=(), eos=None):
    """[V] probabilities of the next token under vLLM V1 (one-hot argmax for greedy rows)."""
    x = ref_processed(logits_row, p, history, eos)
    if p.is_greedy:
        return np.eye(x.shape[0])[np.argmax(x)]
    scaled = x / p.temperature
    keep = ref_keep(scaled, p.top_k, p.top_p, p.min_p)
    return np.where(keep, _softmax(np.where(keep, scaled, -np.inf)), 0.0)


def test_bad_word_bans_follow_the_history():
    words = [[5], [1, 2], [3, 4, 6], [7, 7]]
    for history in ([], [1], [9, 1], [3, 4], [1, 3, 4], [7], [2, 1], [3]):
        assert set(sampler.bad_word_bans(words, history)) == ref_bad_word_bans(words, history), history
    assert set(sampler.bad_word_bans(words, [0, 3, 4])) == {5, 6}
    assert set(sampler.bad_word_bans(words, [1])) == {5, 2}
    assert set(sampler.bad_word_bans(words, [])) == {5}


PROCESSOR_CASES = [
    dict(logit_bias={3: 4.0, 10: -100.0, 11: 2.5}),
    dict(allowed_token_ids=[2, 5, 9, 17, 40, 63]),
    dict(bad_words=[[0], [4, 1], [8, 2, 6]], history=[3, 8, 2]),
    dict(allowed_token_ids=list(range(0, V, 3)), logit_bias={0: 3.0, 6: -2.0, 7: 50.0}, top_p=0.8, min_p=0.02),
    dict(bad_words=[[1, 2]], history=[1], logit_bias={2: 100.0, 5: 1.0}, top_k=5, temperature=0.8),
    dict(min_tokens=2, stop_token_ids=[6], logit_bias={6: 10.0, 12: 1.5}, history=[4]),
]


def _case_params(case, **extra):
    """(params, history) of a PROCESSOR_CASES entry; its bad words come as token ids, set as if
    `update_from_tokenizer` had produced them."""
    case = {**case, **extra}
    words, history = case.pop("bad_words", None), case.pop("history", [])
    if words:
        case["bad_words"] = [f"word{i}" for i in range(len(words))]
    p = SamplingParams(**case)
    if words:
        p._bad_words_token_ids = [list(w) for w in words]
    return p, history


def test_processors_greedy_match_numpy_reference():
    # Each case as a greedy row and with the processed argmax pushed away from the raw one.
    b = 2 * len(PROCESSOR_CASES)
    logits = _logits(b, seed=20)
    params, histories = [], []
    for case in PROCESSOR_CASES * 2:
        p, h = _case_params(case, temperature=0.0)
        params.append(p)
        histories.append(h)
    t = SamplingTensors.from_params(params, steps=[len(h) for h in histories], output_token_ids=histories,
                                    eos_token_id=1, pad_to=16)
    out = sample(np.concatenate([logits, np.zeros((16 - b, V), np.float32)]), t, num_logprobs=3)
    want = [int(np.argmax(ref_processed(logits[i], p, histories[i], eos=1))) for i, p in enumerate(params)]
    assert np.asarray(out.tokens)[:b].tolist() == want
    assert sum(w != int(np.argmax(logits[i])) for i, w in enumerate(want)) >= 4  # the processors matter
    # Logprobs stay those of the raw logits.
    np.testing.assert_allclose(np.asarray(out.chosen_logprob)[:b], _log_softmax(logits)[np.arange(b), want],
                               atol=1e-5)


def test_processors_sampled_distribution_matches_numpy_reference():
    n = 4000
    row = _logits(1, seed=21, scale=1.5)[0]
    params, steps, histories = [], [], []
    for c, case in enumerate(PROCESSOR_CASES):
        p, h = _case_params(case, seed=300 + c)
        params += [p] * n
        histories += [h] * n
        steps += range(n)  # the step only changes the key here: no min_tokens past the history
    t = SamplingTensors.from_params(params, steps=steps, output_token_ids=histories, eos_token_id=1)
    # min_tokens counts the history, not the key's step: rebuild that ban from the history length.
    t = t._replace(banned_ids=SamplingTensors.from_params(params, steps=[len(h) for h in histories],
                                                          eos_token_id=1).banned_ids)
    tokens = np.asarray(sample(np.broadcast_to(row, (len(params), V)), t).tokens)
    for c, case in enumerate(PROCESSOR_CASES):
        p, h = _case_params(case, seed=300 + c)
        expected = ref_probs(row, p, h, eos=1)
        got = tokens[c * n:(c + 1) * n]
        assert set(np.unique(got)) <= set(np.flatnonzero(expected)), case
        assert len(np.unique(got)) > 1, case
        assert chi2_pvalue(np.bincount(got, minlength=V), expected) > 1e-4, case


def test_processor_rows_leave_their_neighbours_unchanged():
    # A seeded plain row draws the same tokens alone and next to rows using every processor.
    request = SamplingParams(seed=44, temperature=1.1, top_p=0.9)
    logits_row = _logits(1, seed=22, scale=1.0)[0]
    others = [_case_params(case, seed=i)[0] for i, case in enumerate(PROCESSOR_CASES)]
    alone = _request_tokens(1, 0, others, request, logits_row)
    beside = _request_tokens(5, 2, others, request, logits_row)
    assert alone == beside and len(set(alone)) > 1


class _PairTokenizer:
    """Test double for the engine's tokenizer: every text encodes to one fixed token pair."""

    eos_token_id = None

    def __init__(self, pair):
        self.pair = list(pair)

    def encode(self, text, add_special_tokens=True):
        return self.pair

    def decode(self, token_ids, skip_special_tokens=True):
        return ""


def test_engine_applies_the_processors_end_to_end():
    import dataclasses

    from inference.engine import Engine, EngineConfig
    from model.config import PRESETS
    from model.llama import init_params

    cfg = dataclasses.replace(PRESETS["tiny"], num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    weights = init_params(cfg, jax.random.key(7))
    prompt = list(range(3, 11))
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True)

    def engine(tokenizer=None):
        # Multi-step decode on: rows with bad words must still see their own last token.
        return Engine(cfg, weights, tokenizer, EngineConfig(page_size=4, num_pages=64, max_num_seqs=4,
                                                            max_num_batched_tokens=64, attn_impl="xla",
                                                            num_decode_steps=4))

    e = engine()
    e.add_request("plain", prompt, SamplingParams(**greedy))
    want = e.run()["plain"].token_ids
    pair = want[3:5]
    e = engine(_PairTokenizer(pair))
    e.add_request("plain", prompt, SamplingParams(**greedy))
    e.add_request("bad", prompt, SamplingParams(bad_words=["the pair"], **greedy))
    e.add_request("bias", prompt, SamplingParams(logit_bias={17: 100.0}, **greedy))
    e.add_request("allowed", prompt, SamplingParams(allowed_token_ids=[5, 40], seed=1, max_tokens=12))
    out = {rid: o.token_ids for rid, o in e.run().items()}
    assert out["plain"] == want                       # neighbours with processors change nothing
    assert out["bad"][:4] == want[:4] and out["bad"][4] != want[4]   # banned right after its prefix
    assert all(out["bad"][i:i + 2] != pair for i in range(len(out["bad"]) - 1))
    assert out["bias"] == [17] * 12
    assert set(out["allowed"]) <= {5, 40} and len(out["allowed"]) == 12
    with pytest.raises(ValueError, match=rf"logit_bias: token id\(s\) \[{cfg.vocab_size}\]"):
        e.add_request("oob", prompt, SamplingParams(logit_bias={cfg.vocab_size: 1.0}))


def test_speculative_verify_applies_the_same_processors():
    from inference.speculative import verify

    # logit_bias and allowed_token_ids (state-free) at every position of a speculated block: greedy rows
    # whose guesses are the processed argmax chain accept them all and add the processed bonus token.
    B, K = 4, 3
    logits = _logits(B * (K + 1), seed=23).reshape(B, K + 1, V)
    cases = [dict(logit_bias={3: 9.0, 11: 8.5}), dict(allowed_token_ids=[2, 5, 9, 17, 40, 63]),
             dict(allowed_token_ids=list(range(0, V, 3)), logit_bias={6: 3.0}), dict()]
    params = [SamplingParams(temperature=0.0, **c) for c in cases]
    chain = np.array([[int(np.argmax(ref_processed(logits[b, i], p))) for i in range(K + 1)]
                      for b, p in enumerate(params)])
    assert (chain != logits.argmax(-1)).sum() >= 6  # the processors matter
    tensors = SamplingTensors.from_params(params)
    out = verify(logits, chain[:, :K], None, np.full(B, K, np.int32), tensors)
    np.testing.assert_array_equal(np.asarray(out.output_tokens), chain)
    # No guesses: verify samples exactly what `sample` does, processors included.
    sampled = [SamplingParams(seed=50 + b, **c) for b, c in enumerate(cases)]
    tensors = SamplingTensors.from_params(sampled)
    out = verify(logits, chain[:, :K], None, np.zeros(B, np.int32), tensors)
    np.testing.assert_array_equal(np.asarray(out.output_tokens)[:, 0], np.asarray(sample(logits[:, 0], tensors).tokens))


def test_sampling_rows_gather_equals_from_params():
    """The engine's per-request sampling table gives, field for field, what from_params builds."""
    from inference.sampler import SamplingRows
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=3, repetition_penalty=1.2,
                             presence_penalty=0.3, frequency_penalty=0.1),
              SamplingParams(temperature=0),                    # greedy
              SamplingParams(temperature=1.0, top_k=1),         # greedy through top_k
              SamplingParams(temperature=0.9, seed=-5),          # negative and 64-bit seeds
              SamplingParams(temperature=0.9, seed=2**40 + 7),
              SamplingParams(temperature=0.5),                  # unseeded: the fallback seed's stream
              SamplingParams(temperature=0.5, min_tokens=2)]    # past its min_tokens window
    assert all(SamplingRows.fits(p) for p in params)
    assert not SamplingRows.fits(SamplingParams(logit_bias={3: 1.0}))
    fallback = [11, 12, 13, 14, 15, 16, 17]
    slots = [5, 0, 7, 2, 3, 1, 6]
    table = SamplingRows(8)
    for slot, p, seed in zip(slots, params, fallback):
        table.write(slot, p, seed)
    steps = [4, 0, 9, 1, 2, 3, 2]
    got = table.gather(slots, steps, pad_to=10)
    want = SamplingTensors.from_params(params, steps=steps, fallback_seeds=fallback, eos_token_id=0, pad_to=10,
                                       on_device=False)
    for name, g, w in zip(SamplingTensors._fields, got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w), name
    with pytest.raises(ValueError, match="slot=8"):
        table.write(8, params[0], 0)
