"""Speculative decoding inside the batching engine: its config and the layer-truncated self-draft runner.

The engine (inference/engine.py) drives one speculative step per running decode sequence:
proposals are attached with `Scheduler.set_draft_tokens` before `schedule()`, the target scores the
last token plus the guesses in the step's one forward, and `speculative.verify` (run on device in
the same jitted program) decides the accepted prefix and the one target token after it.

Two proposers:

* "ngram" -- prompt lookup (`speculative.NgramProposer`) over prompt + output on the host. Free to
  run; pays off on input-grounded text (summaries, quoting, code edits) and on looping output.
* "draft" -- `SelfDraftRunner`: the first N layers of the target itself, followed by the target's
  final norm and head, i.e. a smaller model sharing the tokenizer and the weights.

KV cache of the self-draft. The draft's layers 0..N-1 ARE the target's layers 0..N-1, so for every
committed token the draft's K/V equal the target's K/V of those layers, which the target already
wrote to the shared page pool. The draft therefore needs no cache of its own for the context: it
reads the target's pages (layer l of page p is physical page l * P + p, DESIGN.md). Only the
draft's own k new tokens need somewhere to go:

  * positions that fall in the sequence's last, partly filled page are written into that page: it
    is private (never in the prefix cache while it is the target's next write page) and the
    target's next step overwrites those slots before it reads them;
  * positions beyond the sequence's pages go to *scratch pages*: extra pages appended to the pool
    after the scheduler's `num_pages` (the allocator never hands them out), `ceil(k / page_size)`
    per batch row.

So one draft step is an ordinary ragged decode step of the truncated model (one token per row);
the k steps run in one `lax.scan` inside one jitted program. The draft is greedy (its guesses are a
deterministic function of the context, so `verify` with draft_probs=None is exact for sampled rows
too; it only accepts less often than a sampled draft would).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.runner import pow2_bucket
from model.config import LlamaConfig
from model.llama import StepInputs, _layer, logits_from_hidden, rms_norm

METHODS = ("ngram", "draft")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Engine-level speculative decoding settings (`EngineConfig.speculative`).

    Every request speculates by default when this is set; `Engine.add_request(..., speculate=False)`
    opts one out.
    """

    method: str = "ngram"                 # "ngram" (prompt lookup) or "draft" (layer-truncated self-draft)
    num_speculative_tokens: int = 4       # k: most guesses per sequence and step
    ngram_min: int = 1                    # n-gram match lengths tried, longest first
    ngram_max: int = 4
    draft_num_layers: Optional[int] = None  # self-draft depth N (default: a quarter of the layers, >= 1)
    adaptive: bool = True                 # per-request `speculative.AdaptiveK` (shrink / disable k on low acceptance)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method={self.method!r} must be one of {METHODS}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens} must be >= 1")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.draft_num_layers is not None and self.draft_num_layers < 1:
            raise ValueError(f"draft_num_layers={self.draft_num_layers} must be >= 1")

    @classmethod
    def coerce(cls, value) -> Optional["SpeculativeConfig"]:
        """None / SpeculativeConfig / dict of its fields -> SpeculativeConfig or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"speculative must be a SpeculativeConfig, a dict or None, got {type(value).__name__}")

    def draft_layers(self, cfg: LlamaConfig) -> int:
        n = self.draft_num_layers if self.draft_num_layers is not None else max(1, cfg.num_layers // 4)
        if n > cfg.num_layers:
            raise ValueError(f"draft_num_layers={n} exceeds the target's num_layers={cfg.num_layers}")
        return n


# Cache entries in the order `model.llama._layer` carries them through the layer scan (its
# `cache_carry`): (k, v) for a float pool, plus the scales of an int8 pool.
_CACHE_KEYS = ("k", "v", "k_scale", "v_scale")


@functools.lru_cache(maxsize=None)
def _draft_fn(cfg: LlamaConfig, num_layers: int, attn_impl: str):
    """Jitted k greedy steps of the first `num_layers` layers; the cache is donated (scratch writes)."""

    def run(params, cache, first_tokens, positions, slots, kv_lens, block_tables, cu_q_lens, num_seqs):
        layers = params["layers"]
        num_pages = cache["k"].shape[1] // cfg.num_layers  # pages per layer of the TARGET's pool
        keys = [key for key in _CACHE_KEYS if key in cache]
        B = first_tokens.shape[0]
        pad = positions.shape[1] - B  # padding tokens (slot -1) after the B real rows

        def draft_layers(inputs, carry):
            """The first num_layers layers of the target; carry = (x, *cache entries)."""
            if isinstance(layers, (list, tuple)):  # unstacked (model.llama.unstack_layers): unrolled
                for i in range(num_layers):
                    carry, _ = _layer(cfg, inputs, attn_impl, None, num_pages, carry, (i, layers[i]))
                return carry

            def body(carry, i):
                # Index the stacked weights per layer: slicing layers[:N] up front would copy N layers
                # of weights on every call.
                p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), layers)
                return _layer(cfg, inputs, attn_impl, None, num_pages, carry, (i, p))

            return jax.lax.scan(body, carry, jnp.arange(num_layers, dtype=jnp.int32))[0]

        def one_step(carry, xs):
            tokens, *pool = carry
            pos, slot, kv_len = xs
            tokens_t = jnp.pad(tokens, (0, pad))
            inputs = StepInputs(tokens_t, pos, slot, cu_q_lens, kv_len, block_tables, num_seqs,
                                jnp.arange(B, dtype=jnp.int32))
            x = jnp.take(params["embed"], tokens_t, axis=0)
            x, *pool = draft_layers(inputs, (x, *pool))
            h = rms_norm(x[:B], params["final_norm"], cfg.rms_norm_eps)  # row b's one token sits at b
            guess = jnp.argmax(logits_from_hidden(params, h, cfg), axis=-1).astype(jnp.int32)
            return (guess, *pool), guess

        (_, *pool), guesses = jax.lax.scan(
            one_step, (first_tokens, *(cache[key] for key in keys)), (positions, slots, kv_lens))
        return guesses.T, dict(zip(keys, pool))  # [B, k]

    return jax.jit(run, donate_argnums=(1,))


class SelfDraftRunner:
    """Greedy layer-truncated self-draft over the target's KV pool (see the module docstring)."""

    def __init__(self, cfg: LlamaConfig, num_layers: int, k: int, page_size: int, num_pages: int,
                 max_num_seqs: int, attn_impl: str = "auto"):
        self.cfg, self.num_layers, self.k = cfg, num_layers, k
        self.page_size, self.attn_impl = page_size, attn_impl
        self.max_rows = pow2_bucket(max_num_seqs)
        self.scratch_per_row = -(-k // page_size)
        self.first_scratch_page = num_pages  # scratch pages follow the scheduler's pages
        self.num_scratch_pages = self.max_rows * self.scratch_per_row
        self.num_calls = 0

    def propose(self, params, cache, rows: Sequence[tuple[int, int, Sequence[int]]], ks: Sequence[int]):
        """Guesses for each row (last_token, num_computed, block_table), row i trimmed to ks[i] tokens.

        num_computed is the sequence's KV length (every token but the last one); the draft feeds the
        last token and then its own guesses. Returns (list of int32 arrays, updated cache).
        """
        n, k, ps = len(rows), self.k, self.page_size
        if n > self.max_rows:
            raise ValueError(f"{n} draft rows exceed the {self.max_rows} rows with scratch pages")
        B = min(pow2_bucket(n), self.max_rows)
        # At least 8 token rows, like the target's steps: XLA on CPU runs a 1-token step ~30x slower.
        T = max(B, 8)
        P = pow2_bucket(max(len(bt) for _, _, bt in rows) + self.scratch_per_row)
        first = np.zeros(B, np.int32)
        positions = np.zeros((k, T), np.int32)
        slots = np.full((k, T), -1, np.int32)  # padding rows write nowhere
        kv_lens = np.zeros((k, B), np.int32)
        tables = np.zeros((B, P), np.int32)
        for b, (last, computed, table) in enumerate(rows):
            if len(table) * ps < computed:
                raise ValueError(f"row {b}: {len(table)} pages cannot hold {computed} computed tokens")
            scratch = self.first_scratch_page + b * self.scratch_per_row + np.arange(self.scratch_per_row)
            full_table = np.concatenate([np.asarray(table, np.int64), scratch]).astype(np.int32)
            tables[b, :len(full_table)] = full_table
            first[b] = last
            pos = computed + np.arange(k)
            positions[:, b] = pos
            slots[:, b] = full_table[pos // ps] * ps + pos % ps
            kv_lens[:, b] = pos + 1
        cu_q_lens = np.minimum(np.arange(B + 1), n).astype(np.int32)  # one query per real row
        fn = _draft_fn(self.cfg, self.num_layers, self.attn_impl)
        guesses, cache = fn(params, cache, first, positions, slots, kv_lens, tables, cu_q_lens,
                            np.array([n], np.int32))
        self.num_calls += 1
        guesses = np.asarray(jax.device_get(guesses))
        return [guesses[b, :ks[b]] for b in range(n)], cache
