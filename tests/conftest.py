"""Shared fixtures. The default model is loaded once per test session (downloaded on first use)."""

import jax
import pytest


@pytest.fixture(scope="session")
def default_model():
    from model.checkpoint import load_model

    cfg, params, tok = load_model(None)
    return cfg, jax.device_put(params), tok


@pytest.fixture(scope="session")
def default_llm(default_model):
    from inference.llm import LLM

    with LLM(_loaded=default_model, max_num_seqs=8, max_num_batched_tokens=256) as llm:
        yield llm


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs_between_modules():
    """Compiled programs stay in JAX's process-wide cache (LLM.close() leaves them for other instances), so a
    long test session would keep every module's programs alive; drop them after each module."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
