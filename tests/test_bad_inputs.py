"""Every bad input gets a named error saying what was expected, and never takes the rest of the batch down."""

import re

import numpy as np
import pytest

from inference.llm import LLM
from inference.sampling_params import SamplingParams

GOOD = "The capital of France is"
SHORT = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


@pytest.mark.parametrize("bad, message", [
    (12345, "got int: 12345"),
    (None, "got NoneType"),
    (object(), "got object"),
    (b"hello", "decode bytes to str first"),
    ([1.7, 2.2], r"token id 0=1.7 must be an int, got float"),
    ([True, False], r"token id 0=True must be an int, got bool"),
    ({"prompt_token_ids": [5, 2.5]}, r"token id 1=2.5 must be an int"),
    (np.array([1.5, 2.0]), "1-D integer array"),
    ("bad \ud800 text", r"lone surrogate '\\ud800' at character 4"),
    ({"messages": [{"role": "user", "content": 7}]}, r"chat message 0 content=7 must be a str, got int"),
    ({"messages": "hi"}, "must be a list of"),
])
def test_bad_prompt_is_named_and_fails_alone(default_llm, bad, message):
    alone = default_llm.generate(bad, SHORT)
    assert len(alone) == 1 and alone[0].finish_reason == "error"
    assert re.search(message, alone[0].error), alone[0].error
    good, failed = default_llm.generate([GOOD, bad], SHORT)
    assert good.error is None and len(good.token_ids) == 2
    assert failed.finish_reason == "error" and re.search(message, failed.error)


def test_token_id_arrays_are_one_prompt(default_llm):
    ids = default_llm.tokenizer.encode(GOOD)
    want = default_llm.generate({"prompt_token_ids": ids}, SHORT)[0].token_ids
    assert default_llm.generate(np.array(ids), SHORT)[0].token_ids == want
    assert default_llm.generate([np.int64(t) for t in ids], SHORT)[0].token_ids == want


@pytest.mark.parametrize("field, value, message", [
    ("temperature", "0.5", "temperature='0.5' must be a number, got str"),
    ("temperature", float("inf"), "temperature=inf must be a finite number"),
    ("top_p", None, "top_p=None must be a number"),
    ("ignore_eos", "yes", "ignore_eos='yes' must be True or False"),
    ("stop", 5, "stop=5 must be a str, a list of str or None"),
    ("stop_token_ids", 3, "stop_token_ids=3 must be a list of ints"),
])
def test_bad_sampling_params_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_score_bad_texts_fail_alone(default_llm):
    empty, good, number, one = default_llm.score(["", GOOD, 42, "x"])
    assert empty.error == "prompt='' is empty" and empty.perplexity is None
    assert number.error and "texts[2]=42 must be a str" in number.error
    assert good.error is None and good.perplexity > 1.0 and len(good.token_logprobs) == len(good.token_ids)
    # One token: nothing predicts it, so there is no perplexity (not a fake 1.0).
    assert one.error is None and one.token_logprobs == [None] and one.perplexity is None


def test_abandoned_stream_frees_its_request(default_llm):
    engine = default_llm.engine
    free_before = engine.scheduler_stats()["pages_free"]
    stream = default_llm.generate_stream(GOOD, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    next(stream)
    assert engine.has_unfinished_requests()
    stream.close()
    assert not engine.has_unfinished_requests()
    assert engine.scheduler_stats()["pages_free"] == free_before
    # The next call runs only its own tokens: nothing left over keeps stepping.
    steps = engine.stats["steps"]
    default_llm.generate(GOOD, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert engine.stats["steps"] - steps <= 4


def test_empty_or_bad_model_names(tmp_path):
    with pytest.raises(ValueError, match="model='' is empty"):
        LLM("")
    with pytest.raises(TypeError, match="model=3 must be a path"):
        LLM(3)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON"):
        LLM(str(tmp_path))
