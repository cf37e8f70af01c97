"""LLM.close() frees this instance's device memory and nothing of any other instance."""

import dataclasses
import gc

import jax
import numpy as np
from jax import monitoring

from inference.llm import LLM
from inference.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def _live_device_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def test_close_frees_own_device_bytes_and_keeps_others_compiled(default_model):
    cfg, params, tok = default_model
    # A 2-layer cut of the default model, as host arrays, so each LLM owns its own device copies.
    small = dataclasses.replace(cfg, num_layers=2)
    host = jax.tree.map(np.asarray, {**params, "layers": jax.tree.map(lambda a: a[:2], params["layers"])})
    before = _live_device_bytes()
    first = LLM(_loaded=(small, host, tok), num_pages=8)
    second = LLM(_loaded=(small, host, tok), num_pages=8)
    want = second.generate("Hi there", GREEDY)[0].token_ids
    first.generate("Hi there", GREEDY)
    per_llm = (_live_device_bytes() - before) / 2
    assert per_llm > 0

    first.close()
    assert _live_device_bytes() - before <= per_llm * 1.01   # only `second`'s arrays are left

    compiles = []
    listener = lambda event, seconds, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    monitoring.register_event_duration_secs_listener(listener)
    try:
        assert second.generate("Hi there", GREEDY)[0].token_ids == want
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert compiles == []   # closing `first` did not throw away the programs `second` uses
    second.close()
    assert _live_device_bytes() - before <= per_llm * 0.01
