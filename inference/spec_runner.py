"""Speculative decoding inside the batching engine: its config, the draft model and its runner.

The engine (inference/engine.py) drives one speculative step per running decode sequence:
proposals are attached with `Scheduler.set_draft_tokens` before `schedule()`, the target scores the
last token plus the guesses in the step's one forward, and `speculative.verify` (run on device in
the same jitted program) decides the accepted prefix and the one target token after it.

Two proposers:

* "ngram" -- prompt lookup (`speculative.NgramProposer`) over prompt + output on the host. Free to
  run; pays off on input-grounded text (summaries, quoting, code edits) and on looping output.
* "draft" -- `DraftRunner`: any model with the target's vocabulary (`SpeculativeConfig.model`: a path
  loaded like the target, already loaded (cfg, params), or None for the target's own weights),
  optionally quantized (`quantization`, e.g. the target's own weights in int8/int4) and/or cut to
  its first `draft_num_layers` layers (`model.llama.forward(..., num_layers=N)`). It drafts k tokens
  autoregressively on the device, sampling each from its own distribution q
  (`speculative.draft_probs_to_proposal`), and `verify` uses q for exact rejection sampling.

KV cache of the draft. The draft owns a paged pool of its own, with the target's page ids: page p of
the draft pool holds the draft's K/V of the tokens whose target K/V sit in page p of the target's
pool. The scheduler's block tables therefore serve both pools, and pages are allocated, shared
through the prefix cache, freed on finish/abort/preemption and rolled back (by `num_computed_tokens`
alone: slots past it are never read) for both at once. To keep the pools in step, every target step
is followed by `DraftRunner.write_kv` on the same step inputs: the draft computes its K/V for exactly
the tokens the target computed (prompt chunks, the last token and the verified guesses) at the same
slots. Only the draft's own k proposal tokens need somewhere else to go:

  * positions that fall in the sequence's last, partly filled page are written into that page of the
    draft pool: it is private (never in the prefix cache while it is the sequence's next write page)
    and the next `write_kv` overwrites those slots before anything reads them;
  * positions beyond the sequence's pages go to *scratch pages*: extra pages after the scheduler's
    `num_pages` in the draft pool (the allocator never hands them out), `ceil(k / page_size)` per row.

One proposal is k ordinary ragged decode steps of the draft (one token per row) in one `lax.scan`
inside one jitted program.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.runner import pow2_bucket
from inference.sampler import SamplingTensors
from inference.sampling_params import SAMPLING_EPS, SamplingParams
from inference.speculative import draft_probs_to_proposal
from model.config import LlamaConfig
from model.llama import StepInputs, forward, hidden_states, init_cache, kv_bytes_per_token_elem, unstack_layers

METHODS = ("ngram", "draft")
DRAFT_QUANTIZATIONS = (None, "int8", "int4")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Engine-level speculative decoding settings (`EngineConfig.speculative`).

    Every request speculates by default when this is set; `Engine.add_request(..., speculate=False)`
    opts one out.
    """

    method: str = "ngram"                 # "ngram" (prompt lookup) or "draft" (a draft model)
    num_speculative_tokens: int = 4       # k: most guesses per sequence and step
    ngram_min: int = 1                    # n-gram match lengths tried, longest first
    ngram_max: int = 4
    # Draft model: None = the target's own weights; a path (GGUF file, HF directory, orbax checkpoint,
    # loaded like the target); or an already loaded (LlamaConfig, params). Not compared (params are arrays).
    model: Any = dataclasses.field(default=None, compare=False)
    quantization: Optional[str] = None    # quantize the draft's projections: None, "int8" or "int4"
    # Layers of the draft model that run (its first N). Default: all of them, except for the target's own
    # float weights (that would be the target itself), where it is a quarter of the layers (>= 1).
    draft_num_layers: Optional[int] = None
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
        if self.quantization not in DRAFT_QUANTIZATIONS:
            raise ValueError(f"draft quantization={self.quantization!r} must be one of {DRAFT_QUANTIZATIONS}")
        m = self.model
        if not (m is None or isinstance(m, (str, os.PathLike))
                or (isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], LlamaConfig))):
            raise ValueError(f"draft model of type {type(m).__name__} must be None, a path or a (LlamaConfig, params) "
                             f"pair")
        if self.method != "draft" and (m is not None or self.quantization is not None):
            raise ValueError(f"a draft model / quantization needs method='draft', not method={self.method!r}")

    @classmethod
    def coerce(cls, value) -> Optional["SpeculativeConfig"]:
        """None / SpeculativeConfig / dict of its fields -> SpeculativeConfig or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"speculative must be a SpeculativeConfig, a dict or None, got {type(value).__name__}")

    @property
    def drafts_with_target_weights(self) -> bool:
        return self.model is None and self.quantization is None

    def draft_layers(self, cfg: LlamaConfig) -> int:
        """Layers of the draft model `cfg` that run."""
        if self.draft_num_layers is None:
            return max(1, cfg.num_layers // 4) if self.drafts_with_target_weights else cfg.num_layers
        if self.draft_num_layers > cfg.num_layers:
            raise ValueError(f"draft_num_layers={self.draft_num_layers} exceeds the draft model's "
                             f"num_layers={cfg.num_layers}")
        return self.draft_num_layers


# ============================================================================ loading


def _compute_dtype(params):
    return next(a.dtype for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.floating))


def _stacked(params):
    """params with "layers" stacked on a leading axis (undoes model.llama.unstack_layers)."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}


def load_draft(spec: SpeculativeConfig, target_cfg: LlamaConfig, target_params) -> tuple[LlamaConfig, Any]:
    """The draft model's (config, device params) for `spec`: loaded, cast to the target's compute dtype,
    quantized if asked, in the target's layer layout (stacked or unstacked) unless quantized (quantized
    weights stay stacked, as in LLM). ValueError when its vocabulary size differs from the target's."""
    from model.quantize import QuantizedWeight, default_int4_group_size, quantize_params

    if spec.model is None:
        cfg, params, name = target_cfg, target_params, "the target's own weights"
    elif isinstance(spec.model, tuple):
        (cfg, params), name = spec.model, f"draft model {spec.model[0].name!r}"
    else:
        from model.checkpoint import load_model

        cfg, params, _ = load_model(spec.model)
        name = f"draft model {str(spec.model)!r}"
    if cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(f"{name} has vocab_size={cfg.vocab_size} but the target {target_cfg.name!r} has "
                         f"vocab_size={target_cfg.vocab_size}: a draft must share the target's vocabulary")
    if spec.model is not None or spec.quantization is not None:
        dtype = _compute_dtype(target_params)
        is_quantized = lambda a: isinstance(a, QuantizedWeight)  # noqa: E731
        params = jax.tree.map(lambda a: a if is_quantized(a) else jnp.asarray(a, dtype), params, is_leaf=is_quantized)
    if spec.quantization is not None:
        params = _stacked(params)
        group = default_int4_group_size(params) if spec.quantization == "int4" else 64
        params = quantize_params(params, spec.quantization, group)
    elif isinstance(target_params["layers"], (list, tuple)):
        params = unstack_layers(params)
    return cfg, jax.device_put(params)


# ============================================================================ draft runner


class DraftRow(NamedTuple):
    """One sequence to draft for."""

    last_token: int               # the sequence's last token (not yet in the KV cache)
    num_computed: int             # its KV length: every token but the last one
    block_table: Sequence[int]    # its pages (the target's page ids)
    num_tokens: int               # guesses wanted (<= k)
    params: SamplingParams        # its sampling settings (temperature, top-k/top-p/min-p shape q)
    step: int                     # tokens it generated so far (selects the draws' keys, as in verify)
    fallback_seed: int


@functools.lru_cache(maxsize=None)
def _write_kv_fn(cfg: LlamaConfig, num_layers: int, attn_impl: str):
    """Jitted draft forward over a target step's inputs, for its K/V only (the pool is donated)."""

    def run(params, cache, inputs: StepInputs):
        return hidden_states(params, cache, inputs, cfg, attn_impl=attn_impl, num_layers=num_layers)[1]

    return jax.jit(run, donate_argnums=(1,))


@functools.lru_cache(maxsize=None)
def _propose_fn(cfg: LlamaConfig, num_layers: int, attn_impl: str, sampled: bool):
    """Jitted k draft steps; each feeds the previous step's guess. sampled=False: all rows greedy (argmax,
    no q returned). Returns (guesses [B, k], q [B, k, V] or None, pool); the pool is donated."""

    def run(params, cache, tensors: SamplingTensors, first_tokens, positions, slots, kv_lens, block_tables,
            cu_q_lens, num_seqs):
        B = first_tokens.shape[0]
        pad = positions.shape[1] - B  # padding tokens (slot -1) after the B real rows
        k = positions.shape[0]

        def one_step(carry, xs):
            tokens, cache = carry
            i, pos, slot, kv_len = xs
            inputs = StepInputs(jnp.pad(tokens, (0, pad)), pos, slot, cu_q_lens, kv_len, block_tables, num_seqs,
                                jnp.arange(B, dtype=jnp.int32))  # row b's one token sits at b
            logits, cache = forward(params, cache, inputs, cfg, attn_impl=attn_impl, num_layers=num_layers)
            guess, q = draft_probs_to_proposal(logits, tensors, i, greedy=not sampled)
            return (guess, cache), (guess, q if sampled else None)

        (_, cache), (guesses, probs) = jax.lax.scan(
            one_step, (first_tokens, cache), (jnp.arange(k, dtype=jnp.int32), positions, slots, kv_lens))
        return guesses.T, None if probs is None else probs.transpose(1, 0, 2), cache

    return jax.jit(run, donate_argnums=(1,))


class DraftRunner:
    """A draft model with its own KV pool beside the target's (see the module docstring)."""

    def __init__(self, cfg: LlamaConfig, params, num_layers: int, k: int, page_size: int, num_pages: int,
                 max_num_seqs: int, kv_dtype, attn_impl: str = "auto"):
        self.cfg, self.params, self.num_layers, self.k = cfg, params, num_layers, k
        self.page_size, self.attn_impl = page_size, attn_impl
        self.max_rows = pow2_bucket(max_num_seqs)
        self.scratch_per_row = self.scratch_pages_per_row(k, page_size)
        self.first_scratch_page = num_pages  # scratch pages follow the scheduler's pages
        self.num_scratch_pages = self.max_rows * self.scratch_per_row
        self._new_cache = functools.partial(init_cache, dataclasses.replace(cfg, num_layers=num_layers),
                                            num_pages + self.num_scratch_pages, page_size, kv_dtype)
        self.cache = self._new_cache()
        self.num_calls = 0

    @staticmethod
    def scratch_pages_per_row(k: int, page_size: int) -> int:
        return -(-k // page_size)

    @staticmethod
    def bytes_per_page(cfg: LlamaConfig, num_layers: int, page_size: int, kv_dtype) -> int:
        """Bytes of one page of a draft pool (K and V of num_layers layers, an int8 pool's scales included)."""
        elems = 2 * num_layers * cfg.num_kv_heads * page_size * cfg.head_dim
        return int(np.ceil(elems * kv_bytes_per_token_elem(cfg.head_dim, kv_dtype)))

    # ------------------------------------------------------------------ pool
    def write_kv(self, inputs: StepInputs) -> None:
        """Writes the draft's K/V for the tokens of a target step (same inputs: same tokens and slots)."""
        self.cache = _write_kv_fn(self.cfg, self.num_layers, self.attn_impl)(self.params, self.cache, inputs)

    def cache_lost(self) -> bool:
        """True when the pool was donated to a program whose result never came back (an interrupt)."""
        return self.cache is not None and any(a.is_deleted() for a in jax.tree.leaves(self.cache))

    def reset_cache(self) -> None:
        self.cache = self._new_cache()

    def release(self) -> None:
        self.params = self.cache = None

    # ------------------------------------------------------------------ proposals
    def propose(self, rows: Sequence[DraftRow]) -> tuple[list[np.ndarray], Optional[jax.Array]]:
        """Drafts every row's guesses: (guesses per row, int32 [num_tokens]; q [B, k, V] on device, row i of
        `rows` at index i, or None when every row is greedy (q one-hot))."""
        n, k, ps = len(rows), self.k, self.page_size
        if n > self.max_rows:
            raise ValueError(f"{n} draft rows exceed the {self.max_rows} rows with scratch pages")
        B = min(pow2_bucket(n), self.max_rows)
        # At least 8 token rows, like the target's steps: XLA on CPU runs a 1-token step ~30x slower.
        T = max(B, 8)
        P = pow2_bucket(max(len(r.block_table) for r in rows) + self.scratch_per_row)
        first = np.zeros(B, np.int32)
        positions = np.zeros((k, T), np.int32)
        slots = np.full((k, T), -1, np.int32)  # padding rows write nowhere
        kv_lens = np.zeros((k, B), np.int32)
        tables = np.zeros((B, P), np.int32)
        for b, r in enumerate(rows):
            if len(r.block_table) * ps < r.num_computed:
                raise ValueError(f"row {b}: {len(r.block_table)} pages cannot hold {r.num_computed} computed tokens")
            scratch = self.first_scratch_page + b * self.scratch_per_row + np.arange(self.scratch_per_row)
            full_table = np.concatenate([np.asarray(r.block_table, np.int64), scratch]).astype(np.int32)
            tables[b, :len(full_table)] = full_table
            first[b] = r.last_token
            pos = r.num_computed + np.arange(k)
            positions[:, b] = pos
            slots[:, b] = full_table[pos // ps] * ps + pos % ps
            kv_lens[:, b] = pos + 1
        cu_q_lens = np.minimum(np.arange(B + 1), n).astype(np.int32)  # one query per real row
        tensors = SamplingTensors.from_params([r.params for r in rows], steps=[r.step for r in rows],
                                              fallback_seeds=[r.fallback_seed for r in rows], pad_to=B)
        sampled = any(r.params.temperature >= SAMPLING_EPS for r in rows)
        fn = _propose_fn(self.cfg, self.num_layers, self.attn_impl, sampled)
        guesses, probs, self.cache = fn(self.params, self.cache, tensors, first, positions, slots, kv_lens, tables,
                                        cu_q_lens, np.array([n], np.int32))
        self.num_calls += 1
        guesses = np.asarray(jax.device_get(guesses))
        return [guesses[b, :r.num_tokens] for b, r in enumerate(rows)], probs
