"""The engine: host-side continuous-batching scheduler + device model runner + sampler.

Each `step()`: the scheduler picks which sequences compute how many tokens (decodes, prefill chunks),
the runner pads the ragged batch to a shape bucket and runs one jitted program (model forward and
sampling on device), and the host appends the sampled tokens, checks stop conditions, and finishes
requests. Requests join and leave the running batch at every step.

Speculative decoding (`EngineConfig.speculative`, see inference/spec_runner.py): before scheduling,
every running decode sequence of a speculating request gets up to k guesses (n-gram lookup on the
host, or the layer-truncated self-draft on device). The step's forward then also returns logits for
the guesses, grouped per sequence into [S, k+1, V], and `speculative.verify` runs in the same jitted
program: each sequence emits its accepted guesses plus one target token. The host feeds those
tokens to the request's StopChecker one at a time and keeps only those up to a stop; the scheduler
then rolls back the KV of everything not kept. Greedy output is identical with and without it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.kv_pool import BlockAllocator, device_memory, pages_for_memory_budget
from inference.outputs import CompletionOutput, RequestMetrics, RequestOutput
from inference.sampler import SamplingTensors, next_engine_seed, sample
from inference.sampling_params import SamplingParams
from inference.scheduler import Scheduler, SchedulerOutput, Sequence as SchedSequence
from inference.spec_runner import SelfDraftRunner, SpeculativeConfig
from inference.speculative import AdaptiveK, NgramProposer, SpecDecodeStats, verify
from inference.stop import StopChecker
from model.config import LlamaConfig
from model.llama import StepInputs, forward, init_cache, kv_bytes_per_token_elem, safe_pool_pages

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "int8": jnp.int8}
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

    def __post_init__(self):
        object.__setattr__(self, "speculative", SpeculativeConfig.coerce(self.speculative))
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size={self.page_size} must be a power of two")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs}")


def _pow2_at_least(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@functools.lru_cache(maxsize=None)
def _sample_step_fn(cfg: LlamaConfig, attn_impl: str, num_logprobs: int):
    """Jitted forward + sample with the cache donated. Module-level so that engines with the same
    config share compiled programs (params are arguments, never closed over)."""

    def step(params, cache, inputs: StepInputs, tensors: SamplingTensors, token_counts, prompt_mask):
        logits, cache = forward(params, cache, inputs, cfg, attn_impl=attn_impl)
        out = sample(logits, tensors, token_counts, prompt_mask, num_logprobs=num_logprobs)
        return out, cache

    return jax.jit(step, donate_argnums=(1,))


@functools.lru_cache(maxsize=None)
def _verify_step_fn(cfg: LlamaConfig, attn_impl: str, num_logprobs: int):
    """Jitted forward + speculative verify: logits_indices come grouped as [S * (k+1)] (row-major)."""

    def step(params, cache, inputs: StepInputs, tensors: SamplingTensors, token_counts, prompt_mask,
             draft_tokens, num_draft, ban_len):
        logits, cache = forward(params, cache, inputs, cfg, attn_impl=attn_impl)
        S, K = draft_tokens.shape
        out = verify(logits.reshape(S, K + 1, logits.shape[-1]), draft_tokens, None, num_draft, tensors,
                     token_counts=token_counts, prompt_mask=prompt_mask, ban_len=ban_len,
                     num_logprobs=num_logprobs)
        return out, cache

    return jax.jit(step, donate_argnums=(1,))


class StepResult(NamedTuple):
    """Host results of one step, per sampling row (in `sampling_layout` order, padded to S rows).

    A plain step emits one token per row (K = 0); a speculative step emits the accepted guesses and
    then the target's token: `tokens[b, :num_output[b]]`.
    """

    tokens: np.ndarray          # [S, K+1] int32
    num_output: np.ndarray      # [S] int32, 1..K+1
    num_accepted: np.ndarray    # [S] int32 guesses accepted (num_output - 1)
    chosen_logprob: np.ndarray  # [S, K+1] f32 raw logprob of each emitted token
    top_logprobs: np.ndarray    # [S, K+1, n] f32
    top_ids: np.ndarray         # [S, K+1, n] int32


class SpecBatch(NamedTuple):
    """Per sampling row inputs of a speculative step (padded to S rows; K = the engine's k)."""

    draft_tokens: np.ndarray  # [S, K] int32 guesses fed after the last token (0 padding)
    num_draft: np.ndarray     # [S] int32 guesses of the row (0 = plain sampling row)
    ban_len: np.ndarray       # [S] int32 leading positions the min_tokens ban covers


class ModelRunner:
    """Owns the device params and KV pool; runs one padded, jitted step (forward + sample or verify)."""

    def __init__(self, cfg: LlamaConfig, params, engine_cfg: EngineConfig, num_pages: int,
                 kv_dtype, param_sharding=None, cache_sharding=None, extra_pages: int = 0):
        self.cfg = cfg
        self.engine_cfg = engine_cfg
        self.num_pages = num_pages  # pages the scheduler allocates; `extra_pages` more follow (draft scratch)
        self.params = params
        self.cache = init_cache(cfg, num_pages + extra_pages, engine_cfg.page_size, kv_dtype, sharding=cache_sharding)
        self.max_pages_per_seq = -(-engine_cfg.max_model_len // engine_cfg.page_size) if engine_cfg.max_model_len else None
        self.compiled_shapes: set = set()

    def bucket(self, sched: SchedulerOutput) -> tuple[int, int, int]:
        """(tokens, seqs, pages) padded sizes: powers of two, so few programs are compiled."""
        ec = self.engine_cfg
        T = _pow2_at_least(sched.num_batched_tokens, 8)
        S = min(_pow2_at_least(len(sched.scheduled)), _pow2_at_least(ec.max_num_seqs))
        S = max(S, len(sched.scheduled))
        P = _pow2_at_least(max(len(s.block_table) for s in sched.scheduled))
        return T, S, P

    def execute(self, sched: SchedulerOutput, tensors: SamplingTensors, penalties: Optional[tuple],
                num_logprobs: int, spec: Optional[SpecBatch] = None) -> StepResult:
        """Runs the step (with `spec`: forward + verify of the drafts); returns host results per sampling row."""
        T, S, P = self.bucket(sched)
        counts, prompt_mask = penalties if penalties is not None else (None, None)
        if spec is None:
            arrays = sched.to_step_arrays(pad_tokens_to=T, pad_seqs_to=S, pad_pages_to=P, pad_logits_to=S)
            fn = _sample_step_fn(self.cfg, self.engine_cfg.attn_impl, num_logprobs)
            extra: tuple = ()
            K1 = 1
        else:
            arrays = sched.to_step_arrays(pad_tokens_to=T, pad_seqs_to=S, pad_pages_to=P)
            K1 = spec.draft_tokens.shape[1] + 1
            arrays["logits_indices"] = _group_logits_rows(arrays["logits_indices"], sched.sampling_layout, S, K1)
            fn = _verify_step_fn(self.cfg, self.engine_cfg.attn_impl, num_logprobs)
            extra = tuple(jnp.asarray(a) for a in spec)
        inputs = StepInputs(**{k: jnp.asarray(v) for k, v in arrays.items()})
        self.compiled_shapes.add((T, S, P, K1, num_logprobs, penalties is not None))
        out, self.cache = fn(self.params, self.cache, inputs, tensors, counts, prompt_mask, *extra)
        out = jax.device_get(out)
        if spec is None:  # one token per row: the K = 0 case of a verify result
            return StepResult(np.asarray(out.tokens)[:, None], np.ones(S, np.int32), np.zeros(S, np.int32),
                              np.asarray(out.chosen_logprob)[:, None],
                              np.asarray(out.top_logprobs)[:, None], np.asarray(out.top_ids)[:, None])
        return StepResult(np.asarray(out.output_tokens), np.asarray(out.num_output),
                          np.asarray(out.accepted_counts), np.asarray(out.chosen_logprob),
                          np.asarray(out.top_logprobs), np.asarray(out.top_ids))

    def release(self):
        self.params = None
        self.cache = None


def _group_logits_rows(flat: np.ndarray, layout: list, num_rows: int, k1: int) -> np.ndarray:
    """Ragged logits rows (1 + drafts per sampling sequence, in layout order) -> [num_rows * k1] where
    row b's block holds its rows then repeats of its last row (ignored by verify); padding rows use 0."""
    grouped = np.zeros((num_rows, k1), np.int32)
    start = 0
    for b, (_, n) in enumerate(layout):
        grouped[b, :n] = flat[start:start + n]
        grouped[b, n:] = flat[start + n - 1]
        start += n
    return grouped.reshape(-1)


@dataclass
class _RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    params: SamplingParams
    stop: StopChecker
    fallback_seed: int
    metrics: RequestMetrics
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    stream_sent: int = 0  # tokens already reported by streaming
    speculate: bool = False
    adaptive: Optional[AdaptiveK] = None  # per-request k policy (None: always the engine's k)
    spec: Optional[SpecDecodeStats] = None  # per-request speculation metrics


class Engine:
    """Continuous-batching engine. Use through `inference.LLM`, or directly:

        engine.add_request("a", token_ids, SamplingParams(max_tokens=8))
        while engine.has_unfinished_requests():
            for out in engine.step(): ...
    """

    def __init__(self, cfg: LlamaConfig, params, tokenizer, engine_cfg: EngineConfig = EngineConfig(),
                 param_sharding=None, cache_sharding=None, weight_bytes: int = 0):
        if engine_cfg.max_model_len is None:
            engine_cfg = dataclasses.replace(engine_cfg, max_model_len=cfg.max_position_embeddings)
        if engine_cfg.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={engine_cfg.max_model_len} exceeds the model's context window "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        self.cfg, self.tokenizer, self.engine_cfg = cfg, tokenizer, engine_cfg
        compute_dtype = jax.tree.leaves(params)[0].dtype
        kv_dtype = compute_dtype if engine_cfg.kv_cache_dtype == "auto" else _DTYPES[engine_cfg.kv_cache_dtype]
        num_pages = engine_cfg.num_pages or self._pages_from_budget(kv_dtype, cache_sharding)
        self.allocator = BlockAllocator(num_pages, engine_cfg.page_size, engine_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, engine_cfg.max_num_seqs, engine_cfg.max_num_batched_tokens,
                                   engine_cfg.max_model_len, engine_cfg.enable_chunked_prefill)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else None
        self._requests: dict[str, _RequestState] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "tokens_computed": 0, "tokens_generated": 0, "step_seconds": 0.0}

        # Speculative decoding: the proposer, engine-wide metrics, and the metrics of recent requests.
        spec = engine_cfg.speculative
        self.proposer = None  # NgramProposer (host) or SelfDraftRunner (device)
        self.spec_stats: Optional[SpecDecodeStats] = None
        self.request_spec_stats: collections.OrderedDict[str, SpecDecodeStats] = collections.OrderedDict()
        extra_pages = 0
        if spec is not None:
            k = spec.num_speculative_tokens
            if spec.method == "ngram":
                self.proposer = NgramProposer(k, spec.ngram_min, spec.ngram_max)
            else:
                self.proposer = SelfDraftRunner(cfg, spec.draft_layers(cfg), k, engine_cfg.page_size, num_pages,
                                                engine_cfg.max_num_seqs, engine_cfg.attn_impl)
                extra_pages = self.proposer.num_scratch_pages
            self.spec_stats = SpecDecodeStats()
        self.runner = ModelRunner(cfg, params, engine_cfg, num_pages, kv_dtype, param_sharding, cache_sharding,
                                  extra_pages=extra_pages)

    # ------------------------------------------------------------------ sizing
    def _pages_from_budget(self, kv_dtype, cache_sharding=None) -> int:
        """Pages that fit one device's KV budget. Under TP each device holds only its KV heads of every
        page (sharding.rules.cache_sharding), so a page costs that device 1/split of its full bytes."""
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
        budget = int(budget * itemsize / kv_bytes_per_token_elem(cfg.head_dim, kv_dtype))
        budget = budget * cfg.num_kv_heads // heads_per_device  # bytes of whole pages this device's share buys
        pages = pages_for_memory_budget(cfg, ec.page_size, itemsize, budget)
        # No point holding more than every sequence at full length needs.
        needed = ec.max_num_seqs * -(-ec.max_model_len // ec.page_size)
        pages = max(1, min(pages, needed))
        # A self-draft speculator appends scratch pages (SelfDraftRunner.num_scratch_pages) to the same array.
        spec = ec.speculative
        scratch = (_pow2_at_least(ec.max_num_seqs) * -(-spec.num_speculative_tokens // ec.page_size)
                   if spec is not None and spec.method != "ngram" else 0)
        return max(1, safe_pool_pages(cfg, pages + scratch, ec.page_size, kv_dtype, heads_per_device) - scratch)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: Optional[str], prompt_token_ids: Sequence[int],
                    params: SamplingParams, prompt: Optional[str] = None, speculate: Optional[bool] = None) -> str:
        """Queues a request; raises ValueError (naming the value) if it can never run.

        speculate: whether this request uses the engine's speculative decoding (default: yes when the
        engine has `EngineConfig.speculative`); False opts it out.
        """
        spec = self.engine_cfg.speculative
        if speculate and spec is None:
            raise ValueError("speculate=True but the engine has no speculative config (EngineConfig.speculative)")
        speculate = spec is not None and speculate is not False
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
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
        self.scheduler.add_request(rid, ids, max_tokens=max_tokens)
        decode = (lambda toks, skip=params.skip_special_tokens: self.tokenizer.decode(toks, skip_special_tokens=skip)) \
            if self.tokenizer is not None else (lambda toks: "")
        self._requests[rid] = _RequestState(
            request_id=rid, prompt=prompt, prompt_token_ids=ids, params=params,
            stop=StopChecker(params, self.eos_token_id, decode), fallback_seed=next_engine_seed(),
            metrics=RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(ids)),
            logprobs=[] if params.logprobs is not None else None, speculate=speculate,
            adaptive=AdaptiveK(spec.num_speculative_tokens) if speculate and spec.adaptive else None,
            spec=SpecDecodeStats() if spec is not None else None)
        return rid

    def abort(self, request_id: str) -> bool:
        self._requests.pop(request_id, None)
        return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ------------------------------------------------------------------ step
    def _penalty_arrays(self, rows: list[_RequestState], num_rows: int):
        if not any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
                   for r in rows):
            return None
        V = self.cfg.vocab_size
        counts = np.zeros((num_rows, V), np.int32)
        prompt_mask = np.zeros((num_rows, V), bool)
        for i, r in enumerate(rows):
            np.add.at(counts[i], np.asarray(r.stop.token_ids, np.int64), 1)
            prompt_mask[i, r.prompt_token_ids] = True
        return jnp.asarray(counts), jnp.asarray(prompt_mask)

    def step(self) -> list[RequestOutput]:
        """One engine iteration. Returns outputs of requests that finished or got new tokens."""
        t0 = time.perf_counter()
        self._propose_drafts()
        sched = self.scheduler.schedule()
        results: list[RequestOutput] = []
        for seq in sched.failed:
            state = self._requests.pop(seq.request_id, None)
            if state is not None:
                results.append(self._error_output(state, seq.error))
        if sched.is_empty:
            self.scheduler.update_from_output({})
            return results
        now = time.perf_counter()
        for s in sched.scheduled:
            m = self._requests[s.request_id].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        layout = sched.sampling_layout
        rows = [self._requests[rid] for rid, _ in layout]
        S = self.runner.bucket(sched)[1]
        steps = [len(r.stop.token_ids) for r in rows]
        tensors = SamplingTensors.from_params(
            [r.params for r in rows], steps=steps,
            fallback_seeds=[r.fallback_seed for r in rows], eos_token_id=self.eos_token_id, pad_to=S)
        want_logprobs = max([r.params.logprobs or 0 for r in rows], default=0)
        num_logprobs = 0 if want_logprobs == 0 else _pow2_at_least(want_logprobs)
        spec = self._spec_batch(sched, rows, steps, S)
        out = self.runner.execute(sched, tensors, self._penalty_arrays(rows, S), num_logprobs, spec)

        sampled, finished = {}, {}
        now = time.perf_counter()
        for row, (rid, num_rows) in enumerate(layout):
            state = self._requests[rid]
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            # Emitted tokens go through the stop checks one by one: a stop (EOS, stop string,
            # max_tokens) in the middle of an accepted block discards the tokens after it, and the
            # scheduler is told only the kept ones (it rolls back the KV of the rest).
            room = self._room(self.scheduler.get_request(rid))
            kept = []
            for i in range(min(int(out.num_output[row]), room)):
                token = int(out.tokens[row, i])
                kept.append(token)
                if state.logprobs is not None:
                    k = state.params.logprobs
                    entry = {int(t): float(lp) for t, lp in zip(out.top_ids[row, i][:k], out.top_logprobs[row, i][:k])}
                    entry[token] = float(out.chosen_logprob[row, i])
                    state.logprobs.append(entry)
                state.cumulative_logprob += float(out.chosen_logprob[row, i])
                reason = state.stop.append(token)
                if reason is not None:
                    finished[rid] = reason
                    break
            sampled[rid] = kept
            if state.spec is not None:
                self._record_spec(state, num_rows - 1, int(out.num_accepted[row]), len(kept))
        done = self.scheduler.update_from_output(sampled, finished)
        done_ids = {seq.request_id for seq in done}
        for rid in sampled:
            state = self._requests[rid]
            if rid in done_ids:
                seq = next(s for s in done if s.request_id == rid)
                if not state.stop.finished:  # the scheduler ended it (max_tokens / context window)
                    state.stop.finish_reason = "length"
                state.metrics.finished_time = now
                state.metrics.num_cached_tokens = seq.num_cached_tokens
                state.metrics.num_preemptions = seq.num_preemptions
                results.append(self._output(state, finished=True))
                self._retire(state)
            else:
                results.append(self._output(state, finished=False))
        self.stats["steps"] += 1
        self.stats["tokens_computed"] += sched.num_batched_tokens
        self.stats["tokens_generated"] += sum(len(t) for t in sampled.values())
        self.stats["step_seconds"] += time.perf_counter() - t0
        return results

    # ------------------------------------------------------------------ speculation
    def _room(self, seq: SchedSequence) -> int:
        """Tokens the sequence may still emit (max_tokens and context window), at least 1."""
        room = self.engine_cfg.max_model_len - seq.num_tokens
        if seq.max_tokens is not None:
            room = min(room, seq.max_tokens - len(seq.output_token_ids))
        return max(1, room)

    def _propose_drafts(self) -> None:
        """Attaches guesses to every running decode sequence of a speculating request."""
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
            k = min(k, self._room(seq) - 1)
            if k > 0:
                wanted.append((seq, k))
            else:
                self.scheduler.set_draft_tokens(seq.request_id, [])
        if not wanted:
            return
        if isinstance(self.proposer, SelfDraftRunner):
            drafts, self.runner.cache = self.proposer.propose(
                self.runner.params, self.runner.cache,
                [(seq.all_token_ids[-1], seq.num_computed_tokens, seq.block_table) for seq, _ in wanted],
                [k for _, k in wanted])
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
        if not any(s.num_draft_tokens for s in drafted):
            return None
        K = self.engine_cfg.speculative.num_speculative_tokens
        draft_tokens = np.zeros((S, K), np.int32)
        num_draft = np.zeros(S, np.int32)
        ban_len = np.zeros(S, np.int32)
        for b, (s, state, step) in enumerate(zip(drafted, rows, steps)):
            n = s.num_draft_tokens
            if n:
                draft_tokens[b, :n] = s.token_ids[-n:]
            num_draft[b] = n
            ban_len[b] = max(state.params.min_tokens - step, 0)
        return SpecBatch(draft_tokens, num_draft, ban_len)

    def _record_spec(self, state: _RequestState, num_draft: int, num_accepted: int, num_kept: int) -> None:
        if state.adaptive is not None:
            state.adaptive.update(num_draft, num_accepted)
        for stats in (state.spec, self.spec_stats):
            stats.update([num_draft], [num_accepted], [num_kept])

    def _retire(self, state: _RequestState) -> None:
        """Forgets a finished request, keeping its speculation metrics (bounded to the most recent ones)."""
        del self._requests[state.request_id]
        if state.spec is not None:
            self.request_spec_stats[state.request_id] = state.spec
            while len(self.request_spec_stats) > _MAX_RETAINED_SPEC_STATS:
                self.request_spec_stats.popitem(last=False)

    def _output(self, state: _RequestState, finished: bool) -> RequestOutput:
        state.metrics.num_generated_tokens = len(state.stop.token_ids)
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

    def scheduler_stats(self) -> dict:
        out = {**self.scheduler.stats(), **self.stats,
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
