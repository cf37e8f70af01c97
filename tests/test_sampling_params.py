import math

import pytest

from inference.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == []
    assert (p.ignore_eos, p.max_tokens, p.min_tokens) == (False, 16, 0)
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert not p.is_greedy


def test_stop_normalised_to_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


@pytest.mark.parametrize("kwargs, name", [
    (dict(n=0), "n=0"),
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(min_p=-0.1), "min_p=-0.1"),
    (dict(min_p=1.1), "min_p=1.1"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(presence_penalty=2.5), "presence_penalty=2.5"),
    (dict(frequency_penalty=-3.0), "frequency_penalty=-3.0"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(stop=[""]), "stop="),
    (dict(stop=["ok", 3]), "stop="),
    (dict(stop_token_ids=[-1]), "stop_token_ids=[-1]"),
    (dict(max_tokens=0), "max_tokens=0"),
    (dict(min_tokens=-1), "min_tokens=-1"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens=20"),
    (dict(logprobs=-1), "logprobs=-1"),
    (dict(logprobs=MAX_LOGPROBS + 1), f"logprobs={MAX_LOGPROBS + 1}"),
    (dict(prompt_logprobs=-1), "prompt_logprobs=-1"),
    (dict(logit_bias=[(1, 2.0)]), "logit_bias="),
    (dict(logit_bias={"x": 1.0}), "key 'x' is not a token id"),
    (dict(logit_bias={3: math.nan}), "3: nan"),
    (dict(logit_bias={2.5: 1.0}), "2.5: 1.0"),
    (dict(allowed_token_ids=[]), "allowed_token_ids=[] is empty"),
    (dict(allowed_token_ids=[1, 2.0]), "allowed_token_ids=[1, 2.0]"),
    (dict(bad_words="oops"), "bad_words='oops'"),
    (dict(bad_words=["ok", "  "]), "bad_words=['ok', '  ']"),
])
def test_invalid_values_raise_naming_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(top_k=-1), dict(top_k=0), dict(top_k=1), dict(temperature=0.0), dict(top_p=1.0),
    dict(min_p=1.0), dict(logprobs=0), dict(logprobs=MAX_LOGPROBS), dict(seed=-7),
    dict(seed=2**40), dict(min_tokens=16, max_tokens=16), dict(presence_penalty=-2.0),
])
def test_valid_edge_values(kwargs):
    SamplingParams(**kwargs)


def test_is_greedy():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy  # below SAMPLING_EPS, as vLLM
    assert SamplingParams(temperature=0.8, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.8, top_k=-1).is_greedy


def test_for_child_offsets_seed():
    p = SamplingParams(n=3, seed=10, stop="x")
    c = p.for_child(2)
    assert (c.n, c.seed, c.stop) == (1, 12, ["x"])
    assert SamplingParams(n=2).for_child(1).seed is None


def test_logit_bias_keys_become_ints_and_biases_are_clamped():
    p = SamplingParams(logit_bias={"5": 3, 7: -250.0, 9: 1e9})
    assert p.logit_bias == {5: 3.0, 7: -100.0, 9: 100.0}
    assert p.for_child(1).logit_bias == p.logit_bias


def test_validate_token_ids_names_the_out_of_range_ids():
    SamplingParams(logit_bias={0: 1.0, 63: 1.0}, allowed_token_ids=[0, 63]).validate_token_ids(64)
    with pytest.raises(ValueError, match=r"logit_bias: token id\(s\) \[64, 70\] out of range for vocab_size=64"):
        SamplingParams(logit_bias={70: 1.0, 3: 0.5, 64: 2.0}).validate_token_ids(64)
    with pytest.raises(ValueError, match=r"allowed_token_ids: token id\(s\) \[-1, 99\]"):
        SamplingParams(allowed_token_ids=[-1, 3, 99]).validate_token_ids(64)
    p = SamplingParams(bad_words=["big word"])
    p.update_from_tokenizer(WordPieces({"big": [10], "word": [11, 80]}))
    with pytest.raises(ValueError, match=r"bad_words: token id\(s\) \[80\]"):
        p.validate_token_ids(64)


class WordPieces:
    """Test double for a tokenizer: each space-separated piece maps to fixed ids; a leading space
    marks a piece as "spaced" (looked up as " piece" first, like a BPE word-start token)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        ids = []
        for i, piece in enumerate(text.split(" ")):
            if piece:
                spaced = i > 0 and " " + piece in self.pieces
                ids += self.pieces[" " + piece if spaced else piece]
        return ids


def test_bad_words_tokenized_with_and_without_a_leading_space_as_vllm():
    tok = WordPieces({"hello": [5], " hello": [6], "a": [1, 2], " a": [3, 2], "ab": [7, 8], " ab": [7, 9],
                      "xy": [4], " xy": [4, 4], "new": [12], "world": [13], " world": [14]})
    p = SamplingParams(bad_words=["hello", "  a", "ab", "xy", "new world"])
    with pytest.raises(ValueError, match="update_from_tokenizer"):
        p.bad_words_token_ids
    p.update_from_tokenizer(tok)
    # " a" differs in its first token and has the same length: kept; " ab" starts like "ab"; " xy" is
    # longer than "xy": both dropped, as in vLLM.
    assert p.bad_words_token_ids == [[5], [6], [1, 2], [3, 2], [7, 8], [4], [12, 14]]
    assert SamplingParams().bad_words_token_ids == []
