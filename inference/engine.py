"""The engine: host-side continuous-batching scheduler + device model runner + sampler.

Each `step()`: the scheduler picks which sequences compute how many tokens (decodes, prefill chunks),
the runner pads the ragged batch to a shape bucket and runs one jitted program (model forward and
sampling on device), and the host appends the sampled tokens, checks stop conditions, and finishes
requests. Requests join and leave the running batch at every step.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.kv_pool import BlockAllocator, kv_bytes_per_page, device_memory, pages_for_memory_budget
from inference.outputs import CompletionOutput, RequestMetrics, RequestOutput
from inference.sampler import SamplingTensors, next_engine_seed, sample
from inference.sampling_params import SamplingParams
from inference.scheduler import Scheduler, SchedulerOutput
from inference.stop import StopChecker
from model.config import LlamaConfig
from model.llama import StepInputs, forward, init_cache

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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

    def __post_init__(self):
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


class ModelRunner:
    """Owns the device params and KV pool; runs one padded, jitted step (forward + sample)."""

    def __init__(self, cfg: LlamaConfig, params, engine_cfg: EngineConfig, num_pages: int,
                 kv_dtype, param_sharding=None, cache_sharding=None):
        self.cfg = cfg
        self.engine_cfg = engine_cfg
        self.num_pages = num_pages
        self.params = params
        self.cache = init_cache(cfg, num_pages, engine_cfg.page_size, kv_dtype)
        if cache_sharding is not None:
            self.cache = jax.device_put(self.cache, cache_sharding)
        self.max_pages_per_seq = -(-engine_cfg.max_model_len // engine_cfg.page_size) if engine_cfg.max_model_len else None
        self._step_fns: dict = {}
        self.compiled_shapes: set = set()

    def _step_fn(self, num_logprobs: int, with_penalties: bool):
        key = (num_logprobs, with_penalties)
        if key not in self._step_fns:
            cfg, impl = self.cfg, self.engine_cfg.attn_impl

            def step(params, cache, inputs: StepInputs, tensors: SamplingTensors, token_counts, prompt_mask):
                logits, cache = forward(params, cache, inputs, cfg, attn_impl=impl)
                out = sample(logits, tensors, token_counts, prompt_mask, num_logprobs=num_logprobs)
                return out, cache

            self._step_fns[key] = jax.jit(step, donate_argnums=(1,))
        return self._step_fns[key]

    def bucket(self, sched: SchedulerOutput) -> tuple[int, int, int]:
        """(tokens, seqs, pages) padded sizes: powers of two, so few programs are compiled."""
        ec = self.engine_cfg
        T = _pow2_at_least(sched.num_batched_tokens, 8)
        S = min(_pow2_at_least(len(sched.scheduled)), _pow2_at_least(ec.max_num_seqs))
        S = max(S, len(sched.scheduled))
        P = _pow2_at_least(max(len(s.block_table) for s in sched.scheduled))
        return T, S, P

    def execute(self, sched: SchedulerOutput, tensors_rows: list, penalties: Optional[tuple], num_logprobs: int):
        """Runs the step; returns host numpy (tokens, chosen_logprob, top_logprobs, top_ids) per sampling row."""
        T, S, P = self.bucket(sched)
        arrays = sched.to_step_arrays(pad_tokens_to=T, pad_seqs_to=S, pad_pages_to=P, pad_logits_to=S)
        inputs = StepInputs(**{k: jnp.asarray(v) for k, v in arrays.items()})
        tensors = tensors_rows
        counts, prompt_mask = penalties if penalties is not None else (None, None)
        fn = self._step_fn(num_logprobs, penalties is not None)
        self.compiled_shapes.add((T, S, P, num_logprobs, penalties is not None))
        out, self.cache = fn(self.params, self.cache, inputs, tensors, counts, prompt_mask)
        return jax.device_get(out)

    def release(self):
        self.params = None
        self.cache = None
        self._step_fns.clear()


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
        num_pages = engine_cfg.num_pages or self._pages_from_budget(kv_dtype, weight_bytes)
        self.allocator = BlockAllocator(num_pages, engine_cfg.page_size, engine_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, engine_cfg.max_num_seqs, engine_cfg.max_num_batched_tokens,
                                   engine_cfg.max_model_len, engine_cfg.enable_chunked_prefill)
        self.runner = ModelRunner(cfg, params, engine_cfg, num_pages, kv_dtype, param_sharding, cache_sharding)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else None
        self._requests: dict[str, _RequestState] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "tokens_computed": 0, "tokens_generated": 0, "step_seconds": 0.0}

    # ------------------------------------------------------------------ sizing
    def _pages_from_budget(self, kv_dtype, weight_bytes: int) -> int:
        ec = self.engine_cfg
        per_page = kv_bytes_per_page(self.cfg, ec.page_size, jnp.dtype(kv_dtype).itemsize)
        if ec.kv_cache_memory_bytes is not None:
            budget = ec.kv_cache_memory_bytes
        else:
            mem = device_memory()
            if mem is None:  # CPU: no device memory stats; use a fixed budget
                budget = 1 << 30
            else:
                limit, in_use = mem
                budget = int(limit * ec.gpu_memory_utilization) - in_use
        pages = pages_for_memory_budget(self.cfg, ec.page_size, jnp.dtype(kv_dtype).itemsize, budget)
        # No point holding more than every sequence at full length needs.
        needed = ec.max_num_seqs * -(-ec.max_model_len // ec.page_size)
        return max(1, min(pages, needed))

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: Optional[str], prompt_token_ids: Sequence[int],
                    params: SamplingParams, prompt: Optional[str] = None) -> str:
        """Queues a request; raises ValueError (naming the value) if it can never run."""
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
            logprobs=[] if params.logprobs is not None else None)
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
        tensors = SamplingTensors.from_params(
            [r.params for r in rows], steps=[len(r.stop.token_ids) for r in rows],
            fallback_seeds=[r.fallback_seed for r in rows], eos_token_id=self.eos_token_id, pad_to=S)
        want_logprobs = max([r.params.logprobs or 0 for r in rows], default=0)
        num_logprobs = 0 if want_logprobs == 0 else _pow2_at_least(want_logprobs)
        out = self.runner.execute(sched, tensors, self._penalty_arrays(rows, S), num_logprobs)

        sampled, finished = {}, {}
        now = time.perf_counter()
        for row, (rid, _) in enumerate(layout):
            state = self._requests[rid]
            token = int(out.tokens[row])
            sampled[rid] = token
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            if state.logprobs is not None:
                k = state.params.logprobs
                entry = {int(i): float(lp) for i, lp in zip(out.top_ids[row][:k], out.top_logprobs[row][:k])}
                entry[token] = float(out.chosen_logprob[row])
                state.logprobs.append(entry)
            state.cumulative_logprob += float(out.chosen_logprob[row])
            reason = state.stop.append(token)
            if reason is not None:
                finished[rid] = reason
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
                del self._requests[rid]
            else:
                results.append(self._output(state, finished=False))
        self.stats["steps"] += 1
        self.stats["tokens_computed"] += sched.num_batched_tokens
        self.stats["tokens_generated"] += len(sampled)
        self.stats["step_seconds"] += time.perf_counter() - t0
        return results

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
        return {**self.scheduler.stats(), **self.stats,
                "prefix_hits": self.allocator.stats.prefix_hits,
                "prefix_tokens_saved": self.allocator.stats.prefix_tokens_saved}

    def close(self):
        self.runner.release()
