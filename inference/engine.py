"""The engine: host-side continuous-batching scheduler + device model runner + sampler.

Each `step()`: the scheduler picks which sequences compute how many tokens (decodes, prefill chunks),
the runner pads the ragged batch to a shape bucket and runs one jitted program (model forward and
sampling on device), and the host appends the sampled tokens, checks stop conditions, and finishes
requests. Requests join and leave the running batch at every step.

Host cost per step stays flat in the output length: stop strings are checked on incrementally
decoded text (inference/stop.py), outputs (text, token list, logprobs) are built only for requests
that finish or stream, and penalty counts live on the device (`PenaltyState`: a row per running
request, written once at admission, incremented inside the jitted step). Steps are padded to a fixed
set of shapes (token buckets, with the sequence count tied to them, times a block-table width
ladder ending at max_model_len), which `warmup` compiles up front.

Multi-step decode (`EngineConfig.num_decode_steps` = k > 1): when every running sequence is decoding
and nothing waits for admission, one device program runs up to k decode steps (as many as the step's
token budget holds for every sequence; each feeds the previous step's sampled tokens, on device); the
host then checks stops token by token and keeps only the tokens up to a stop, exactly as the one-step
loop would have.

Overlapped dispatch (`EngineConfig.async_scheduling`): a plain step is launched, then the previous
step's tokens are read and processed (stop checks, detokenization, outputs) while the device runs it.
The scheduler takes each launched step at once with a placeholder token per sampling row, -(row + 1),
which the next step feeds and the runner replaces on the device with the token that row sampled;
`resolve_placeholders` swaps in the real tokens one step behind. A request that stopped on the pending
token loses what the step on top computed for it (its pages are freed, its penalty slot rewritten at
the next admission); seeded keys and min_tokens bans count the pending token, so tokens equal the
synchronous loop's. Steps sampling for a request whose inputs follow its last token on the host
(`_needs_host_tokens`: bad_words, structured output) are read before the next launch; speculative and multi-step engines
are synchronous. An interrupted step also discards the pending step, which is then redone.

Speculative decoding (`EngineConfig.speculative`, see inference/spec_runner.py): before scheduling,
every running decode sequence of a speculating request gets up to k guesses (n-gram lookup on the
host, or a draft model on the device, whose own KV pool follows every step: `ModelRunner.draft`).
The step's forward then also returns logits for the guesses, grouped per sequence into [S, k+1, V],
and `speculative.verify` runs in the same jitted program: each sequence emits its accepted guesses
plus one target token. The host feeds those tokens to the request's StopChecker one at a time and
keeps only those up to a stop; the scheduler then rolls back the KV of everything not kept. Greedy
output is identical with and without it.

Structured output (`SamplingParams.structured_outputs`, inference/structured_output.py): a constrained
request's grammar is compiled at `add_request` into an llguidance matcher; every step with a constrained
row computes the rows' allowed-token bitmask on the host and the sampler masks the logits with it on
device (steps without one run the unchanged program). The mask depends on every token before it, so
constrained requests never draft, and multi-step decode waits while one runs (plain single steps).
"""

from __future__ import annotations

import array
import collections
import dataclasses
import itertools
import time
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.kv_pool import BlockAllocator, device_memory, pages_for_memory_budget
from inference.outputs import CompletionOutput, RequestMetrics, RequestOutput
from inference.sampler import SamplingRows, SamplingTensors, next_engine_seed
from inference.sampling_params import MAX_LOGPROBS, SamplingParams
from inference.scheduler import Scheduler, SchedulerOutput, Sequence as SchedSequence, SequenceStatus, tokens_left
from inference.runner import ModelRunner, SpecBatch, pow2_bucket
from inference.spec_runner import DraftRow, DraftRunner, SpeculativeConfig, load_draft
from inference.speculative import AdaptiveK, NgramProposer, SpecDecodeStats
from inference.stop import StopChecker, append_batch
from inference.structured_output import StructuredOutputManager
from model.config import KV_CACHE_DTYPES, LlamaConfig
from model.llama import kv_bytes_per_token_elem, safe_pool_pages

_MAX_RETAINED_SPEC_STATS = 4096  # finished requests whose speculation metrics stay in request_spec_stats


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: Optional[int] = None  # explicit pool size; else from the memory budget below
    kv_cache_memory_bytes: Optional[int] = None  # explicit KV budget (CPU default: 1 GiB)
    gpu_memory_utilization: float = 0.9  # fraction of accelerator memory for weights + KV (vLLM-style)
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: Optional[int] = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attn_impl: str = "auto"
    kv_cache_dtype: str = "auto"  # "auto" = the compute dtype
    speculative: Optional[SpeculativeConfig] = None  # speculative decoding (also accepts a dict of its fields)
    # Multi-step decode: when every running sequence is decoding, run up to this many decode steps in one
    # device program (sampled tokens feed the next step on device; the host checks stops afterwards and
    # drops what a request generated past its stop). 1 = one step per program.
    num_decode_steps: int = 1
    # Overlapped dispatch: launch each step before reading the previous one's tokens (they feed it on the
    # device; the host processes results one step behind). Output is identical to the synchronous loop.
    async_scheduling: bool = False

    def __post_init__(self):
        object.__setattr__(self, "speculative", SpeculativeConfig.coerce(self.speculative))
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size={self.page_size} must be a power of two")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.num_decode_steps < 1:
            raise ValueError(f"num_decode_steps={self.num_decode_steps} must be >= 1")
        if self.speculative is not None and self.num_decode_steps > 1:
            raise ValueError(f"num_decode_steps={self.num_decode_steps} cannot be combined with speculative decoding")
        if self.async_scheduling and (self.speculative is not None or self.num_decode_steps > 1):
            raise ValueError(f"async_scheduling=True cannot be combined with speculative decoding or "
                             f"num_decode_steps={self.num_decode_steps} > 1 (they need each step's tokens on the host)")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs}")


class _RawLogprobs:
    """A request's logprobs not yet made into {token: logprob} dicts: per token its id, chosen logprob and
    top-k (ids, logprobs), in flat arrays of machine values (no Python object per token for the cyclic GC
    to walk again and again, nothing kept of the step's results)."""

    def __init__(self, k: int):
        self.k = k
        self.tokens, self.chosen = array.array("i"), array.array("f")
        self.top_ids, self.top_logprobs = array.array("i"), array.array("f")

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, chosen: float, top: "_StepTopK", row: int, i: int) -> None:
        """The token emitted i-th by sampling row `row` of the step whose candidates are `top`."""
        self.tokens.append(token)
        self.chosen.append(chosen)
        start = (row * top.per_row + i) * top.width * 4
        end = start + 4 * self.k
        self.top_ids.frombytes(top.ids[start:end])
        self.top_logprobs.frombytes(top.logprobs[start:end])

    def truncate(self, n: int) -> None:
        del self.tokens[n:], self.chosen[n:], self.top_ids[n * self.k:], self.top_logprobs[n * self.k:]

    def take(self) -> list[dict]:
        """The {token: logprob} dict of every token held (the top k, then the chosen token), emptying it."""
        k, ids, values = self.k, self.top_ids.tolist(), self.top_logprobs.tolist()
        entries = []
        for j, (token, chosen) in enumerate(zip(self.tokens.tolist(), self.chosen.tolist())):
            entry = dict(zip(ids[j * k:(j + 1) * k], values[j * k:(j + 1) * k]))
            entry[token] = chosen
            entries.append(entry)
        self.truncate(0)
        return entries


class _StepTopK(NamedTuple):
    """A step's top candidates as bytes, for `_RawLogprobs.add` to slice per token (one copy per step,
    not a numpy view per token)."""

    ids: bytes       # [S, K+1, width] int32, C order
    logprobs: bytes  # [S, K+1, width] float32
    per_row: int     # K+1
    width: int

    @classmethod
    def of(cls, out) -> "_StepTopK":
        _, per_row, width = out.top_ids.shape
        return cls(np.ascontiguousarray(out.top_ids, np.int32).tobytes(),
                   np.ascontiguousarray(out.top_logprobs, np.float32).tobytes(), per_row, width)


@dataclass
class _RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    params: SamplingParams
    stop: StopChecker
    fallback_seed: int
    metrics: RequestMetrics
    logprobs: Optional[list] = None  # {token: logprob} per generated token, built when an output is made
    raw_logprobs: Optional[_RawLogprobs] = None  # tokens not yet in `logprobs`
    cumulative_logprob: Optional[float] = None  # summed when logprobs are requested (as vLLM: else None)
    stream: bool = True  # report every step's progress (else only the final output)
    uses_penalties: bool = False
    sampling_fits: bool = False  # SamplingRows.fits(params): its rows can come from Engine.sampling_rows
    slot: Optional[int] = None  # penalty slot while running (uses_penalties only)
    sampling_slot: Optional[int] = None  # row of Engine.sampling_rows, from its first step until it ends
    speculate: bool = False
    adaptive: Optional[AdaptiveK] = None  # per-request k policy (None: always the engine's k)
    spec: Optional[SpecDecodeStats] = None  # per-request speculation metrics
    matcher: Optional[object] = None  # structured output: the llguidance matcher (fed every kept token)

    def checkpoint(self) -> tuple:
        """What a step's output processing changes, to restore if the step is rolled back (O(1): the
        lists are only appended to, so their lengths are enough)."""
        return (self.stop.snapshot(), None if self.raw_logprobs is None else len(self.raw_logprobs),
                self.cumulative_logprob)

    def restore(self, saved: tuple) -> None:
        stop, num_raw_logprobs, self.cumulative_logprob = saved
        if self.matcher is not None:  # it consumed every token the stop checker took since the checkpoint
            self.matcher.rollback(len(self.stop.token_ids) - stop[0])
        self.stop.restore(stop)
        if self.raw_logprobs is not None:
            self.raw_logprobs.truncate(num_raw_logprobs)


@dataclass
class _PendingStep:
    """An overlapped step: launched, its sampled tokens not read yet. Row b of its results (in
    `layout` order) is fed to the next step by the placeholder token -(b + 1)."""

    out: object  # the device results (runner.dispatch)
    layout: list  # (request_id, num_rows) per sampling row
    request_ids: frozenset


class Engine:
    """Continuous-batching engine. Use through `inference.LLM`, or directly:

        engine.add_request("a", token_ids, SamplingParams(max_tokens=8))
        while engine.has_unfinished_requests():
            for out in engine.step(): ...
    """

    def __init__(self, cfg: LlamaConfig, params, tokenizer, engine_cfg: EngineConfig = EngineConfig(),
                 cache_sharding=None, weight_bytes: int = 0):
        max_len_given = engine_cfg.max_model_len is not None
        engine_cfg = dataclasses.replace(engine_cfg, max_model_len=cfg.usable_context(engine_cfg.max_model_len))
        self.cfg, self.tokenizer, self.engine_cfg = cfg, tokenizer, engine_cfg
        compute_dtype = jax.tree.leaves(params)[0].dtype
        kv_dtype = compute_dtype if engine_cfg.kv_cache_dtype == "auto" else KV_CACHE_DTYPES[engine_cfg.kv_cache_dtype]
        spec = engine_cfg.speculative
        draft = None  # (config, params, layers) of a draft model
        if spec is not None and spec.method == "draft":
            if cache_sharding is not None:
                raise ValueError("speculative method='draft' is not supported with tensor parallelism")
            draft_cfg, draft_params = load_draft(spec, cfg, params)
            draft = (draft_cfg, draft_params, spec.draft_layers(draft_cfg))
        num_pages = engine_cfg.num_pages or self._pages_from_budget(kv_dtype, cache_sharding, draft)
        engine_cfg = self.engine_cfg = self._fit_max_model_len(engine_cfg, num_pages, max_len_given)
        self.allocator = BlockAllocator(num_pages, engine_cfg.page_size, engine_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, engine_cfg.max_num_seqs, engine_cfg.max_num_batched_tokens,
                                   engine_cfg.max_model_len, engine_cfg.enable_chunked_prefill)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else None
        self._requests: dict[str, _RequestState] = {}
        self._ids = itertools.count()
        self._free_slots = list(range(engine_cfg.max_num_seqs))[::-1]  # penalty slots (ModelRunner.penalties)
        # Sampling values of running requests, gathered per step (SamplingRows); one slot per request.
        self.sampling_rows = SamplingRows(engine_cfg.max_num_seqs)
        self._free_sampling_slots = list(range(engine_cfg.max_num_seqs))[::-1]
        self.structured: Optional[StructuredOutputManager] = None  # built at the first constrained request
        self.stats = {"steps": 0, "tokens_computed": 0, "tokens_generated": 0, "step_seconds": 0.0}
        self._pending: Optional[_PendingStep] = None  # async_scheduling: the step whose tokens are unread
        self._processing_pending = False  # step()'s checkpoints are of the pending step (else of this one)

        # Speculative decoding: the proposer, engine-wide metrics, and the metrics of recent requests.
        self.proposer = None  # NgramProposer (host) or DraftRunner (device, also the runner's `draft`)
        self.spec_stats: Optional[SpecDecodeStats] = None
        self.request_spec_stats: collections.OrderedDict[str, SpecDecodeStats] = collections.OrderedDict()
        self._draft_probs = None  # (q [B, k, V] on device, {request id: row}) of the last proposal
        if spec is not None:
            k = spec.num_speculative_tokens
            if spec.method == "ngram":
                self.proposer = NgramProposer(k, spec.ngram_min, spec.ngram_max)
            else:
                draft_cfg, draft_params, draft_layers = draft
                self.proposer = DraftRunner(draft_cfg, draft_params, draft_layers, k, engine_cfg.page_size, num_pages,
                                            engine_cfg.max_num_seqs, kv_dtype, engine_cfg.attn_impl)
            self.spec_stats = SpecDecodeStats()
        self.runner = ModelRunner(cfg, params, engine_cfg, num_pages, kv_dtype, cache_sharding,
                                  draft=self.proposer if isinstance(self.proposer, DraftRunner) else None)

    # ------------------------------------------------------------------ sizing
    @staticmethod
    def _fit_max_model_len(engine_cfg: EngineConfig, num_pages: int, max_len_given: bool) -> EngineConfig:
        """A pool that cannot hold one max_model_len request would fail requests mid-run: refused when
        max_model_len was asked for, else max_model_len is lowered to what the pool holds (as vLLM does)."""
        pool_tokens = num_pages * engine_cfg.page_size
        if pool_tokens >= engine_cfg.max_model_len:
            return engine_cfg
        message = (f"the KV pool of {num_pages} pages of {engine_cfg.page_size} tokens holds {pool_tokens} tokens, "
                   f"fewer than one request of max_model_len={engine_cfg.max_model_len} tokens needs "
                   f"({-(-engine_cfg.max_model_len // engine_cfg.page_size)} pages)")
        if max_len_given:
            raise ValueError(f"{message}; give more KV memory (num_pages, kv_cache_memory_bytes, "
                             f"gpu_memory_utilization) or a max_model_len <= {pool_tokens}")
        warnings.warn(f"{message}; lowering max_model_len to {pool_tokens}", stacklevel=3)
        return dataclasses.replace(engine_cfg, max_model_len=pool_tokens)

    def _pages_from_budget(self, kv_dtype, cache_sharding=None, draft=None) -> int:
        """Pages that fit one device's KV budget. Under TP each device holds only its KV heads of every
        page (sharding.rules.cache_sharding), so a page costs that device 1/split of its full bytes.
        With a draft model (config, params, layers), the budget also holds its pool."""
        ec, cfg = self.engine_cfg, self.cfg
        heads_per_device = cfg.num_kv_heads
        device = None
        if cache_sharding is not None:
            shape = (cfg.num_kv_heads, 1, ec.page_size, cfg.head_dim)
            heads_per_device = cache_sharding["k"].shard_shape(shape)[0]
            # Memory of this engine's first local device (not jax's default one, which may be another replica's).
            device = next((d for d in cache_sharding["k"].mesh.devices.flat if d.process_index == jax.process_index()),
                          None)
        if ec.kv_cache_memory_bytes is not None:
            budget = ec.kv_cache_memory_bytes
        else:
            mem = device_memory(device)
            if mem is None:  # CPU: no device memory stats; use a fixed budget
                budget = 1 << 30
            else:
                limit, in_use = mem
                budget = int(limit * ec.gpu_memory_utilization) - in_use
        # An int8 pool also holds one float32 scale per token per KV head (4 / head_dim bytes per element).
        itemsize = jnp.dtype(kv_dtype).itemsize
        spec, scratch = ec.speculative, 0
        if draft is not None:
            # A draft model's pool has a page beside every target page (plus its scratch pages): the budget
            # buys pairs of pages.
            draft_cfg, _, draft_layers = draft
            draft_page = DraftRunner.bytes_per_page(draft_cfg, draft_layers, ec.page_size, kv_dtype)
            target_page = DraftRunner.bytes_per_page(cfg, cfg.num_layers, ec.page_size, kv_dtype)
            scratch = pow2_bucket(ec.max_num_seqs) * DraftRunner.scratch_pages_per_row(spec.num_speculative_tokens,
                                                                                        ec.page_size)
            budget = (budget - scratch * draft_page) * target_page / (target_page + draft_page)
        budget = int(budget * itemsize / kv_bytes_per_token_elem(cfg.head_dim, kv_dtype))
        budget = budget * cfg.num_kv_heads // heads_per_device  # bytes of whole pages this device's share buys
        pages = pages_for_memory_budget(cfg, ec.page_size, itemsize, budget)
        # No point holding more than every sequence at full length needs.
        needed = ec.max_num_seqs * -(-ec.max_model_len // ec.page_size)
        pages = max(1, min(pages, needed))
        pages = safe_pool_pages(cfg, pages, ec.page_size, kv_dtype, heads_per_device)
        if draft is not None:
            draft_cfg, _, draft_layers = draft
            draft_pool = dataclasses.replace(draft_cfg, num_layers=draft_layers)
            heads = draft_cfg.num_kv_heads
            pages = safe_pool_pages(draft_pool, pages + scratch, ec.page_size, kv_dtype, heads) - scratch
        return max(1, pages)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: Optional[str], prompt_token_ids: Sequence[int],
                    params: SamplingParams, prompt: Optional[str] = None, speculate: Optional[bool] = None,
                    stream: bool = True) -> str:
        """Queues a request; raises ValueError (naming the value) if it can never run.

        speculate: whether this request uses the engine's speculative decoding (default: yes when the
        engine has `EngineConfig.speculative`); False opts it out.
        stream: `step()` returns this request's output at every step that gave it tokens; with False only
        when it finishes (no text, token list or logprobs are built for it before that).
        """
        spec = self.engine_cfg.speculative
        if speculate and spec is None:
            raise ValueError("speculate=True but the engine has no speculative config (EngineConfig.speculative)")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError(f"bad_words={params.bad_words!r} need a tokenizer; the engine has none")
            params.update_from_tokenizer(self.tokenizer)
        params.validate_token_ids(self.cfg.vocab_size)
        # Bad-word bans and grammars follow the output token by token, so such requests neither draft nor
        # multi-step.
        speculate = spec is not None and speculate is not False and not params.bad_words and params.grammar is None
        if params.n != 1:
            raise ValueError(f"n={params.n}: the engine runs single samples; LLM.generate fans n out")
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError(f"request {rid!r}: empty prompt (prompt={prompt!r}) has no tokens")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"request {rid!r}: token id {bad[0]} out of range for vocab_size={self.cfg.vocab_size}")
        max_len = self.engine_cfg.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"request {rid!r}: prompt length {len(ids)} tokens leaves no room to generate within "
                             f"the context window max_model_len={max_len}")
        max_tokens = min(params.max_tokens, max_len - len(ids))
        matcher = None
        if params.grammar is not None:
            if self.structured is None:
                self.structured = StructuredOutputManager(self.tokenizer, self.cfg.vocab_size, self.eos_token_id)
            matcher = self.structured.new_matcher(params.grammar, rid)
        decode = (lambda toks, skip=params.skip_special_tokens: self.tokenizer.decode(toks, skip_special_tokens=skip)) \
            if self.tokenizer is not None else (lambda toks: "")
        state = _RequestState(
            request_id=rid, prompt=prompt, prompt_token_ids=ids, params=params,
            stop=StopChecker(params, self.eos_token_id, decode), fallback_seed=next_engine_seed(),
            metrics=RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(ids)),
            logprobs=[] if params.logprobs is not None else None,
            raw_logprobs=_RawLogprobs(params.logprobs) if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None, stream=stream,
            uses_penalties=(params.repetition_penalty != 1.0 or bool(params.presence_penalty)
                            or bool(params.frequency_penalty)), sampling_fits=SamplingRows.fits(params),
            speculate=speculate,
            adaptive=AdaptiveK(spec.num_speculative_tokens) if speculate and spec.adaptive else None,
            spec=SpecDecodeStats() if spec is not None else None, matcher=matcher)
        self.scheduler.add_request(rid, ids, max_tokens=max_tokens)
        self._requests[rid] = state
        return rid

    def abort(self, request_id: str) -> bool:
        state = self._requests.pop(request_id, None)
        if state is not None:
            self._free_slot(state)
            self._free_sampling_slot(state)
        return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._pending is not None

    # ------------------------------------------------------------------ step
    def _free_slot(self, state: _RequestState) -> None:
        if state.slot is not None:
            self._free_slots.append(state.slot)
            state.slot = None

    def _free_sampling_slot(self, state: _RequestState) -> None:
        if state.sampling_slot is not None:
            self._free_sampling_slots.append(state.sampling_slot)
            state.sampling_slot = None

    def _sampling_tensors(self, rows: list[_RequestState], steps: list[int], S: int, bitmask) -> SamplingTensors:
        """The step's host SamplingTensors: gathered from `sampling_rows` when every row's values are the
        same at every step (the usual case), else built from the rows' SamplingParams."""
        if bitmask is None and all(r.sampling_fits and step >= r.params.min_tokens for r, step in zip(rows, steps)):
            for r in rows:
                if r.sampling_slot is None:
                    r.sampling_slot = self._free_sampling_slots.pop()
                    self.sampling_rows.write(r.sampling_slot, r.params, r.fallback_seed)
            return self.sampling_rows.gather([r.sampling_slot for r in rows], steps, S)
        return SamplingTensors.from_params(
            [r.params for r in rows], steps=steps, fallback_seeds=[r.fallback_seed for r in rows],
            eos_token_id=self.eos_token_id, pad_to=S, output_token_ids=[r.stop.token_ids for r in rows],
            token_bitmask=bitmask, on_device=False)

    def _penalty_slots(self, sched: SchedulerOutput, rows: list[_RequestState], num_rows: int):
        """Keeps a penalty slot for every running request that uses penalties; returns the step's
        slot per sampling row (num_slots for rows without), or None when no row uses penalties."""
        for rid in sched.preempted_request_ids:  # recomputed later: its row is rebuilt on readmission
            state = self._requests.get(rid)
            if state is not None and self.scheduler.get_request(rid).status is not SequenceStatus.RUNNING:
                self._free_slot(state)
                self._free_sampling_slot(state)  # slots are for running requests only: max_num_seqs of them
        if not any(r.uses_penalties for r in rows):
            return None
        slots = np.full(num_rows, self.runner.num_slots, np.int32)
        for i, r in enumerate(rows):
            if r.uses_penalties:
                if r.slot is None:
                    r.slot = self._free_slots.pop()
                    self.runner.write_penalty_row(r.slot, r.stop.token_ids, r.prompt_token_ids)
                slots[i] = r.slot
        return slots

    def step(self) -> list[RequestOutput]:
        """One engine iteration. Returns outputs of requests that finished, and of streamed requests
        (`add_request(stream=True)`) that got new tokens.

        An exception or interrupt (KeyboardInterrupt) anywhere in the step rolls it back before it
        propagates: requests are left as they were before the step (the KV a half-run step wrote is never
        read), so the next step works and gives the same tokens."""
        checkpoints: dict[str, dict] = {}
        try:
            return self._step(checkpoints)
        except BaseException:
            self._roll_back_step(checkpoints)
            raise

    def _roll_back_step(self, checkpoints: dict[str, dict]) -> None:
        """Undoes a step that did not complete. `checkpoints` holds the host state (stop checker,
        logprobs) of each request whose outputs were being processed, as it was before the step; once
        the scheduler took the step's results they stand, and so does that host state."""
        committed = not self.scheduler.step_in_flight
        self.scheduler.cancel_step()
        # An overlapped step whose tokens were not resolved is redone too (same tokens: same step counts).
        self._pending = None
        if self._processing_pending:
            committed = not self.scheduler.discard_placeholders()
        else:
            self.scheduler.discard_placeholders()
        for rid, saved in checkpoints.items() if not committed else ():
            state = self._requests.get(rid)
            if state is not None:
                state.restore(saved)
        if self.runner.cache_lost():
            # Every page's KV is gone: recompute every request from its tokens in a fresh pool.
            self.runner.reset_cache()
            self.scheduler.reset_pool()
            self.allocator = self.scheduler.allocator
        # The device penalty counts may hold the rolled-back tokens (or the state was donated and lost):
        # rebuild every row from the host's token lists when its request next runs.
        self.runner.reset_penalties()
        self._free_slots = list(range(self.engine_cfg.max_num_seqs))[::-1]
        for state in self._requests.values():
            state.slot = None
        # Requests the scheduler finished while the step was cut short have no output to give any more.
        for rid in [rid for rid in self._requests if not self.scheduler.has_request(rid)]:
            self._retire(self._requests[rid])

    def _step(self, checkpoints: dict[str, dict]) -> list[RequestOutput]:
        t0 = time.perf_counter()
        self._processing_pending = False
        self._propose_drafts()
        lookahead = self._attach_lookahead()
        sched = self.scheduler.schedule()
        results: list[RequestOutput] = []
        if sched.out_of_pool:  # what they keep includes the pending step's token
            results += self._finish_pending(checkpoints)
        for seq in sched.failed:
            state = self._requests.pop(seq.request_id, None)
            if state is not None:
                self._free_slot(state)
                self._free_sampling_slot(state)
                results.append(self._error_output(state, seq.error))
        for seq in sched.out_of_pool:  # keeps what it generated; finish_reason "length", the pool named
            state = self._requests.get(seq.request_id)
            if state is not None:
                state.stop.finish_reason, state.stop.stop_reason = "length", seq.error
                state.metrics.finished_time = time.perf_counter()
                results.append(self._output(state, finished=True))
                self._retire(state)
        if sched.is_empty:
            self.scheduler.update_from_output({})
            return results + self._finish_pending(checkpoints)
        now = time.perf_counter()
        for s in sched.scheduled:
            m = self._requests[s.request_id].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        layout = sched.sampling_layout
        rows = [self._requests[rid] for rid, _ in layout]
        # Multi-step only if the step is what the lookahead planned: every sequence decoding. Otherwise
        # (a recompute was admitted after a preemption) the placeholders are ignored for this step.
        multi_step = lookahead and all(s.samples and s.num_new_tokens - s.num_draft_tokens == 1
                                       for s in sched.scheduled)
        S = self.runner.rows_bucket(sched, multi_step)
        # (A row fed a pending token has held its penalty slot since that step: no row is rebuilt
        # from host tokens that lack it.)
        slots = self._penalty_slots(sched, rows, S)
        pending_ids = self._pending.request_ids if self._pending is not None else frozenset()
        # Seeded keys and min_tokens bans follow the request's step count, pending token included.
        steps = [len(r.stop.token_ids) + (r.request_id in pending_ids) for r in rows]
        bitmask = self.structured.bitmask([r.matcher for r in rows], S) if self.structured is not None else None
        tensors = self._sampling_tensors(rows, steps, S, bitmask)
        # One logprobs width for all: a per-request k would be another program to compile. None: no
        # request wants logprobs, and the program skips the vocab-wide log-softmax.
        num_logprobs = MAX_LOGPROBS if any(r.params.logprobs is not None for r in rows) else None
        spec_batch = None if multi_step else self._spec_batch(sched, rows, steps, S)
        if multi_step:
            out = self.runner.execute_decode_steps(sched, tensors, slots, num_logprobs,
                                                   self.engine_cfg.num_decode_steps)
        elif spec_batch is not None:
            out = self.runner.execute(sched, tensors, slots, num_logprobs, spec_batch)
        else:
            launched = self.runner.dispatch(sched, tensors, slots, num_logprobs)
            results += self._finish_pending(checkpoints)  # while the device runs this step
            if self.engine_cfg.async_scheduling and not any(map(self._needs_host_tokens, rows)):
                self._defer(launched, layout)
                self._count_step(sched, t0)
                return results
            out = self.runner.fetch(launched)

        sampled, finished = self._take_results(layout, out, checkpoints)
        done = self.scheduler.update_from_output(sampled, finished)  # from here on the step stands
        self._emit(done, sampled, results)
        self._count_step(sched, t0)
        return results

    # ------------------------------------------------------------------ overlapped steps
    @staticmethod
    def _needs_host_tokens(state: _RequestState) -> bool:
        """Whether the request's next step needs its last token on the host (its inputs depend on it), so
        a step that samples for it is read before the next one is scheduled."""
        return bool(state.params.bad_words) or state.matcher is not None  # structured: the next mask

    def _defer(self, launched, layout: list) -> None:
        """Leaves a launched step pending: the scheduler takes a placeholder token per sampling row (the
        next step feeds it from the device), and its real tokens are processed in the next step()."""
        live = [(b, rid) for b, (rid, _) in enumerate(layout) if rid in self._requests]
        self._pending = _PendingStep(launched, layout, frozenset(rid for _, rid in live))
        self.scheduler.update_from_output({rid: -(b + 1) for b, rid in live}, placeholders=True)

    def _finish_pending(self, checkpoints: dict[str, dict]) -> list[RequestOutput]:
        """Reads and processes the pending step's tokens (stop checks, outputs); its stopped requests
        lose what the step launched on top of it computed for them."""
        pending = self._pending
        if pending is None:
            return []
        self._processing_pending = True
        sampled, finished = self._take_results(pending.layout, self.runner.fetch(pending.out), checkpoints)
        done = self.scheduler.resolve_placeholders({rid: t[0] for rid, t in sampled.items()}, finished)
        self._pending = None  # the step stands
        results: list[RequestOutput] = []
        self._emit(done, sampled, results)
        checkpoints.clear()
        self._processing_pending = False
        return results

    # ------------------------------------------------------------------ step results
    def _decode_batch(self, seqs: list[list[int]], skip_special_tokens: bool) -> list[str]:
        """Texts of many id lists in one tokenizer call (the stop checks of a step's rows); the same
        texts as a decode of each."""
        tok = self.tokenizer
        if tok is None:
            return [""] * len(seqs)
        if hasattr(tok, "decode_batch"):
            return tok.decode_batch(seqs, skip_special_tokens=skip_special_tokens)
        return [tok.decode(ids, skip_special_tokens=skip_special_tokens) for ids in seqs]

    def _take_results(self, layout: list, out, checkpoints: dict[str, dict]) -> tuple[dict, dict]:
        """Feeds each row's emitted tokens to its request's stop checks; returns the kept tokens and the
        stop reasons by request id. Rows of requests that ended meanwhile (aborted, or stopped while
        this step was overlapped) are skipped."""
        sampled, finished = {}, {}
        now = time.perf_counter()
        # Python lists once per step: indexing numpy arrays element by element costs more than the rest.
        tokens, chosen_logprobs = out.tokens.tolist(), out.chosen_logprob.tolist()
        num_output = out.num_output.tolist()
        max_model_len = self.engine_cfg.max_model_len
        batch: list[tuple[str, _RequestState, int]] = []  # rows of one token: stop checks batched below
        top = None  # the step's top candidates, copied out once if a row wants logprobs
        for row, (rid, num_rows) in enumerate(layout):
            state = self._requests.get(rid)
            if state is None:
                continue
            checkpoints[rid] = state.checkpoint()
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            # Emitted tokens go through the stop checks one by one: a stop (EOS, stop string,
            # max_tokens) in the middle of an accepted block discards the tokens after it, and the
            # scheduler is told only the kept ones (it rolls back the KV of the rest).
            # (A request the scheduler ended out of pool while its last step was pending keeps that token.)
            n = num_output[row]
            if n > 1:  # (room is at least 1)
                seq = self.scheduler.find_request(rid)
                n = min(n, tokens_left(seq, max_model_len) if seq is not None else 1)
            kept = []
            for i in range(n):
                token, chosen = tokens[row][i], chosen_logprobs[row][i]
                kept.append(token)
                if state.raw_logprobs is not None:  # made into {token: logprob} by _output
                    top = top or _StepTopK.of(out)
                    state.raw_logprobs.add(token, chosen, top, row, i)
                    state.cumulative_logprob += chosen
                if n == 1 and state.matcher is None:
                    batch.append((rid, state, token))  # its only token: nothing after it to discard
                    break
                reason = state.stop.append(token)
                if state.matcher is not None and self.structured.advance(state.matcher, token) and reason is None:
                    reason = state.stop.finish_stop()  # the grammar is complete: nothing but EOS could follow
                if reason is not None:
                    finished[rid] = reason
                    break
            sampled[rid] = kept
            if state.spec is not None:
                self._record_spec(state, num_rows - 1, int(out.num_accepted[row]), len(kept))
        if batch:
            reasons = append_batch([state.stop for _, state, _ in batch], [token for _, _, token in batch],
                                   self._decode_batch)
            for (rid, _, _), reason in zip(batch, reasons):
                if reason is not None:
                    finished[rid] = reason
        return sampled, finished

    def _emit(self, done: list[SchedSequence], sampled: dict, results: list[RequestOutput]) -> None:
        """Final outputs of the finished requests, progress of the streamed ones."""
        now = time.perf_counter()
        for seq in done:
            state = self._requests[seq.request_id]
            if not state.stop.finished:  # the scheduler ended it (max_tokens / context window)
                state.stop.finish_reason = "length"
            state.metrics.finished_time = now
            state.metrics.num_cached_tokens = seq.num_cached_tokens
            state.metrics.num_preemptions = seq.num_preemptions
            results.append(self._output(state, finished=True))
            self._retire(state)
        for rid in sampled:
            state = self._requests.get(rid)
            if state is not None and state.stream:
                results.append(self._output(state, finished=False))
        self.stats["tokens_generated"] += sum(len(t) for t in sampled.values())

    def _count_step(self, sched: SchedulerOutput, t0: float) -> None:
        self.stats["steps"] += 1
        self.stats["tokens_computed"] += sched.num_batched_tokens
        self.stats["step_seconds"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ speculation
    def _attach_lookahead(self) -> bool:
        """Multi-step decode: when every running sequence decodes and nothing can be admitted, gives each
        one placeholder draft tokens for the tokens it will sample inside the program (so the scheduler
        allocates their pages). Requests inside their min_tokens window, with bad_words or with structured
        output keep it one step at a time (their bans and masks change between steps)."""
        sch = self.scheduler
        if not sch.running:
            return False
        # Each sequence's 1 + placeholders tokens count against the step's token budget: as many steps
        # as fit for all of them (a block the scheduler could only part-schedule would run as one
        # plain step over all the placeholders' positions, discarding them).
        k = min(self.engine_cfg.num_decode_steps, sch.max_num_batched_tokens // len(sch.running))
        if k <= 1 or (sch.waiting and len(sch.running) < sch.max_num_seqs):
            return False
        for seq in sch.running:
            state = self._requests.get(seq.request_id)
            if (state is None or not seq.is_decoding or len(seq.output_token_ids) < state.params.min_tokens
                    or state.params.bad_words or state.matcher is not None):
                return False
        lookahead = [(seq, min(k, tokens_left(seq, self.engine_cfg.max_model_len)) - 1) for seq in sch.running]
        for seq, n in lookahead:
            sch.set_draft_tokens(seq.request_id, [0] * n)
        return any(n for _, n in lookahead)

    def _propose_drafts(self) -> None:
        """Attaches guesses to every running decode sequence of a speculating request."""
        self._draft_probs = None
        if self.proposer is None:
            return
        k_max = self.engine_cfg.speculative.num_speculative_tokens
        wanted: list[tuple[SchedSequence, int]] = []
        for seq in self.scheduler.running:
            state = self._requests.get(seq.request_id)
            if state is None or not state.speculate or not seq.is_decoding:
                continue
            k = state.adaptive.next_k() if state.adaptive is not None else k_max
            # Guesses past the last token the request may emit would be wasted compute.
            k = min(k, tokens_left(seq, self.engine_cfg.max_model_len) - 1)
            if k > 0:
                wanted.append((seq, k))
            else:
                self.scheduler.set_draft_tokens(seq.request_id, [])
        if not wanted:
            return
        if isinstance(self.proposer, DraftRunner):
            rows = []
            for seq, k in wanted:
                state = self._requests[seq.request_id]
                rows.append(DraftRow(seq.all_token_ids[-1], seq.num_computed_tokens, seq.block_table, k, state.params,
                                     len(state.stop.token_ids), state.fallback_seed))
            drafts, probs = self.proposer.propose(rows)
            self._draft_probs = (probs, {seq.request_id: j for j, (seq, _) in enumerate(wanted)})
        else:
            drafts = [self.proposer.propose(seq.all_token_ids, k) for seq, k in wanted]
        for (seq, _), d in zip(wanted, drafts):
            self.scheduler.set_draft_tokens(seq.request_id, d)

    def _spec_batch(self, sched: SchedulerOutput, rows: list[_RequestState], steps: list[int],
                    S: int) -> Optional[SpecBatch]:
        """Verify inputs of the step, or None when no sequence carries guesses: then the plain sampling
        program runs, which does not pay for k+1 logits rows per sequence (verify with no guesses
        would sample exactly the same tokens)."""
        drafted = [s for s in sched.scheduled if s.samples]
        if self.proposer is None or not any(s.num_draft_tokens for s in drafted):
            return None
        K = self.engine_cfg.speculative.num_speculative_tokens
        draft_tokens = np.zeros((S, K), np.int32)
        num_draft = np.zeros(S, np.int32)
        ban_len = np.zeros(S, np.int32)
        probs, probs_row = self._draft_probs if self._draft_probs is not None else (None, {})
        probs_rows = np.zeros(S, np.int32) if probs is not None else None
        for b, (s, state, step) in enumerate(zip(drafted, rows, steps)):
            n = s.num_draft_tokens
            if n:
                draft_tokens[b, :n] = s.token_ids[-n:]
                if probs is not None:  # the q these guesses were drawn from (rows without guesses ignore it)
                    probs_rows[b] = probs_row[s.request_id]
            num_draft[b] = n
            ban_len[b] = max(state.params.min_tokens - step, 0)
        return SpecBatch(draft_tokens, num_draft, ban_len, probs, probs_rows)

    def _record_spec(self, state: _RequestState, num_draft: int, num_accepted: int, num_kept: int) -> None:
        if state.adaptive is not None:
            state.adaptive.update(num_draft, num_accepted)
        for stats in (state.spec, self.spec_stats):
            stats.update([num_draft], [num_accepted], [num_kept])

    def _retire(self, state: _RequestState) -> None:
        """Forgets a finished request, keeping its speculation metrics (bounded to the most recent ones)."""
        del self._requests[state.request_id]
        self._free_slot(state)
        self._free_sampling_slot(state)
        if state.spec is not None:
            self.request_spec_stats[state.request_id] = state.spec
            while len(self.request_spec_stats) > _MAX_RETAINED_SPEC_STATS:
                self.request_spec_stats.popitem(last=False)

    def _output(self, state: _RequestState, finished: bool) -> RequestOutput:
        state.metrics.num_generated_tokens = len(state.stop.token_ids)
        if state.raw_logprobs:
            state.logprobs.extend(state.raw_logprobs.take())
        completion = CompletionOutput(
            index=0, text=state.stop.text, token_ids=list(state.stop.token_ids),
            finish_reason=state.stop.finish_reason if finished else None, stop_reason=state.stop.stop_reason,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            cumulative_logprob=state.cumulative_logprob)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, [completion], finished,
                             metrics=state.metrics)

    def _error_output(self, state: _RequestState, error: str) -> RequestOutput:
        state.metrics.finished_time = time.perf_counter()
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids,
                             [CompletionOutput(0, "", [], "error")], True, metrics=state.metrics, error=error)

    def run(self, on_output: Optional[Callable[[RequestOutput], None]] = None) -> dict[str, RequestOutput]:
        """Steps until every request finished; returns the final output of each."""
        final = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if on_output is not None:
                    on_output(out)
                if out.finished:
                    final[out.request_id] = out
        return final

    def warmup(self, logprobs: Sequence[bool] = (False, True), penalties: Sequence[bool] = (False, True),
               max_seq_len: Optional[int] = None, structured_output: Sequence[bool] = (False,)) -> int:
        """Runs (so compiles) the plain step program at every shape bucket for the given logprobs, penalty
        and structured-output (token mask) variants, up to `max_seq_len` tokens per sequence (default
        max_model_len); returns the number of programs run. Speculative verify programs are not covered."""
        max_len = min(max_seq_len or self.engine_cfg.max_model_len, self.engine_cfg.max_model_len)
        widths = [None] * (False in logprobs) + [MAX_LOGPROBS] * (True in logprobs)
        return self.runner.warmup(widths, sorted(set(penalties)), max_len, self.eos_token_id,
                                  masked=sorted(set(structured_output)))

    def scheduler_stats(self) -> dict:
        out = {**self.scheduler.stats(), **self.stats, "device_wait_seconds": self.runner.device_wait_seconds,
               "prefix_hits": self.allocator.stats.prefix_hits,
               "prefix_tokens_saved": self.allocator.stats.prefix_tokens_saved}
        if self.spec_stats is not None:
            st = self.spec_stats
            out.update(spec_draft_tokens=st.num_draft_tokens, spec_accepted_tokens=st.num_accepted_tokens,
                       spec_acceptance_rate=st.acceptance_rate, spec_tokens_per_forward=st.mean_tokens_per_forward)
        return out

    def request_spec_metrics(self, request_id: str) -> Optional[SpecDecodeStats]:
        """Speculation metrics of a running or recently finished request (None if unknown)."""
        state = self._requests.get(request_id)
        return state.spec if state is not None else self.request_spec_stats.get(request_id)

    def close(self):
        self.runner.release()
