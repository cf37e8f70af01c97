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


# ----------------------------------------------------------------------------- continuations of shared contexts

def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _paged_scorer(cfg: LlamaConfig, attn_impl: str):
    """One ragged step over a scratch page pool: per row, log p(target) and whether target is the argmax."""
    def run(params, cache, inputs: StepInputs, targets):
        h, _ = hidden_states(params, cache, inputs, cfg, attn_impl=attn_impl)
        T = h.shape[0]

        def chunk(args):
            h_rows, tgt = args
            logprobs = jax.nn.log_softmax(logits_from_hidden(params, h_rows, cfg), axis=-1)
            chosen = jnp.take_along_axis(logprobs, tgt[:, None], axis=-1)[:, 0]
            return chosen, jnp.argmax(logprobs, axis=-1) == tgt

        rows = min(_ROW_CHUNK, T)
        chosen, greedy = jax.lax.map(chunk, (h.reshape(T // rows, rows, -1), targets.reshape(T // rows, rows)))
        return chosen.reshape(T), greedy.reshape(T)

    return jax.jit(run)


def _ragged_inputs(seqs, page_size: int, T: int, S: int, pages_per_seq: int) -> StepInputs:
    """seqs: (tokens, first position, page ids) per sequence; padded to T tokens and S sequences."""
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.full(T, -1, np.int32)
    cu = np.zeros(S + 1, np.int32)
    kv_lens = np.zeros(S, np.int32)
    tables = np.zeros((S, pages_per_seq), np.int32)
    start = 0
    for s, (toks, first, pages) in enumerate(seqs):
        n = len(toks)
        pos = np.arange(first, first + n)
        tokens[start:start + n] = toks
        positions[start:start + n] = pos
        slots[start:start + n] = np.asarray(pages)[pos // page_size] * page_size + pos % page_size
        tables[s, :len(pages)] = pages
        kv_lens[s] = first + n
        start += n
        cu[s + 1:] = start
    return StepInputs(tokens=jnp.asarray(tokens), positions=jnp.asarray(positions), slot_mapping=jnp.asarray(slots),
                      cu_q_lens=jnp.asarray(cu), kv_lens=jnp.asarray(kv_lens), block_tables=jnp.asarray(tables),
                      num_seqs=jnp.asarray([len(seqs)], np.int32), logits_indices=jnp.arange(T, dtype=jnp.int32))


def score_continuations(params, cfg: LlamaConfig, requests, *, attn_impl: str = "auto", page_size: int = 16,
                        max_tokens_per_step: int = 1024):
    """log p(continuation | context) token by token, for lm-eval style (context_ids, continuation_ids) pairs.

    Returns, per request, (logprobs float32 [len(continuation)], is_argmax bool [len(continuation)]).

    Requests with the same context (multiple-choice answers) compute its whole pages once: in one ragged
    step, a sequence of the shared context writes its K/V into scratch pages, and every continuation is a
    sequence (the context's last partial page recomputed, so no page has two writers) whose block table
    starts with those pages. This works within a single step because each layer writes the step's K/V into
    the pages before any sequence attends. Groups are packed into steps of about `max_tokens_per_step` tokens.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError(f"request {i}: context ({len(ctx)} tokens) and continuation ({len(cont)} tokens) "
                             f"must each have at least one token")
        groups.setdefault(tuple(int(t) for t in ctx), []).append(i)
    dtype = jax.tree.leaves(params)[0].dtype
    if not jnp.issubdtype(dtype, jnp.floating):  # quantized weights: a float32 scratch pool
        dtype = jnp.float32
    results = [None] * len(requests)

    def run_step(chunk):
        seqs, rows = [], []  # rows: (request index or None for a shared context, continuation, first row)
        next_page = 0
        for ctx, members in chunk:
            shared = (len(ctx) - 1) // page_size * page_size if len(members) > 1 else 0
            shared_pages = list(range(next_page, next_page + shared // page_size))
            next_page += len(shared_pages)
            if shared:
                seqs.append((ctx[:shared], 0, shared_pages))
                rows.append((None, [], 0))
            for i in members:
                cont = [int(t) for t in requests[i][1]]
                query = list(ctx[shared:]) + cont[:-1]  # the last token's own prediction is not needed
                own = list(range(next_page, next_page + -(-len(query) // page_size)))
                next_page += len(own)
                seqs.append((query, shared, shared_pages + own))
                rows.append((i, cont, len(query) - len(cont)))
        T = _pow2(sum(len(q) for q, _, _ in seqs), 128)
        targets = np.zeros(T, np.int32)
        start = 0
        for (query, _, _), (i, cont, offset) in zip(seqs, rows):
            if i is not None:
                targets[start + offset:start + len(query)] = cont
            start += len(query)
        inputs = _ragged_inputs(seqs, page_size, T, _pow2(len(seqs), 8),
                                _pow2(max(len(p) for _, _, p in seqs), 4))
        cache = init_cache(cfg, _pow2(next_page, 16), page_size, dtype)
        chosen, greedy = _paged_scorer(cfg, attn_impl)(params, cache, inputs, jnp.asarray(targets))
        chosen, greedy = np.asarray(chosen), np.asarray(greedy)
        start = 0
        for (query, _, _), (i, cont, offset) in zip(seqs, rows):
            if i is not None:
                results[i] = (chosen[start + offset:start + len(query)], greedy[start + offset:start + len(query)])
            start += len(query)

    chunk, tokens = [], 0
    for ctx, members in groups.items():
        size = len(ctx) + sum(len(requests[i][1]) + page_size for i in members)
        if chunk and tokens + size > max_tokens_per_step:
            run_step(chunk)
            chunk, tokens = [], 0
        chunk.append((ctx, members))
        tokens += size
    if chunk:
        run_step(chunk)
    return results
