"""GGUF loader through the `gguf` package: metadata -> LlamaConfig, tensors -> params pytree.

GGUF (llama.cpp) stores the Q and K projection rows in an interleaved RoPE order (pairs (2i, 2i+1)
rotate together); the model here uses the half-split order of Hugging Face (pairs (i, i + hd/2)).
`unpermute_qk_rows` undoes llama.cpp's permutation so both the weights and RoPE match HF.

`load_gguf(path, quantization=...)` can keep the layer projections that are stored as Q8_0 / Q4_0 / Q4_1
as `model.quantize.QuantizedWeight`s: a byte reshuffle of the GGUF blocks (no float round trip, and no
dequantization time at load), with the Q/K un-permutation applied as an output-channel gather.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from model.config import LlamaConfig, RopeScaling, SUPPORTED_ARCHITECTURES

_LAYER_TENSORS = {
    # gguf name -> (our name, is matmul weight stored [out, in] in GGUF)
    "attn_norm": ("attn_norm", False),
    "attn_q": ("wq", True),
    "attn_k": ("wk", True),
    "attn_v": ("wv", True),
    "attn_output": ("wo", True),
    "ffn_norm": ("mlp_norm", False),
    "ffn_gate": ("w_gate", True),
    "ffn_up": ("w_up", True),
    "ffn_down": ("w_down", True),
}
_LAYER_BIASES = {"attn_q": "bq", "attn_k": "bk", "attn_v": "bv"}

# load_gguf(quantization=...) -> GGUF tensor types kept as QuantizedWeights (no float round trip).
# "int8" / "int4" keep only the formats of that width; the rest load as float for quantize_params.
KEEP_QUANTIZED = {None: (), "gguf": ("Q8_0", "Q4_0", "Q4_1"), "int8": ("Q8_0",), "int4": ("Q4_0", "Q4_1"),
                  "w8a8": ("Q8_0",)}


def unpermute_qk_rows(w_out_in: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's converter permutation on a [out, in] weight (or [out] bias).

    llama.cpp: w.reshape(heads, 2, hd // 2, ...).swapaxes(1, 2) -> rows interleaved per head.
    Inverse:   w.reshape(heads, hd // 2, 2, ...).swapaxes(1, 2) -> half-split rows per head.
    """
    rest = w_out_in.shape[1:]
    head_dim = w_out_in.shape[0] // num_heads
    return (w_out_in.reshape(num_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w_out_in.shape))


def read_metadata(reader) -> dict:
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001 -- unknown field kinds are not needed
            continue
    return meta


def config_from_metadata(meta: dict, name: str = "gguf") -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unknown architecture={arch!r} in GGUF; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF is missing metadata key {arch}.{key!s}")
        return value

    d = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d // heads))
    vocab = int(meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", []))))
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    return LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings=False,  # decided from the tensors present, below
        attention_bias=False,
        max_position_embeddings=int(get("context_length", 4096)),
        sliding_window=int(meta[f"{arch}.attention.sliding_window"]) if meta.get(f"{arch}.attention.sliding_window")
        else None,
        architecture=arch, name=str(meta.get("general.name", name)))


def qk_row_permutation(out_features: int, num_heads: int) -> np.ndarray:
    """Row order of `unpermute_qk_rows` as an index array: unpermute_qk_rows(w, h) == w[perm]."""
    return unpermute_qk_rows(np.arange(out_features), num_heads)


def load_gguf(path, dtype=None, quantization: Optional[str] = None):
    """Load a Llama-family GGUF file: returns (config, params as numpy arrays, tokenizer).

    quantization None (default): every tensor is float; quantized ones (Q4_1, Q8_0, ...) are dequantized
    by the `gguf` package, F16/F32 are read as is (matches HF within 1e-3).
    quantization "gguf" | "int8" | "int4": a layer projection whose tensors are all of one type in
    KEEP_QUANTIZED[quantization] (in every layer) becomes a stacked QuantizedWeight [L, in, out] holding
    the GGUF blocks as they are; with "gguf" a quantized LM head (output.weight, or a tied token_embd)
    becomes params["lm_head"] [d, vocab] the same way. All other weights load as float (`dtype` applies
    to those only).
    """
    import dataclasses

    import gguf

    from model.quantize import from_gguf_tensor, permute_out_features, stack_quantized
    from model.tokenizer import tokenizer_from_gguf_metadata

    if quantization not in KEEP_QUANTIZED:
        raise ValueError(f"quantization={quantization!r} must be one of {list(KEEP_QUANTIZED)}")

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 -- the gguf package raises bare ValueErrors
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from e
    meta = read_metadata(reader)
    cfg = config_from_metadata(meta, name=path.stem)
    tensors = {t.name: t for t in reader.tensors}

    def load(name: str) -> np.ndarray:
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32, shape [out, in] (reversed ne)
        return np.asarray(arr, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])

    L = cfg.num_layers
    row_heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}  # rows to un-permute

    def kept_quantized(gname: str) -> bool:
        types = {tensors[f"blk.{i}.{gname}.weight"].tensor_type.name for i in range(L)}
        return len(types) == 1 and types <= set(KEEP_QUANTIZED[quantization])

    quantized = {}
    for gname, (ours, is_matmul) in _LAYER_TENSORS.items():
        if is_matmul and kept_quantized(gname):
            qws = [from_gguf_tensor(tensors[f"blk.{i}.{gname}.weight"]) for i in range(L)]  # [in, out] each
            if gname in row_heads:  # GGUF's rows are our output channels
                perm = qk_row_permutation(qws[0].out_features, row_heads[gname])
                qws = [permute_out_features(qw, perm) for qw in qws]
            quantized[ours] = stack_quantized(qws)

    layers: dict[str, list] = {}
    has_bias = "blk.0.attn_q.bias" in tensors
    for i in range(L):
        for gname, (ours, is_matmul) in _LAYER_TENSORS.items():
            if ours in quantized:
                continue
            w = load(f"blk.{i}.{gname}.weight")
            if gname == "attn_q":
                w = unpermute_qk_rows(w, cfg.num_heads)
            elif gname == "attn_k":
                w = unpermute_qk_rows(w, cfg.num_kv_heads)
            layers.setdefault(ours, []).append(w.T if is_matmul else w)
        if has_bias:
            for gname, ours in _LAYER_BIASES.items():
                b = load(f"blk.{i}.{gname}.bias")
                if gname == "attn_q":
                    b = unpermute_qk_rows(b, cfg.num_heads)
                elif gname == "attn_k":
                    b = unpermute_qk_rows(b, cfg.num_kv_heads)
                layers.setdefault(ours, []).append(b)
    cast = (lambda a: a.astype(dtype)) if dtype is not None else (lambda a: a)
    params = {
        "embed": cast(load("token_embd.weight")),
        "layers": {**{k: cast(np.stack(v)) for k, v in layers.items()}, **quantized},
        "final_norm": cast(load("output_norm.weight")),
    }
    tied = "output.weight" not in tensors
    head = tensors["token_embd.weight" if tied else "output.weight"]
    if quantization == "gguf" and head.tensor_type.name in KEEP_QUANTIZED["gguf"]:
        # The LM head as the file's blocks too ([d, vocab]); a tied model keeps its float "embed" for the lookup.
        params["lm_head"] = from_gguf_tensor(head)
    elif not tied:
        params["lm_head"] = cast(load("output.weight").T)
    cfg = dataclasses.replace(cfg, tie_word_embeddings=tied, attention_bias=has_bias,
                              vocab_size=params["embed"].shape[0])
    return cfg, params, tokenizer_from_gguf_metadata(meta)


def load_gguf_tokenizer(path):
    import gguf

    from model.tokenizer import tokenizer_from_gguf_metadata

    return tokenizer_from_gguf_metadata(read_metadata(gguf.GGUFReader(str(path))))


def gguf_shape_summary(path) -> Optional[dict]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
