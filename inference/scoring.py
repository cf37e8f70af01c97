"""Teacher-forced scoring of token lists: many texts per packed ragged step, shared prefixes computed once.

`score_tokens` is the one scorer behind `LLM.score`, `LLM.generate(prompt_logprobs=k)` and the lm-eval
backend (`score_continuations`). It runs the model's ragged paged forward (the engine's step program
without sampling) over a scratch page pool that lives for one step; logits are reduced to log-probabilities
on device in row chunks, so a [T, vocab] float32 matrix is never transferred (or, for long texts, held at
once).

Prefix sharing: the whole pages of the texts form a tree (like the prefix cache's chain of pages). Pages
that two or more texts share become one *shared segment*, a sequence of the step that writes their K/V
once; every text (or deeper shared segment) below it is a sequence whose block table starts with those
pages. This works inside a single step because each layer writes the step's K/V into the pages before any
sequence attends. A segment's last row predicts a token that differs per child, so each child starts one
position earlier: it re-queries that last token (slot -1, nothing written; its K/V is read from the
parent's page) and its first row predicts the child's own first token. A tree goes into one step whole;
trees are packed into steps of about `max_tokens_per_step` tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.runner import pow2_bucket
from model.config import LlamaConfig
from model.llama import StepInputs, hidden_states, init_cache, logits_from_hidden

_ROW_CHUNK = 128


class TokenScores(NamedTuple):
    """Scores of one token list `ids` of n tokens: row i is the prediction of ids[i + 1]."""

    logprobs: np.ndarray      # [n - 1] f32 log p(ids[i+1] | ids[:i+1])
    is_argmax: np.ndarray     # [n - 1] bool ids[i+1] is the most likely next token
    top_ids: np.ndarray       # [n - 1, top_k] i32 the top_k most likely next tokens
    top_logprobs: np.ndarray  # [n - 1, top_k] f32 their log-probabilities


@functools.lru_cache(maxsize=None)
def _paged_scorer(cfg: LlamaConfig, attn_impl: str, top_k: int):
    """One ragged step over a scratch page pool: per row, log p(target), whether the target is the argmax,
    and the top_k alternatives."""
    def run(params, cache, inputs: StepInputs, targets):
        h, _ = hidden_states(params, cache, inputs, cfg, attn_impl=attn_impl)
        T = h.shape[0]

        def chunk(args):
            h_rows, tgt = args
            logprobs = jax.nn.log_softmax(logits_from_hidden(params, h_rows, cfg), axis=-1)
            chosen = jnp.take_along_axis(logprobs, tgt[:, None], axis=-1)[:, 0]
            if top_k:
                top_lp, top_ids = jax.lax.top_k(logprobs, top_k)
            else:
                top_lp = jnp.zeros((h_rows.shape[0], 0), jnp.float32)
                top_ids = jnp.zeros((h_rows.shape[0], 0), jnp.int32)
            return chosen, jnp.argmax(logprobs, axis=-1) == tgt, top_lp, top_ids

        rows = min(_ROW_CHUNK, T)
        out = jax.lax.map(chunk, (h.reshape(T // rows, rows, -1), targets.reshape(T // rows, rows)))
        chosen, greedy, top_lp, top_ids = (x.reshape(T, *x.shape[2:]) for x in out)
        return chosen, greedy, top_lp, top_ids

    return jax.jit(run)


@dataclass
class _Segment:
    """One sequence of a packed step: whole shared pages, or the rest of one text."""

    start: int                  # position of its first own token (a page boundary)
    tokens: list                # its own tokens, whose K/V it writes
    parent: Optional["_Segment"]
    targets: list               # the next token of each query row that has one known here
    text: Optional[int] = None  # the text it finishes; None for a shared segment
    pages: list = field(default_factory=list)  # its own physical pages in the step's pool

    @property
    def query(self) -> list:
        """Its tokens, after the parent's last token re-queried (K/V read from the parent's page)."""
        return ([self.parent.tokens[-1]] if self.parent is not None else []) + self.tokens

    @property
    def block_table(self) -> list:
        return (self.parent.block_table if self.parent is not None else []) + self.pages


def _segments(token_lists: Sequence[list], page_size: int) -> list[list[_Segment]]:
    """Groups the texts into trees of segments (each tree: its segments, parents first)."""
    node_of: dict[tuple, int] = {}  # (parent node, page tokens) -> node
    paths, count = [], []
    for ids in token_lists:
        computed = ids[:-1]  # the last token's own prediction is not needed, nor its K/V
        path, parent = [], -1
        for p in range(len(computed) // page_size):
            key = (parent, tuple(computed[p * page_size:(p + 1) * page_size]))
            if key not in node_of:
                node_of[key] = len(count)
                count.append(0)
            parent = node_of[key]
            count[parent] += 1
            path.append((parent, list(key[1])))
        paths.append(path)

    shared: dict[int, _Segment] = {}  # node -> the shared segment holding its page
    trees: dict[int, list[_Segment]] = {}  # root segment id -> its segments
    root_of: dict[int, int] = {}  # id of a segment -> id of its tree's root segment
    for i, (ids, path) in enumerate(zip(token_lists, paths)):
        parent_seg, parent_node = None, None
        depth = 0
        for node, page in path:
            if count[node] < 2:
                break
            if node not in shared:
                if parent_seg is not None and count[parent_node] == count[node]:  # same texts: extend it
                    parent_seg.tokens += page
                    parent_seg.targets += page
                    shared[node] = parent_seg
                else:  # a new segment; its first row re-reads the parent's last token, if any
                    seg = _Segment(depth * page_size, list(page), parent_seg,
                                   list(page) if parent_seg is not None else list(page[1:]))
                    root = root_of[id(parent_seg)] if parent_seg is not None else id(seg)
                    root_of[id(seg)] = root
                    trees.setdefault(root, []).append(seg)
                    shared[node] = seg
            parent_seg, parent_node = shared[node], node
            depth += 1
        start = depth * page_size
        first = start - 1 if parent_seg is not None else 0  # position of its first query row
        tail = _Segment(start, list(ids[start:len(ids) - 1]), parent_seg, list(ids[first + 1:]), text=i)
        if parent_seg is None:
            trees[id(tail)] = [tail]
        else:
            trees[root_of[id(parent_seg)]].append(tail)
    return list(trees.values())


def _ragged_inputs(segments: list[_Segment], page_size: int, T: int, S: int, P: int) -> StepInputs:
    """The step's sequences padded to T tokens, S sequences and P block-table columns."""
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.full(T, -1, np.int32)
    cu = np.zeros(S + 1, np.int32)
    kv_lens = np.zeros(S, np.int32)
    tables = np.zeros((S, P), np.int32)
    start = 0
    for s, seg in enumerate(segments):
        query, table = seg.query, seg.block_table
        n, first = len(query), seg.start - len(query) + len(seg.tokens)
        pos = np.arange(first, first + n)
        tokens[start:start + n] = query
        positions[start:start + n] = pos
        own = pos >= seg.start  # a re-queried parent token writes nothing (slot -1)
        slots[start:start + n][own] = (np.asarray(table)[pos[own] // page_size] * page_size
                                       + pos[own] % page_size)
        tables[s, :len(table)] = table
        kv_lens[s] = first + n
        start += n
        cu[s + 1:] = start
    return StepInputs(tokens=jnp.asarray(tokens), positions=jnp.asarray(positions), slot_mapping=jnp.asarray(slots),
                      cu_q_lens=jnp.asarray(cu), kv_lens=jnp.asarray(kv_lens), block_tables=jnp.asarray(tables),
                      num_seqs=jnp.asarray([len(segments)], np.int32), logits_indices=jnp.arange(T, dtype=jnp.int32))


def score_tokens(params, cfg: LlamaConfig, token_lists: Sequence[Sequence[int]], *, top_k: int = 0,
                 attn_impl: str = "auto", page_size: int = 16, max_tokens_per_step: int = 1024,
                 cache_sharding: Optional[dict] = None) -> list[TokenScores]:
    """Scores every token list (each at least one token) in packed steps; shared whole pages once.

    cache_sharding: {"k", "v"} shardings for the scratch pool, like the engine's (tensor parallelism).
    """
    token_lists = [[int(t) for t in ids] for ids in token_lists]
    for i, ids in enumerate(token_lists):
        if not ids:
            raise ValueError(f"token list {i} is empty: nothing to score")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size={page_size} must be a power of two")
    dtype = jax.tree.leaves(params)[0].dtype
    if not jnp.issubdtype(dtype, jnp.floating):  # quantized weights: a float32 scratch pool
        dtype = jnp.float32
    empty = TokenScores(np.zeros(0, np.float32), np.zeros(0, bool), np.zeros((0, top_k), np.int32),
                        np.zeros((0, top_k), np.float32))
    results: list = [empty] * len(token_lists)  # one-token lists keep it: nothing predicts their token

    def run_step(segments: list[_Segment]):
        next_page = 0
        for seg in segments:  # own pages: its tokens start on a page boundary
            seg.pages = list(range(next_page, next_page + -(-len(seg.tokens) // page_size)))
            next_page += len(seg.pages)
        T = pow2_bucket(sum(len(seg.query) for seg in segments), 128)
        targets = np.zeros(T, np.int32)
        start = 0
        for seg in segments:
            targets[start:start + len(seg.targets)] = seg.targets
            start += len(seg.query)
        inputs = _ragged_inputs(segments, page_size, T, pow2_bucket(len(segments), 8),
                                pow2_bucket(max(len(seg.block_table) for seg in segments), 4))
        cache = init_cache(cfg, pow2_bucket(next_page, 16), page_size, dtype, sharding=cache_sharding)
        out = _paged_scorer(cfg, attn_impl, top_k)(params, cache, inputs, jnp.asarray(targets))
        chosen, greedy, top_lp, top_ids = (np.asarray(x) for x in out)
        start, rows = 0, {}
        for seg in segments:
            n = len(seg.targets)
            rows[id(seg)] = (chosen[start:start + n], greedy[start:start + n], top_ids[start:start + n],
                             top_lp[start:start + n])
            start += len(seg.query)
        for seg in segments:
            if seg.text is None:
                continue
            chain, s = [], seg
            while s is not None:
                chain.append(rows[id(s)])
                s = s.parent
            results[seg.text] = TokenScores(*(np.concatenate(cols) for cols in zip(*reversed(chain))))

    step, tokens = [], 0
    for tree in _segments(token_lists, page_size):
        tree = [seg for seg in tree if seg.text is None or len(token_lists[seg.text]) > 1]
        if not tree:
            continue
        size = sum(len(seg.query) for seg in tree)
        if step and tokens + size > max_tokens_per_step:
            run_step(step)
            step, tokens = [], 0
        step += tree
        tokens += size
    if step:
        run_step(step)
    return results


def token_logprobs(params, cfg: LlamaConfig, ids: list[int], attn_impl: str = "auto") -> np.ndarray:
    """log p(ids[i+1] | ids[:i+1]) for i in 0..len-2, float32 [len - 1]."""
    return score_tokens(params, cfg, [ids], attn_impl=attn_impl)[0].logprobs


def prompt_logprob_entries(ids: Sequence[int], scores: TokenScores) -> list:
    """vLLM-style prompt_logprobs: [None] then, per later prompt token, {token: logprob} with the top-k
    alternatives plus the actual token."""
    out = [None]
    for i in range(len(ids) - 1):
        entry = {int(t): float(lp) for t, lp in zip(scores.top_ids[i], scores.top_logprobs[i])}
        entry[int(ids[i + 1])] = float(scores.logprobs[i])
        out.append(entry)
    return out


def prompt_top_logprobs(params, cfg: LlamaConfig, ids: list[int], k: int, attn_impl: str = "auto"):
    """prompt_logprob_entries of one token list with the top-k alternatives."""
    return prompt_logprob_entries(ids, score_tokens(params, cfg, [ids], top_k=k, attn_impl=attn_impl)[0])


def score_continuations(params, cfg: LlamaConfig, requests, *, attn_impl: str = "auto", page_size: int = 16,
                        max_tokens_per_step: int = 1024, cache_sharding: Optional[dict] = None):
    """log p(continuation | context) token by token, for lm-eval style (context_ids, continuation_ids) pairs.

    Returns, per request, (logprobs float32 [len(continuation)], is_argmax bool [len(continuation)]).
    Requests sharing a context (multiple-choice answers) compute its whole pages once (see score_tokens).
    """
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError(f"request {i}: context ({len(ctx)} tokens) and continuation ({len(cont)} tokens) "
                             f"must each have at least one token")
    scores = score_tokens(params, cfg, [list(ctx) + list(cont) for ctx, cont in requests], attn_impl=attn_impl,
                          page_size=page_size, max_tokens_per_step=max_tokens_per_step,
                          cache_sharding=cache_sharding)
    return [(s.logprobs[-len(cont):], s.is_argmax[-len(cont):]) for s, (_, cont) in zip(scores, requests)]
