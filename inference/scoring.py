"""Teacher-forced scoring of whole texts: one contiguous prefill through the flash-attention path.

No KV pages are needed (every slot is -1, so nothing is written): the prompt attends to its own fresh
K/V. Logits are reduced to log-probabilities on device in row chunks, so a [T, vocab] float32 matrix is
never transferred (or, for long texts, held at once).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model.config import LlamaConfig
from model.llama import StepInputs, hidden_states, init_cache, logits_from_hidden

_ROW_CHUNK = 128


def _bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _dense_inputs(ids: list[int], Tpad: int) -> StepInputs:
    n = len(ids)
    tokens = np.zeros(Tpad, np.int32)
    tokens[:n] = ids
    return StepInputs(
        tokens=jnp.asarray(tokens), positions=jnp.arange(Tpad, dtype=jnp.int32),
        slot_mapping=jnp.full((Tpad,), -1, jnp.int32), cu_q_lens=jnp.asarray([0, n], jnp.int32),
        kv_lens=jnp.asarray([n], jnp.int32), block_tables=jnp.zeros((1, 1), jnp.int32),
        num_seqs=jnp.asarray([1], jnp.int32), logits_indices=jnp.arange(Tpad, dtype=jnp.int32))


@functools.lru_cache(maxsize=None)
def _scorer(cfg: LlamaConfig, attn_impl: str, Tpad: int, top_k: int):
    def run(params, tokens_next, inputs: StepInputs):
        cache = init_cache(cfg, 1, 1, jax.tree.leaves(params)[0].dtype)  # all writes dropped (slot -1)
        h, _ = hidden_states(params, cache, inputs, cfg, attn_impl=attn_impl, dense_prefill_len=Tpad)

        def chunk(args):
            h_rows, targets = args
            logprobs = jax.nn.log_softmax(logits_from_hidden(params, h_rows, cfg), axis=-1)
            chosen = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
            if top_k:
                top_lp, top_ids = jax.lax.top_k(logprobs, top_k)
            else:
                top_lp = jnp.zeros((h_rows.shape[0], 0), jnp.float32)
                top_ids = jnp.zeros((h_rows.shape[0], 0), jnp.int32)
            return chosen, top_lp, top_ids

        rows = min(_ROW_CHUNK, Tpad)
        chunks = (h.reshape(Tpad // rows, rows, -1), tokens_next.reshape(Tpad // rows, rows))
        chosen, top_lp, top_ids = jax.lax.map(chunk, chunks)
        return chosen.reshape(Tpad), top_lp.reshape(Tpad, top_k), top_ids.reshape(Tpad, top_k)

    return jax.jit(run)


def _score(params, cfg: LlamaConfig, ids: list[int], top_k: int, attn_impl: str):
    if len(ids) < 1:
        raise ValueError("cannot score an empty token list")
    Tpad = _bucket(len(ids))
    nxt = np.zeros(Tpad, np.int32)
    nxt[:len(ids) - 1] = ids[1:]
    chosen, top_lp, top_ids = _scorer(cfg, attn_impl, Tpad, top_k)(params, jnp.asarray(nxt), _dense_inputs(ids, Tpad))
    n = len(ids) - 1
    return np.asarray(chosen)[:n], np.asarray(top_lp)[:n], np.asarray(top_ids)[:n]


def token_logprobs(params, cfg: LlamaConfig, ids: list[int], attn_impl: str = "auto") -> np.ndarray:
    """log p(ids[i+1] | ids[:i+1]) for i in 0..len-2, float32 [len - 1]."""
    return _score(params, cfg, ids, 0, attn_impl)[0]


def prompt_top_logprobs(params, cfg: LlamaConfig, ids: list[int], k: int, attn_impl: str = "auto"):
    """vLLM-style prompt_logprobs: [None] then, per later prompt token, {token: logprob} with the top-k
    alternatives plus the actual token."""
    chosen, top_lp, top_ids = _score(params, cfg, ids, k, attn_impl)
    out = [None]
    for i in range(len(ids) - 1):
        entry = {int(t): float(lp) for t, lp in zip(top_ids[i], top_lp[i])}
        entry[int(ids[i + 1])] = float(chosen[i])
        out.append(entry)
    return out
