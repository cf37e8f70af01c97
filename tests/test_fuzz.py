"""Fuzzing the doors bad input comes through (bounded: a fixed number of examples, no deadline per example):
whatever the values, the result is a named error or a normal output, and the rest of the batch completes."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.batch_job import run_batch_job
from inference.sampling_params import SamplingParams

FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens",
          "logprobs", "prompt_logprobs", "skip_special_tokens", "include_stop_str_in_output")
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.binary(max_size=4), st.lists(st.integers(-5, 60000), max_size=4),
    st.lists(st.text(max_size=4), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHORT = dict(temperature=0, max_tokens=1, ignore_eos=True)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=4))
def test_sampling_params_accept_or_name_the_bad_field(kwargs):
    try:
        SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        assert any(f"{name}=" in str(e) for name in kwargs), str(e)


PROMPTS = st.one_of(
    st.text(max_size=20), st.binary(max_size=6), st.integers(), st.floats(), st.none(),
    st.lists(st.one_of(st.integers(-3, 60000), st.floats(), st.booleans(), st.text(max_size=2)), max_size=5),
    st.fixed_dictionaries({"prompt_token_ids": st.lists(st.integers(-3, 60000), max_size=4)}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", 7]), "content": st.one_of(st.text(max_size=12),
                                                                                          st.integers())}),
        max_size=2)}),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(PROMPTS, min_size=1, max_size=3))
def test_any_prompt_fails_alone_with_a_named_error(default_llm, bad_prompts):
    good = "The capital of France is"
    outs = default_llm.generate([good, *bad_prompts], SamplingParams(**SHORT))
    assert len(outs) == 1 + len(bad_prompts)
    assert outs[0].error is None and len(outs[0].token_ids) == 1
    for out in outs[1:]:
        assert out.finished
        if out.error is not None:
            assert out.finish_reason == "error" and len(out.error) > 10
        else:
            assert len(out.token_ids) == 1
    assert not default_llm.engine.has_unfinished_requests()


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6),
                                     st.floats(allow_nan=False, allow_infinity=False)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=6)
RECORDS = st.one_of(
    st.builds(lambda i, p: json.dumps({"id": i, "prompt": p}), st.one_of(st.text(max_size=4), st.integers()),
              st.one_of(st.text(max_size=12), JSON_VALUES)),
    st.builds(lambda i, s: json.dumps({"id": i, "prompt": "Hello", "sampling": s}), st.text(max_size=4),
              st.dictionaries(st.sampled_from(FIELDS + ("bogus",)), JSON_VALUES, max_size=2)),
    JSON_VALUES.map(json.dumps),
    st.text(max_size=10).filter(lambda t: "\n" not in t and "\r" not in t))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(RECORDS, min_size=1, max_size=5))
def test_batch_job_lines_each_get_one_result(default_llm, tmp_path_factory, lines):
    tmp = tmp_path_factory.mktemp("fuzz_batch")
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    good = json.dumps({"id": "the-good-one", "prompt": "The capital of France is"})
    inp.write_text("\n".join([good, *lines]) + "\n")
    run_batch_job(default_llm, inp, out, default_params=SamplingParams(**SHORT), show_progress=False)
    results = [json.loads(line) for line in out.read_text().split("\n") if line]  # not splitlines: ids may hold U+0085
    non_empty = 1 + sum(1 for line in lines if line.strip())
    assert len(results) == non_empty
    by_id = {r["id"]: r for r in results}
    assert by_id["the-good-one"]["error"] is None
    assert all(r["error"] is None or isinstance(r["error"], str) for r in results)
    assert not default_llm.engine.has_unfinished_requests()
