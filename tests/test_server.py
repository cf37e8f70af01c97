"""The OpenAI-compatible server on loopback, driven by the official `openai` client.

One server per module (uvicorn in a thread) over the session's default LLM. Reference outputs come from
`LLM.generate` / `LLM.score` before the server starts, since while it runs its engine loop owns the engine.
"""

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from inference.sampling_params import SamplingParams  # noqa: E402
from inference.server import create_app  # noqa: E402

MODEL = "test-model"
MAX_PENDING = 8
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet is", "One, two, three,"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, llm):
        self.llm = llm
        self.app = create_app(llm, model_name=MODEL, max_pending_sequences=MAX_PENDING)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def offline(self, fn):
        """Runs fn(llm) on the engine loop's thread: LLM.generate / score as references, while the server
        is idle (nothing in flight whose outputs generate() could take)."""
        assert not self.llm.engine.has_unfinished_requests()
        return self.app.state.ridgeline.loop.call(lambda: fn(self.llm)).result(timeout=600)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=600, **kw)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics:\n{text}"
        return float(match.group(1))


@pytest.fixture(scope="module")
def served(default_llm):
    s = Served(default_llm)
    s.thread.start()
    deadline = time.time() + 60
    while not s.server.started and time.time() < deadline:
        time.sleep(0.05)
    assert s.server.started, "uvicorn did not start"
    yield s
    s.server.should_exit = True
    s.thread.join(60)
    assert not default_llm.engine.has_unfinished_requests()


def test_models_health_and_metrics(served):
    assert [m.id for m in served.client().models.list().data] == [MODEL]
    assert served.get("/health") == (200, '{"status":"ok"}')
    status, text = served.get("/metrics")
    assert status == 200
    for name in ("ridgeline_num_requests_running", "ridgeline_num_requests_waiting",
                 "ridgeline_generation_tokens_total", "ridgeline_time_to_first_token_seconds_bucket",
                 "ridgeline_time_per_output_token_seconds_bucket", "ridgeline_prefix_cache_hit_rate",
                 "ridgeline_num_preemptions_total", "ridgeline_kv_pages_free"):
        assert name in text


def test_concurrent_clients_equal_llm_generate(served):
    """Plain and streamed completions plus a streamed chat, all at once: the same text as LLM.generate."""
    reference = served.offline(lambda llm: {o.prompt: o for o in llm.generate(PROMPTS, GREEDY)})
    chat_reference = served.offline(lambda llm: llm.chat(CHAT, GREEDY)[0])
    client = served.client()

    def plain(prompt):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage

    def streamed(prompt):
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage

    def chat():
        chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=8,
                                                     temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(5) as pool:
        futures = {p: pool.submit(plain if i < 2 else streamed, p) for i, p in enumerate(PROMPTS)}
        chat_future = pool.submit(chat)
    for p, f in futures.items():
        text, finish, usage = f.result()
        ref = reference[p]
        assert (text, finish) == (ref.text, ref.finish_reason)
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
    assert chat_future.result() == chat_reference.text

    # The raw wire format: server-sent events ending with [DONE].
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True})
    request = urllib.request.Request(served.base + "/v1/completions", body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == reference[PROMPTS[0]].text


@pytest.mark.slow
def test_logprobs_n_seed_and_echo(served):
    """Completion and chat logprobs equal LLM.generate's, echo's prompt logprobs equal LLM.score's, seeded
    n > 1 samples repeat across requests."""
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
    ref = served.offline(lambda llm: llm.generate(PROMPTS[0], params)[0])
    chat_ref = served.offline(lambda llm: llm.chat(CHAT, params)[0])
    score = served.offline(lambda llm: llm.score(PROMPTS[1])[0])
    client = served.client()
    want = [entry[t] for t, entry in zip(ref.token_ids, ref.outputs[0].logprobs)]

    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == ref.text and lp.token_logprobs == pytest.approx(want, abs=1e-4)
    assert all(len(top) >= 2 for top in lp.top_logprobs) and "".join(lp.tokens) == ref.text

    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, n=2,
                                       logprobs=True, top_logprobs=2)
    assert [ch.message.content for ch in c.choices] == [chat_ref.text] * 2
    content = c.choices[1].logprobs.content
    assert [t.logprob for t in content] == pytest.approx(
        [entry[t] for t, entry in zip(chat_ref.token_ids, chat_ref.outputs[0].logprobs)], abs=1e-4)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)

    seeded = [client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=7, n=2)
              for _ in range(2)]
    assert [ch.text for ch in seeded[0].choices] == [ch.text for ch in seeded[1].choices]

    e = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3, temperature=0, echo=True, logprobs=1)
    assert e.choices[0].text.startswith(PROMPTS[1])
    n_prompt = len(score.token_ids)
    lps = e.choices[0].logprobs.token_logprobs
    assert lps[0] is None and len(lps) == n_prompt + 3
    assert lps[1:n_prompt] == pytest.approx(score.token_logprobs[1:], abs=1e-4)


def test_disconnect_mid_stream_aborts_and_frees_pages_and_overload_is_429(served):
    client = served.client()
    total = served.metric("ridgeline_kv_pages_total")
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert served.metric("ridgeline_kv_pages_free") < total  # the stream holds pages
    assert served.metric("ridgeline_num_requests_running") == 1

    # The queue limit is MAX_PENDING sequences: n=MAX_PENDING more is refused at once, not queued.
    t0 = time.time()
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=MAX_PENDING)
    assert time.time() - t0 < 10 and "max_pending_sequences" in err.value.message

    stream.close()  # the client goes away mid-stream
    deadline = time.time() + 60
    while time.time() < deadline and (served.metric("ridgeline_num_requests_running") > 0
                                      or served.metric("ridgeline_kv_pages_free") < total):
        time.sleep(0.1)
    assert served.metric("ridgeline_num_requests_running") == 0
    assert served.metric("ridgeline_kv_pages_free") == total
    generated = served.metric("ridgeline_generation_tokens_total")
    time.sleep(0.5)
    assert served.metric("ridgeline_generation_tokens_total") == generated  # nothing generates any more


@pytest.mark.parametrize("route,body,param", [
    ("completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("completions", {"prompt": "hi", "extra_body": {"frobnicate": 1}}, "frobnicate"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"prompt": "word " * 9000}, "prompt"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("chat", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_bad_fields_are_400_naming_the_field(served, route, body, param):
    client = served.client()
    create = client.completions.create if route == "completions" else client.chat.completions.create
    with pytest.raises(openai.BadRequestError) as err:
        create(model=MODEL, **body)
    e = err.value.body
    assert e["param"] == param and e["type"] == "invalid_request_error" and param.split("[")[0] in e["message"]


def test_logit_bias_forces_a_token(served, default_llm):
    forced = default_llm.tokenizer.encode(" Paris")[0]
    r = served.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0,
                                           logit_bias={str(forced): 100})
    assert default_llm.tokenizer.encode(r.choices[0].text) == [forced] * 3
    with pytest.raises(openai.BadRequestError) as err:
        served.client().completions.create(model=MODEL, prompt="hi", extra_body={"logit_bias": "x"})
    assert err.value.body["param"] == "logit_bias"


def test_unknown_model_is_404_and_bad_json_is_400(served):
    with pytest.raises(openai.NotFoundError) as err:
        served.client().completions.create(model="gpt-4", prompt="hi")
    assert err.value.body["param"] == "model"
    request = urllib.request.Request(served.base + "/v1/chat/completions", b"{not json",
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request, timeout=30)
    assert http_err.value.code == 400 and "not valid JSON" in json.loads(http_err.value.read())["error"]["message"]
