"""OpenAI Batch files through the resumable batch job: response shapes, per-line errors, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inference.batch_job import ResumeMismatchError, run_batch_job
from inference.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def request(custom_id, url="/v1/completions", **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_openai_lines_results_and_errors(default_llm, tmp_path):
    lines = [
        request("chat", "/v1/chat/completions", messages=CHAT, max_completion_tokens=6, temperature=0),
        request("two", prompt="The capital of France is", max_tokens=6, temperature=0, n=2),
        "{not json",
        request("embed", "/v1/embeddings", input="hi"),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "hi"}}),
        request("hot", prompt="hi", temperature=-1),
        request("stream", prompt="hi", stream=True),
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}),
        request("chat", prompt="duplicate custom_id"),
        request("seeded", prompt="Once upon a time", max_tokens=5, temperature=0.8, seed=3, n=2),
    ]
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    summary = run_batch_job(default_llm, inp, out, default_params=SamplingParams(), show_progress=False,
                            model_name="m")
    results = {r["custom_id"]: r for r in read_lines(out)}
    assert len(results) == len(lines) and summary.completed == 3 and summary.failed == 7

    greedy = SamplingParams(temperature=0, max_tokens=6)
    chat_ref = default_llm.chat(CHAT, greedy)[0]
    cmpl_ref = default_llm.generate("The capital of France is", greedy)[0]
    chat = results["chat"]
    assert chat["id"].startswith("batch_req_") and chat["error"] is None
    assert chat["response"]["status_code"] == 200 and chat["response"]["request_id"]
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": chat_ref.text}
    assert body["usage"]["completion_tokens"] == len(chat_ref.token_ids)
    two = results["two"]["response"]["body"]
    assert [c["text"] for c in two["choices"]] == [cmpl_ref.text] * 2 and [c["index"] for c in two["choices"]] == [0, 1]
    assert two["usage"] == {"prompt_tokens": len(cmpl_ref.prompt_token_ids), "completion_tokens": 12,
                            "total_tokens": len(cmpl_ref.prompt_token_ids) + 12}
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=5, n=2)
    assert ([c["text"] for c in results["seeded"]["response"]["body"]["choices"]]
            == [c.text for c in default_llm.generate("Once upon a time", seeded)[0].outputs])

    # Lines that are not requests: no response, an error naming the problem.
    assert results["line-3"]["response"] is None and "malformed JSON" in results["line-3"]["error"]["message"]
    assert "url='/v1/embeddings'" in results["embed"]["error"]["message"]
    assert "method='GET'" in results["get"]["error"]["message"]
    assert "custom_id=None" in results["line-8"]["error"]["message"]
    assert "duplicate custom_id='chat'" in results["chat#line-9"]["error"]["message"]
    # Bad bodies: the OpenAI error response the server would give.
    for cid, param in (("hot", "temperature"), ("stream", "stream")):
        response = results[cid]["response"]
        assert response["status_code"] == 400 and results[cid]["error"] is None
        assert response["body"]["error"]["param"] == param


def test_resume_skips_done_custom_ids_and_repairs_torn_line(default_llm, tmp_path):
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    inp.write_text("".join(request(f"c{i}", prompt=f"Count to {i}:", max_tokens=4, temperature=0) + "\n"
                           for i in range(4)))
    first = run_batch_job(default_llm, inp, out, default_params=SamplingParams(), show_progress=False, max_records=2)
    assert first.completed == 2
    with open(out, "a") as f:
        f.write('{"id": "batch_req_x", "custom_id": "c2", "resp')  # what a kill in the middle of a write leaves
    second = run_batch_job(default_llm, inp, out, default_params=SamplingParams(), show_progress=False)
    assert sorted(r["custom_id"] for r in read_lines(out)) == ["c0", "c1", "c2", "c3"] and second.skipped_done == 2


def _cli(inp, out):
    cmd = [sys.executable, "-m", "inference.cli", "batch", "--input", str(inp), "--output", str(out),
           "--max-num-seqs", "2", "--quiet"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow  # the same resume machinery as test_batch_job's default-set kill test, in the OpenAI format
def test_kill_mid_run_then_resume_has_every_custom_id_once(default_llm, tmp_path):
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    inp.write_text("".join(request(f"r{i}", prompt=p, max_tokens=16, temperature=0, n=1 + i % 2) + "\n"
                           for i, p in enumerate(prompts)))
    proc = _cli(inp, out)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(read_lines(out)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "job finished before it could be killed; " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(read_lines(out)) < len(prompts)

    resumed = _cli(inp, out)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    got = read_lines(out)
    assert sorted(r["custom_id"] for r in got) == sorted(f"r{i}" for i in range(8))  # each exactly once
    reference = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    for r in got:
        i = int(r["custom_id"][1:])
        assert [c["text"] for c in r["response"]["body"]["choices"]] == [reference[i].text] * (1 + i % 2)


def test_openai_resume_refuses_a_changed_body_and_bad_lines_fail_alone(default_llm, tmp_path):
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    inp.write_bytes(request("a", prompt="The capital of France is", max_tokens=4, temperature=0).encode() + b"\n"
                    + b'{"custom_id": "b", "body": "\xff"}\n'
                    + request("c", prompt="Hello", max_tokens=4, temperature=0).encode() + b"\n")
    summary = run_batch_job(default_llm, inp, out, default_params=SamplingParams(), show_progress=False)
    results = {r["custom_id"]: r for r in read_lines(out)}
    assert summary.completed == 2 and summary.failed == 1
    assert results["line-2"]["response"] is None
    assert results["line-2"]["error"]["message"] == "line 2: not UTF-8 (byte 0xff at column 29)"

    with open(out, "ab") as f:  # a foreign line in the output: warned about, never a crash
        f.write(b'["not", "a", "result"]\n')
    changed = tmp_path / "changed.jsonl"
    changed.write_text(inp.read_bytes().decode("utf-8", "replace").replace('"max_tokens": 4', '"max_tokens": 5', 1))
    with pytest.warns(UserWarning, match="line 4: a JSON list"):
        with pytest.raises(ResumeMismatchError, match=r"line 1 of .*changed.jsonl.*custom_id='a'"):
            run_batch_job(default_llm, changed, out, default_params=SamplingParams(), show_progress=False)
    with pytest.warns(UserWarning, match="line 4: a JSON list"):
        again = run_batch_job(default_llm, inp, out, default_params=SamplingParams(), show_progress=False)
    assert again.skipped_done == 3 and again.completed == 0
