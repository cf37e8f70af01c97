"""The non-optimised path: one sequence at a time, greedy, contiguous pages.

It is the baseline the engine is checked against (same tokens) and benchmarked against (one-at-a-time
generation), so it stays deliberately plain: prefill the prompt in one step, then one token per step.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from model.config import LlamaConfig
from model.llama import StepInputs, init_cache, make_step_fn


def single_sequence_inputs(token_ids, start: int, page_size: int, num_pages: int, logits_rows: str = "last"):
    """StepInputs for one sequence whose pages are 0..num_pages-1 in order."""
    n = len(token_ids)
    positions = np.arange(start, start + n, dtype=np.int32)
    return StepInputs(
        tokens=jnp.asarray(np.asarray(token_ids, np.int32)),
        positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(positions),  # contiguous pages: slot == position
        cu_q_lens=jnp.asarray(np.array([0, n], np.int32)),
        kv_lens=jnp.asarray(np.array([start + n], np.int32)),
        block_tables=jnp.asarray(np.arange(num_pages, dtype=np.int32)[None, :]),
        num_seqs=jnp.asarray(np.array([1], np.int32)),
        logits_indices=jnp.asarray(np.arange(n, dtype=np.int32) if logits_rows == "all"
                                   else np.array([n - 1], np.int32)),
    )


def greedy_generate(params, cfg: LlamaConfig, prompt_ids, max_new_tokens: int, *, page_size: int = 16,
                    attn_impl: str = "auto", cache_dtype=jnp.float32, eos_token_id=None):
    """Returns (generated ids, last-prompt-position logits [vocab] as numpy)."""
    total = len(prompt_ids) + max_new_tokens
    num_pages = -(-total // page_size)
    cache = init_cache(cfg, num_pages, page_size, cache_dtype)
    step = make_step_fn(cfg, attn_impl)
    logits, cache = step(params, cache, single_sequence_inputs(prompt_ids, 0, page_size, num_pages))
    first_logits = np.asarray(logits[0])
    out = []
    token = int(np.argmax(first_logits))
    for _ in range(max_new_tokens):
        out.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        if len(out) == max_new_tokens:
            break
        start = len(prompt_ids) + len(out) - 1
        logits, cache = step(params, cache, single_sequence_inputs([token], start, page_size, num_pages))
        token = int(np.argmax(np.asarray(logits[0])))
    return out, first_logits


def prompt_logits(params, cfg: LlamaConfig, prompt_ids, *, page_size: int = 16, attn_impl: str = "auto"):
    """float32 logits [T, vocab] at every prompt position (teacher forcing)."""
    num_pages = -(-len(prompt_ids) // page_size)
    cache = init_cache(cfg, num_pages, page_size)
    logits, _ = make_step_fn(cfg, attn_impl)(
        params, cache, single_sequence_inputs(prompt_ids, 0, page_size, num_pages, logits_rows="all"))
    return np.asarray(logits)
