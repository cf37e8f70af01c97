"""Structured output (llguidance): the device mask against a numpy reference, SamplingParams validation, outputs that
always satisfy their JSON schema / regex / choice (greedy and sampled), unconstrained neighbours unchanged, and the
server's response_format / guided_* fields through the official openai client and OpenAI batch files."""

import json
import re
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from inference.sampler import SamplingTensors, sample, unpack_bitmask
from inference.sampling_params import SamplingParams, StructuredOutputsParams

llguidance = pytest.importorskip("llguidance")

from inference.structured_output import unpack_bitmask_np  # noqa: E402

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}
DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-2]\d"
COLORS = ["red", "green", "blue", "dark purple"]


def _satisfies(value, schema) -> bool:
    """The subset of JSON Schema the tests use (type, properties, required, additionalProperties, maxLength,
    minimum/maximum, items, maxItems, enum)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict) or not all(k in value for k in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(_satisfies(v, props[k]) for k, v in value.items() if k in props)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", value) <= value <= schema.get("maximum", value))
    if kind == "array":
        return (isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
                and all(_satisfies(v, schema["items"]) for v in value))
    raise AssertionError(f"schema {schema} is outside the checker's subset")


# ------------------------------------------------------------------------------------------------ device mask
def _random_bitmask(rng, rows: int, vocab: int) -> np.ndarray:
    words = -(-vocab // 32)
    return rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, (rows, words), dtype=np.int64,
                        endpoint=True).astype(np.int32)


def test_unpack_bitmask_matches_the_bit_layout():
    rng = np.random.default_rng(0)
    vocab = 100  # not a multiple of 32: the last word is cut
    bitmask = _random_bitmask(rng, 3, vocab)
    expected = np.array([[(int(bitmask[b, t // 32]) >> (t % 32)) & 1 for t in range(vocab)] for b in range(3)], bool)
    np.testing.assert_array_equal(np.asarray(unpack_bitmask(jnp.asarray(bitmask), vocab)), expected)
    np.testing.assert_array_equal(unpack_bitmask_np(bitmask, vocab), expected)


def test_sampler_never_samples_a_masked_token_and_leaves_all_ones_rows_unchanged():
    rng = np.random.default_rng(1)
    rows, vocab = 6, 77
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
    bitmask = _random_bitmask(rng, rows, vocab)
    bitmask[2] = 0
    bitmask[2, 1] = 1 << 4              # row 2 allows only token 36
    bitmask[4:] = -1                    # rows 4, 5: unconstrained (all ones)
    allowed = unpack_bitmask_np(bitmask, vocab)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7),
              SamplingParams(temperature=0.7, top_p=0.9, seed=8), SamplingParams(temperature=2.0, top_k=5, seed=9),
              SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=10)]
    masked_ref = np.where(allowed, logits, -np.inf)
    for step in range(40):
        with_mask = SamplingTensors.from_params(params, steps=[step] * rows, token_bitmask=bitmask)
        without = SamplingTensors.from_params(params, steps=[step] * rows)
        tokens = np.asarray(sample(jnp.asarray(logits), with_mask).tokens)
        assert allowed[np.arange(rows), tokens].all(), (step, tokens)
        assert tokens[0] == np.argmax(masked_ref[0]) and tokens[2] == 36
        plain = np.asarray(sample(jnp.asarray(logits), without).tokens)
        np.testing.assert_array_equal(tokens[4:], plain[4:])


def test_token_bitmask_shape_is_checked():
    with pytest.raises(ValueError, match="token_bitmask"):
        SamplingTensors.from_params([SamplingParams()], pad_to=2, token_bitmask=np.zeros((1, 4), np.int32))


# ------------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("kwargs,field", [
    (dict(guided_json={"type": "frobnicate"}), "guided_json"),
    (dict(guided_json="{not json"), "guided_json"),
    (dict(guided_json=3), "guided_json"),
    (dict(guided_regex="a(b"), "guided_regex"),
    (dict(guided_choice=[]), "guided_choice"),
    (dict(guided_choice=["a", 1]), "guided_choice"),
    (dict(guided_grammar="start: x y"), "guided_grammar"),
    (dict(guided_regex="a", guided_choice=["a"]), "guided_regex"),
    (dict(structured_outputs=StructuredOutputsParams(regex="a"), guided_regex="b"), "guided_regex"),
    (dict(structured_outputs={"regex": "a", "choice": ["a"]}), "structured_outputs"),
    (dict(structured_outputs={"frobnicate": 1}), "structured_outputs"),
    (dict(structured_outputs=StructuredOutputsParams(json={"type": "object", "required": 5})),
     "structured_outputs"),
])
def test_bad_constraints_are_named_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_guided_shortcuts_fold_into_structured_outputs():
    assert SamplingParams(guided_json=True).structured_outputs == StructuredOutputsParams(json_object=True)
    p = SamplingParams(n=2, seed=1, guided_regex=DATE)
    assert p.structured_outputs == StructuredOutputsParams(regex=DATE) and p.grammar
    child = p.for_child(1)  # dataclasses.replace passes the shortcut and its object: still one constraint
    assert child.seed == 2 and child.grammar == p.grammar
    assert SamplingParams().grammar is None


def test_missing_llguidance_is_a_named_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="guided_choice needs the llguidance package.*structured"):
        SamplingParams(guided_choice=["a"])


# ------------------------------------------------------------------------------------------------ engine
# Few, short requests (at most max_num_seqs=8 in one batch): the test's cost is compiling the masked step programs.
PLAIN_PROMPTS = ["The capital of France is", "Once upon a time"]
PLAIN_PARAMS = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0.9, seed=3, max_tokens=12)]


def _constrained_requests():
    """(kind, prompt, params): each kind greedy and sampled; the sampled JSON one without whitespace."""
    requests = []
    for sampled in (dict(temperature=0), dict(temperature=1.0, seed=11)):
        json_spec = StructuredOutputsParams(json=PERSON, disable_any_whitespace="seed" in sampled)
        requests += [
            ("json", "A person as JSON:", SamplingParams(max_tokens=48, structured_outputs=json_spec, **sampled)),
            ("regex", "Today's date is", SamplingParams(max_tokens=16, guided_regex=DATE, **sampled)),
            ("choice", "My favourite color is", SamplingParams(max_tokens=8, guided_choice=COLORS, **sampled)),
        ]
    return requests


def _check_constrained(kind, text):
    if kind == "json":
        assert _satisfies(json.loads(text), PERSON), text
    elif kind == "regex":
        assert re.fullmatch(DATE, text), text
    else:
        assert text in COLORS, text


def test_constrained_outputs_follow_their_grammar_and_leave_neighbours_unchanged(default_llm):
    reference = default_llm.generate(PLAIN_PROMPTS, PLAIN_PARAMS)
    constrained = _constrained_requests()
    outputs = default_llm.generate(PLAIN_PROMPTS + [p for _, p, _ in constrained],
                                   PLAIN_PARAMS + [s for _, _, s in constrained])
    for ref, out in zip(reference, outputs):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    for (kind, _, params), out in zip(constrained, outputs[len(PLAIN_PROMPTS):]):
        completion = out.outputs[0]
        assert out.error is None and completion.finish_reason == "stop", (kind, completion)
        _check_constrained(kind, completion.text)
        if params.structured_outputs.disable_any_whitespace:
            outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', completion.text)
            assert not re.search(r"\s", outside_strings), completion.text


@pytest.mark.slow
@pytest.mark.parametrize("engine_kw", [dict(speculative={"method": "ngram"}), dict(num_decode_steps=4)])
def test_constrained_requests_beside_speculative_and_multi_step_decode(default_model, default_llm, engine_kw):
    """Constrained requests run plain single steps inside engines that draft or multi-step for the others: they
    still follow their grammar, and the greedy unconstrained request gives the plain engine's tokens."""
    from inference.llm import LLM

    text = "The quick brown fox jumps over the lazy dog. " * 3
    repeat = (f"Repeat this text exactly: {text}\nRepeated: ", SamplingParams(temperature=0, max_tokens=24))
    want = default_llm.generate(repeat[0], repeat[1])[0]
    constrained = _constrained_requests()
    with LLM(_loaded=default_model, max_num_seqs=8, max_num_batched_tokens=256, **engine_kw) as llm:
        outputs = llm.generate([repeat[0]] + [p for _, p, _ in constrained],
                               [repeat[1]] + [s for _, _, s in constrained])
        if "speculative" in engine_kw:
            assert llm.stats()["spec_accepted_tokens"] > 0  # the unconstrained request did speculate
    assert outputs[0].outputs[0].token_ids == want.outputs[0].token_ids
    for (kind, _, _), out in zip(constrained, outputs[1:]):
        assert out.outputs[0].finish_reason == "stop", (kind, out.outputs[0])
        _check_constrained(kind, out.outputs[0].text)


# ------------------------------------------------------------------------------------------------ server, batch
def test_warmup_with_structured_output_then_a_constrained_job_compiles_nothing(default_model):
    """LLM.warmup(structured_output=True) also compiles the masked step programs: a job mixing constrained and
    free requests then runs without an XLA compilation (JAX's own compile events). A 1-layer probe model."""
    import jax

    from inference.llm import LLM
    from inference.runner import count_xla_compiles
    from model.config import LlamaConfig
    from model.llama import init_params

    tok = default_model[2]
    cfg = LlamaConfig(vocab_size=default_model[0].vocab_size, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256, name="probe-so")
    jax.clear_caches()
    with LLM(_loaded=(cfg, init_params(cfg, jax.random.key(0)), tok), max_num_seqs=8, max_num_batched_tokens=32,
             num_pages=64, page_size=16) as llm:
        with count_xla_compiles() as warm:
            programs = llm.warmup(logprobs=False, penalties=False, structured_output=None)
        assert programs == 2 * 3 * 3 and warm.count >= programs  # masked or not x 3 token x 3 page buckets
        constrained = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
        free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        with count_xla_compiles() as job:
            outs = llm.generate(["Is water wet?", "Count: 1 2 3", "Answer:", "Hello"], [constrained, free, constrained, free])
        assert [o.error for o in outs] == [None] * 4
        assert outs[0].text in ("yes", "no") and outs[2].text in ("yes", "no")
        assert job.count == 0


def test_server_response_format_and_guided_fields(default_llm):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from test_server import MODEL, Served

    served = Served(default_llm)
    served.thread.start()
    deadline = time.time() + 60
    while not served.server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        client = served.client()
        messages = [{"role": "user", "content": "Give me a person as JSON."}]
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=64, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                    "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        assert _satisfies(json.loads(r.choices[0].message.content), PERSON)
        r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0.9,
                                           seed=5, extra_body={"guided_choice": COLORS})
        assert r.choices[0].message.content in COLORS
        r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=16, temperature=0,
                                           response_format={"type": "json_object"})
        content = r.choices[0].message.content  # any JSON object; complete unless max_completion_tokens cut it
        assert content.lstrip().startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
        r = client.completions.create(model=MODEL, prompt="Today's date is", max_tokens=16, temperature=0,
                                      extra_body={"guided_regex": DATE})
        assert re.fullmatch(DATE, r.choices[0].text)
        bad = [(client.chat.completions.create, dict(messages=messages, response_format={
                   "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "frobnicate"}}}),
                "response_format"),
               (client.chat.completions.create, dict(messages=messages, response_format={"type": "yaml"}),
                "response_format"),
               (client.completions.create, dict(prompt="hi", extra_body={"guided_regex": "a("}), "guided_regex"),
               (client.completions.create, dict(prompt="hi", extra_body={"guided_json": "{oops"}), "guided_json"),
               (client.chat.completions.create, dict(messages=messages, response_format={"type": "json_object"},
                                                     extra_body={"guided_choice": ["a"]}), "response_format")]
        for create, body, param in bad:
            with pytest.raises(openai.BadRequestError) as err:
                create(model=MODEL, **body)
            assert err.value.body["param"] == param and param in err.value.body["message"], err.value.body
    finally:
        served.server.should_exit = True
        served.thread.join(60)


def test_openai_batch_file_with_response_format(default_llm, tmp_path):
    from inference.batch_job import run_batch_job

    def line(custom_id, **body):
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})

    messages = [{"role": "user", "content": "Give me a person as JSON."}]  # as in the server test: same programs
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([
        line("ok", messages=messages, max_completion_tokens=64, temperature=0, response_format=schema_format),
        line("bad", messages=messages, response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                             "schema": []}}),
    ]) + "\n")
    summary = run_batch_job(default_llm, inp, out, default_params=SamplingParams(), show_progress=False)
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert summary.completed == 1 and summary.failed == 1
    content = results["ok"]["response"]["body"]["choices"][0]["message"]["content"]
    assert _satisfies(json.loads(content), PERSON)
    assert "response_format" in json.dumps(results["bad"])
