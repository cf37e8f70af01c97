"""Static model configuration for the Llama family.

The config is a frozen (hashable) dataclass so it can be a static argument of jitted functions.
Llama 2/3, SmolLM2, Mistral and Qwen2 differ only in the fields below (RoPE base and scaling,
GQA ratio, tied head, q/k/v bias), so one forward covers them all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import ml_dtypes
import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "smollm2")

# dtype names accepted for weights and compute (LLM(dtype=...)), and for the KV pool (kv_cache_dtype=...:
# those plus int8, a quantized pool with per-token scales).
FLOAT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
KV_CACHE_DTYPES = {**FLOAT_DTYPES, "int8": np.int8}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "linear" or "llama3" (Llama 3.1 long-context smoothing)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope scaling kind={self.kind!r}; expected 'linear' or 'llama3'")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor={self.factor} must be > 0")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2-style bias on q/k/v projections
    max_position_embeddings: int = 4096
    # Mistral-style sliding-window attention span (None: full attention). ridgeline attends over the whole
    # context, which equals sliding-window attention only while the context fits in the window, so
    # `usable_context` caps the context there.
    sliding_window: Optional[int] = None
    architecture: str = "llama"
    name: str = "llama"

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unknown architecture={self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field}={value!r} must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window={self.sliding_window!r} must be a positive int or None")

    def usable_context(self, max_model_len: Optional[int] = None) -> int:
        """The context length to run with: `max_model_len`, or the longest this model supports.

        Without sliding-window attention in the kernels, a context longer than the window would attend past
        it and give wrong outputs, so asking for one is an error rather than a silent divergence.
        """
        limit = self.max_position_embeddings if self.sliding_window is None else min(
            self.max_position_embeddings, self.sliding_window)
        if max_model_len is None:
            return limit
        if max_model_len > self.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's context window "
                             f"max_position_embeddings={self.max_position_embeddings}")
        if max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's sliding_window={self.sliding_window}: "
                             f"ridgeline has no sliding-window attention, so tokens past {self.sliding_window} would "
                             f"attend outside the window; use max_model_len <= {self.sliding_window}")
        return max_model_len

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        o = self.num_heads * self.head_dim * d
        per_layer = qkv + o + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return self.num_layers * per_layer + v * d + head + d

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies [head_dim // 2] (float64 on host, then cast by the caller)."""
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / self.head_dim))
        s = self.rope_scaling
        if s is None:
            return inv_freq
        if s.kind == "linear":
            return inv_freq / s.factor
        # llama3: scale low frequencies by `factor`, keep high ones, interpolate in between.
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return np.where(mid, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)


# Named shapes for benchmarks with random weights (the real file cannot travel to the GPU machine).
PRESETS = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192, architecture="llama", name="smollm2-135m"),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=8192, architecture="llama", name="llama3-8b"),
    "llama3-1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192, architecture="llama", name="llama3-1b",
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)),
    # Tiny shapes for unit tests: GQA ratio 2, odd-ish sizes, fast to compile on CPU.
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=512, architecture="llama", name="tiny"),
}
