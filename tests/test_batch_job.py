"""Offline JSONL batch jobs: per-record errors, and kill-then-resume without loss or duplication."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inference.batch_job import (BatchOutputWarning, OutputLock, OutputLockedError, ResumeMismatchError, meta_path,
                                 run_batch_job)
from inference.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(temperature=0, max_tokens=6)


def read_results(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_bad_records_get_errors_and_the_rest_complete(default_llm, tmp_path):
    max_len = default_llm.engine.engine_cfg.max_model_len
    lines = [
        json.dumps({"id": "ok1", "prompt": "The capital of France is"}),
        "{not json",
        json.dumps({"id": "nofield", "text": "wrong key"}),
        json.dumps({"id": "long", "prompt": "word " * (max_len + 10)}),
        json.dumps({"id": "badparam", "prompt": "hi", "sampling": {"temperature": -2}}),
        json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Say hi"}]}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "ok1", "prompt": "duplicate id"}),
        json.dumps({"id": "ok2", "prompt": "Hello", "sampling": {"max_tokens": 3}}),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    summary = run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False)
    results = {r["id"]: r for r in read_results(out)}
    assert results["ok1"]["error"] is None and "Paris" in results["ok1"]["text"]
    assert results["chat"]["error"] is None and results["chat"]["text"]
    assert results["ok2"]["error"] is None and len(results["ok2"]["token_ids"]) == 3
    assert "malformed JSON" in results["line-2"]["error"]
    assert "neither 'prompt' nor 'messages'" in results["nofield"]["error"]
    assert f"max_model_len={max_len}" in results["long"]["error"]
    assert "temperature=-2" in results["badparam"]["error"]
    assert "expected a JSON object" in results["line-7"]["error"]
    assert "duplicate id='ok1'" in results["ok1#line-8"]["error"]
    assert summary.completed == 3 and summary.failed == 6 and summary.total_records == 9


def test_n_samples_in_one_line_equal_llm_generate(default_llm, tmp_path):
    sampling = {"n": 3, "seed": 11, "temperature": 0.8, "max_tokens": 5}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "many", "prompt": "Once upon a time", "sampling": sampling}) + "\n"
                   + json.dumps({"id": "one", "prompt": "Hello", "sampling": {"max_tokens": 2}}) + "\n")
    summary = run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False)
    results = {r["id"]: r for r in read_results(out)}
    want = default_llm.generate("Once upon a time", SamplingParams(ignore_eos=False, **sampling))[0].outputs
    many = results["many"]
    assert many["error"] is None and [o["token_ids"] for o in many["outputs"]] == [w.token_ids for w in want]
    assert [o["text"] for o in many["outputs"]] == [w.text for w in want]
    assert many["token_ids"] == want[0].token_ids and [o["index"] for o in many["outputs"]] == [0, 1, 2]
    assert "outputs" not in results["one"] and len(results["one"]["token_ids"]) == 2
    assert summary.completed == 2 and summary.failed == 0


def test_resume_skips_done_ids_and_repairs_torn_line(default_llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"Count to {i}:"}) + "\n" for i in range(4)))
    first = run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False, max_records=2)
    assert first.completed == 2
    with open(out, "a") as f:
        f.write('{"id": 3, "text": "torn')  # what a kill in the middle of a write leaves
    second = run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False)
    ids = [r["id"] for r in read_results(out)]
    assert sorted(ids) == [0, 1, 2, 3] and second.skipped_done == 2


def _cli(inp, out, extra=()):
    cmd = [sys.executable, "-m", "inference.cli", "generate", "--input", str(inp), "--output", str(out),
           "--max-tokens", "24", "--max-num-seqs", "2", "--quiet", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def test_kill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    prompts = [f"Write one sentence about the number {i}." for i in range(10)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    killed_out, clean_out = tmp_path / "killed.jsonl", tmp_path / "clean.jsonl"

    proc = _cli(inp, killed_out)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if killed_out.exists() and len(read_results(killed_out)) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "job finished before it could be killed; " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_results(killed_out)
    assert 3 <= len(partial) < len(prompts)

    resumed = _cli(inp, killed_out)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    clean = _cli(inp, clean_out)
    assert clean.wait(timeout=600) == 0, clean.stderr.read().decode()[-2000:]

    got, want = read_results(killed_out), read_results(clean_out)
    assert sorted(r["id"] for r in got) == sorted(f"r{i}" for i in range(10))  # each id exactly once
    by_id = {r["id"]: r for r in want}
    for r in got:
        assert r["token_ids"] == by_id[r["id"]]["token_ids"] and r["text"] == by_id[r["id"]]["text"]


def test_resume_refuses_changed_requests_or_settings_and_overwrite_starts_over(default_llm, tmp_path):
    out = tmp_path / "out.jsonl"
    first_in, second_in = tmp_path / "in1.jsonl", tmp_path / "in2.jsonl"
    first_in.write_text(json.dumps({"id": 0, "prompt": "The capital of France is"}) + "\n"
                        + json.dumps({"id": 1, "prompt": "Hello"}) + "\n")
    second_in.write_text(json.dumps({"id": 0, "prompt": "Two plus two equals"}) + "\n"
                         + json.dumps({"id": 1, "prompt": "Hello"}) + "\n")
    run_batch_job(default_llm, first_in, out, default_params=GREEDY, show_progress=False)
    before = out.read_bytes()

    with pytest.raises(ResumeMismatchError, match=r"line 1 of .*in2.jsonl.*id=0.*--overwrite"):
        run_batch_job(default_llm, second_in, out, default_params=GREEDY, show_progress=False)
    with pytest.raises(ResumeMismatchError, match=r"max_tokens: 6 -> 7"):
        run_batch_job(default_llm, first_in, out, default_params=SamplingParams(temperature=0, max_tokens=7),
                      show_progress=False)
    with pytest.raises(ResumeMismatchError, match=r"chat: False -> True"):
        run_batch_job(default_llm, first_in, out, default_params=GREEDY, chat=True, show_progress=False)
    assert out.read_bytes() == before  # a refused resume writes nothing

    # Records appended to the same input resume fine: the finished ones still match.
    first_in.write_text(first_in.read_text() + json.dumps({"id": 2, "prompt": "Once upon a time"}) + "\n")
    resumed = run_batch_job(default_llm, first_in, out, default_params=GREEDY, show_progress=False)
    assert resumed.skipped_done == 2 and resumed.completed == 1

    started_over = run_batch_job(default_llm, second_in, out, default_params=GREEDY, show_progress=False,
                                 overwrite=True)
    results = read_results(out)
    assert started_over.completed == 2 and sorted(r["id"] for r in results) == [0, 1]
    want = default_llm.generate("Two plus two equals", GREEDY)[0]
    assert next(r for r in results if r["id"] == 0)["token_ids"] == want.token_ids
    meta = json.loads(meta_path(out).read_text())
    assert [r["key"] for r in meta["requests"]] == [0, 1]


def test_second_job_on_the_same_output_is_refused_at_once(default_llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"Count to {i}:"}) + "\n" for i in range(3)))
    holder = subprocess.Popen(  # another process's job holding the output
        [sys.executable, "-c", "import sys; from inference.batch_job import OutputLock; "
                               f"lock = OutputLock({str(out)!r}); print('locked', flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == b"locked"
        started = time.perf_counter()
        with pytest.raises(OutputLockedError, match=r"out.jsonl.*in use by another batch job"):
            run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False)
        assert time.perf_counter() - started < 5 and not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with OutputLock(out):  # and two jobs in one process
        with pytest.raises(OutputLockedError):
            run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False)
    summary = run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False)
    assert summary.completed == 3 and sorted(r["id"] for r in read_results(out)) == [0, 1, 2]


def test_non_utf8_input_line_fails_alone_with_its_line_number(default_llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(json.dumps({"id": "a", "prompt": "The capital of France is"}).encode() + b"\n"
                    + b'{"id": "b", "prompt": "caf\x80"}\n'
                    + json.dumps({"id": "c", "prompt": "Hello"}).encode() + b"\n")
    summary = run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False)
    results = {r["id"]: r for r in read_results(out)}
    assert summary.completed == 2 and summary.failed == 1
    assert results["line-2"]["error"] == "line 2: not UTF-8 (byte 0x80 at column 27)"
    assert "Paris" in results["a"]["text"] and results["c"]["error"] is None


def test_bad_lines_in_the_output_are_reported_and_skipped(default_llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"Count to {i}:"}) + "\n" for i in range(3)))
    run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False, max_records=1)
    with open(out, "ab") as f:
        f.write(b'[1, 2]\n"str"\n\x80\xff\n{"text": "no id"}\n')
    with pytest.warns(BatchOutputWarning) as caught:
        summary = run_batch_job(default_llm, inp, out, default_params=GREEDY, show_progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, BatchOutputWarning)]
    assert [m.split("line ")[1].split(":")[0] for m in messages] == ["2", "3", "4", "5"]
    assert "a JSON list" in messages[0] and "not UTF-8" in messages[2] and "id=None" in messages[3]
    assert summary.skipped_done == 1 and summary.completed == 2
    ids = [r["id"] for r in (json.loads(line) for line in out.read_bytes().split(b"\n")[5:] if line.strip())]
    assert sorted(ids) == [1, 2]
