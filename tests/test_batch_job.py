"""Offline JSONL batch jobs: per-record errors, and kill-then-resume without loss or duplication."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from inference.batch_job import run_batch_job
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
