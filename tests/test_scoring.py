"""The packed scorer (inference.scoring.score_tokens) on a tiny random model: every text's scores equal a
plain one-sequence forward of that text alone, however the texts share pages and steps."""

import dataclasses

import jax
import numpy as np
import pytest

from inference.scoring import score_tokens
from inference.simple import prompt_logits
from model.config import PRESETS
from model.llama import init_params

CFG = dataclasses.replace(PRESETS["tiny"], num_heads=4, num_kv_heads=2, max_position_embeddings=256)
PAGE = 4


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(3))


def tricky_texts(params):
    """Shared prefixes ending on and off page boundaries, nested sharing, duplicates, one-token texts, and
    the model's own greedy continuation (so that some scored tokens are the argmax)."""
    from inference.simple import greedy_generate

    rng = np.random.default_rng(0)
    tok = lambda n: rng.integers(1, CFG.vocab_size, n).tolist()  # noqa: E731
    prefix, mid_a, mid_b = tok(13), tok(6), tok(5)
    return [
        prefix + mid_a + tok(3),      # three texts share 3 pages, two of them 4 more (nested)
        prefix + mid_a + tok(7),
        prefix + mid_b,
        prefix[:9],                   # 8 computed tokens: both pages shared, nothing of its own to write
        prefix[:9],                   # a duplicate
        prefix[:8] + tok(1),
        [7],                          # one token: nothing to score
        tok(2),
        tok(21),                      # shares nothing
        prefix + mid_a + tok(3)[:1],
        prefix + greedy_generate(params, CFG, prefix, 5, page_size=PAGE, attn_impl="xla")[0],
    ]


REF_LEN = 32  # every reference forward pads its text to this (causal: the text's rows do not change)


def reference(params, ids):
    """(log p of each next token, [n - 1, V] log-probabilities) from one plain forward of the text."""
    padded = list(ids) + [0] * (REF_LEN - len(ids))
    logits = prompt_logits(params, CFG, padded, page_size=PAGE, attn_impl="xla")
    rows = np.asarray(jax.nn.log_softmax(logits))[:len(ids) - 1]
    return rows[np.arange(len(ids) - 1), ids[1:]], rows


@pytest.fixture(scope="module")
def cases(params):
    texts = tricky_texts(params)
    return texts, [reference(params, ids) for ids in texts]


@pytest.mark.parametrize("max_tokens_per_step", [1024, 16])  # one step; a tree per step
def test_packed_scores_equal_each_text_alone(params, cases, max_tokens_per_step):
    texts, refs = cases
    got = score_tokens(params, CFG, texts, top_k=3, attn_impl="xla", page_size=PAGE,
                       max_tokens_per_step=max_tokens_per_step)
    for ids, scores, (want, rows) in zip(texts, got, refs):
        assert scores.logprobs.shape == (len(ids) - 1,)
        np.testing.assert_allclose(scores.logprobs, want, atol=1e-5)
        assert scores.is_argmax.tolist() == (rows.argmax(-1) == np.asarray(ids[1:])).tolist()
        np.testing.assert_allclose(scores.top_logprobs, -np.sort(-rows, axis=-1)[:, :3], atol=1e-5)
        np.testing.assert_array_equal(scores.top_ids[:, 0], rows.argmax(-1))
    assert got[-1].is_argmax[-5:].all() and not all(s.is_argmax.all() for s in got)


def test_packed_scores_on_the_pallas_kernels(params, cases):
    texts, refs = cases[0][:4], cases[1][:4]
    got = score_tokens(params, CFG, texts, attn_impl="pallas_interpret", page_size=PAGE)
    for scores, (want, _) in zip(got, refs):
        np.testing.assert_allclose(scores.logprobs, want, atol=1e-5)


def test_empty_token_list_is_refused(params):
    with pytest.raises(ValueError, match="token list 1 is empty"):
        score_tokens(params, CFG, [[1, 2], []])
