"""Orbax checkpoints of converted params (fast reloads: no dequantization, no un-permutation), and the one
`load_model` entry point that recognises every supported model format."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from model.config import LlamaConfig, RopeScaling
from model.tokenizer import ChatTemplate, TextTokenizer

_CONFIG_FILE = "ridgeline_config.json"
_TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_META = "ridgeline_tokenizer.json"
_PARAMS_DIR = "params"


def config_to_dict(cfg: LlamaConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> LlamaConfig:
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return LlamaConfig(**d)


def save_checkpoint(path, cfg: LlamaConfig, params, tokenizer: TextTokenizer | None = None) -> Path:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / _CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2))
    if tokenizer is not None:
        (path / _TOKENIZER_FILE).write_text(tokenizer.backend.to_str())
        (path / _TOKENIZER_META).write_text(json.dumps({
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "add_bos_token": tokenizer.add_bos_token, "stop_token_ids": list(tokenizer.stop_token_ids),
            "chat_template": dataclasses.asdict(tokenizer.chat_template) if tokenizer.chat_template else None,
        }, indent=2))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / _PARAMS_DIR, params, force=True)
    return path


def is_checkpoint(path) -> bool:
    return (Path(path) / _CONFIG_FILE).is_file()


def load_checkpoint(path):
    import orbax.checkpoint as ocp
    from tokenizers import Tokenizer

    path = Path(path).absolute()
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{str(path)!r} is not a ridgeline checkpoint (no {_CONFIG_FILE})")
    cfg = config_from_dict(json.loads((path / _CONFIG_FILE).read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / _PARAMS_DIR)
    tokenizer = None
    if (path / _TOKENIZER_FILE).exists():
        meta = json.loads((path / _TOKENIZER_META).read_text())
        tmpl = meta.get("chat_template")
        tokenizer = TextTokenizer(
            backend=Tokenizer.from_file(str(path / _TOKENIZER_FILE)), bos_token_id=meta["bos_token_id"],
            eos_token_id=meta["eos_token_id"], add_bos_token=meta["add_bos_token"],
            chat_template=ChatTemplate(**tmpl) if tmpl else None, stop_token_ids=tuple(meta["stop_token_ids"]))
    return cfg, params, tokenizer


def load_model(model=None, dtype=None):
    """Any supported model: None/default name, a .gguf file, an HF directory or an orbax checkpoint.

    Returns (config, params (host arrays), tokenizer)."""
    from model.weights import resolve_model

    path = resolve_model(model)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"unsupported model file {str(path)!r}: expected a .gguf file")
        from model.gguf_loader import load_gguf

        cfg, params, tok = load_gguf(path, dtype=dtype)
    elif is_checkpoint(path):
        cfg, params, tok = load_checkpoint(path)
    elif (path / "config.json").exists():
        from model.hf_loader import load_hf_dir

        cfg, params, tok = load_hf_dir(path, dtype=dtype)
    else:
        raise ValueError(f"{str(path)!r} is neither a .gguf file, an HF directory (config.json) nor a ridgeline "
                         f"checkpoint ({_CONFIG_FILE})")
    if dtype is not None:
        import jax

        params = jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
    return cfg, params, tok
