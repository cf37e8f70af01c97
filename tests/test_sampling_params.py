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
