"""Sliding-window models (Mistral-7B-v0.1 style): ridgeline has no windowed attention, so it never runs a
context longer than the window; asking for one is a named error instead of silently wrong outputs."""

import dataclasses

import jax
import pytest

from inference.engine import Engine, EngineConfig
from inference.sampling_params import SamplingParams
from model.config import PRESETS
from model.hf_loader import config_from_hf
from model.llama import init_params

MISTRAL = {"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 32768, "sliding_window": 4096}


def test_window_read_from_hf_config():
    cfg = config_from_hf(MISTRAL)
    assert cfg.sliding_window == 4096
    assert cfg.usable_context() == 4096 and cfg.usable_context(2048) == 2048
    with pytest.raises(ValueError, match=r"max_model_len=8192 exceeds the model's sliding_window=4096"):
        cfg.usable_context(8192)
    with pytest.raises(ValueError, match="max_position_embeddings=32768"):
        cfg.usable_context(40000)
    # Mistral v0.2+ sets sliding_window to null; Qwen2 carries one that use_sliding_window turns off.
    assert config_from_hf({**MISTRAL, "sliding_window": None}).sliding_window is None
    qwen = {**MISTRAL, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False}
    assert config_from_hf(qwen).sliding_window is None


def test_engine_caps_context_at_the_window():
    cfg = dataclasses.replace(PRESETS["tiny"], sliding_window=32)
    params = init_params(cfg, jax.random.key(0))
    engine = Engine(cfg, params, None, EngineConfig(page_size=4, num_pages=64, attn_impl="xla"))
    assert engine.engine_cfg.max_model_len == 32
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="max_model_len=32"):
        engine.add_request(None, list(range(1, 40)), greedy)
    ok = engine.add_request(None, list(range(1, 20)), greedy)
    assert len(engine.run()[ok].token_ids) == 4
    with pytest.raises(ValueError, match="sliding_window=32"):
        Engine(cfg, params, None, EngineConfig(page_size=4, num_pages=64, attn_impl="xla", max_model_len=64))
