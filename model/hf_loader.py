"""Hugging Face directories: config.json + *.safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.config import LlamaConfig, RopeScaling

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

_LAYER_WEIGHTS = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}


def config_from_hf(hf: dict) -> LlamaConfig:
    archs = hf.get("architectures") or [None]
    arch = _HF_ARCHITECTURES.get(archs[0]) or (hf.get("model_type") if hf.get("model_type") in
                                                ("llama", "mistral", "qwen2") else None)
    if arch is None:
        raise ValueError(f"unknown architecture={archs[0]!r} (model_type={hf.get('model_type')!r}); "
                         f"supported: {', '.join(_HF_ARCHITECTURES)}")
    heads = hf["num_attention_heads"]
    scaling = None
    rs = hf.get("rope_scaling") or None
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            scaling = RopeScaling("llama3", float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)),
                                  float(rs.get("high_freq_factor", 4.0)),
                                  int(rs.get("original_max_position_embeddings", 8192)))
        elif kind == "linear":
            scaling = RopeScaling("linear", float(rs["factor"]))
        elif kind not in (None, "default"):
            raise ValueError(f"unsupported rope_scaling type={kind!r}")
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        # Qwen2 configs carry a sliding_window that is off unless use_sliding_window is set.
        sliding_window=(int(hf["sliding_window"]) if hf.get("sliding_window") and hf.get("use_sliding_window", True)
                        else None),
        architecture=arch,
        name=str(hf.get("_name_or_path") or arch))


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(path)!r}")
    return files


def load_hf_dir(path, dtype=None):
    """Returns (config, params as numpy arrays, tokenizer or None)."""
    from safetensors.numpy import load_file

    from model.tokenizer import tokenizer_from_hf_dir

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in {str(path)!r}")
    try:
        hf_config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON: {e}") from e
    if not isinstance(hf_config, dict):
        raise ValueError(f"{str(cfg_file)!r} must hold a JSON object, got {type(hf_config).__name__}")
    cfg = config_from_hf(hf_config)
    tensors: dict[str, np.ndarray] = {}
    for f in _safetensor_files(path):
        tensors.update(load_file(str(f)))

    def get(name):
        if name not in tensors:
            raise ValueError(f"safetensors in {str(path)!r} lack tensor {name!r}")
        t = tensors[name]
        return t.astype(np.float32) if t.dtype != np.float32 and dtype is None else t

    cast = (lambda a: a.astype(dtype)) if dtype is not None else (lambda a: np.asarray(a, np.float32))
    layers: dict[str, list] = {}
    for i in range(cfg.num_layers):
        for hf_name, (ours, is_matmul) in _LAYER_WEIGHTS.items():
            full = f"model.layers.{i}.{hf_name}"
            if ours.startswith("b") and not cfg.attention_bias:
                continue
            w = get(full)
            layers.setdefault(ours, []).append(w.T if is_matmul else w)
    params = {
        "embed": cast(get("model.embed_tokens.weight")),
        "layers": {k: cast(np.stack(v)) for k, v in layers.items()},
        "final_norm": cast(get("model.norm.weight")),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = cast(get("lm_head.weight").T)
    tokenizer = tokenizer_from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    return cfg, params, tokenizer
