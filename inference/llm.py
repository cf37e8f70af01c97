"""`LLM`: the facade Python scripts and batch jobs use.

    from inference import LLM, SamplingParams
    llm = LLM()                                   # the default model (SmolLM2-135M-Instruct)
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].text, outs[0].token_ids, outs[0].finish_reason)
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from inference.engine import Engine, EngineConfig
from inference.outputs import CompletionOutput, RequestOutput, ScoreOutput, StreamDelta
from inference.sampling_params import SamplingParams
from inference.scoring import prompt_logprob_entries, score_tokens
from model.checkpoint import load_model
from model.config import FLOAT_DTYPES
from model.llama import unstack_layers

Prompt = Union[str, Sequence[int], dict]


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number))


def _token_ids(ids) -> list[int]:
    """A prompt's token ids as Python ints; floats and bools are refused, not truncated or taken as 0/1."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"prompt token ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        return ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"prompt_token_ids={ids!r} must be a list of ints, got {type(ids).__name__}")
    for i, t in enumerate(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"prompt token id {i}={t!r} must be an int, got {type(t).__name__}")
    return [int(t) for t in ids]


def _auto_quantization(dtype: str, weights_given: bool, devices: int) -> Optional[str]:
    """quantization="auto": "w8a8" on CPU with dtype="auto" where the int8-dot kernel runs (AVX-512 VNNI),
    "int8" on other CPUs, else None (float weights).

    On CPU decode is memory-bound and the C++ kernels read int8 weights in place; W8A8 also multiplies int8
    activations as integer dots, at twice the CPU's float rate. On llama-batched-bench's workload (BENCHMARKS.md,
    issue 17) W8A8 was the fastest configuration at every batch size measured: 1.4x / 1.7x / 2.0x / 2.4x
    weight-only int8 at 1 / 4 / 16 / 64 sequences, 1.23x llama.cpp at batch 1. Outputs change slightly
    (perplexity +0.2% over float32 for int8 weights, +1.0% with the int8 activations); an explicit dtype asks
    for float weights (dtype="float32" for exact reference runs), and weights passed in, sharded models and
    accelerators keep them (not measured there)."""
    if jax.default_backend() != "cpu" or dtype != "auto" or weights_given or devices > 1:
        return None
    from pallas_kernels.cpu_quantized_matmul import int8_dot_available

    return "w8a8" if int8_dot_available() else "int8"


def _auto_dtype(model: Optional[str], params, *, from_loaded: bool) -> str:
    """dtype="auto": float32 on CPU; on an accelerator the checkpoint's dtype -- an HF directory's
    config.json torch_dtype, an orbax checkpoint's stored weights, bfloat16 for a GGUF file (its
    dequantized weights, float32 only as the loader's intermediate), the given weights' dtype for
    already loaded params."""
    if jax.default_backend() == "cpu":
        return "float32"
    if not from_loaded:
        from model.checkpoint import is_checkpoint
        from model.weights import resolve_model

        path = resolve_model(model)
        if path.is_file():  # GGUF
            return "bfloat16"
        if not is_checkpoint(path) and (path / "config.json").exists():
            import json

            hf = json.loads((path / "config.json").read_text())
            name = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16")
            return name if name in FLOAT_DTYPES else "bfloat16"
    floats = [a.dtype for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.floating)]
    name = jnp.dtype(floats[0]).name if floats else "bfloat16"
    return name if name in FLOAT_DTYPES else "bfloat16"


# Scheduler limits when not given: (max_num_seqs, max_num_batched_tokens) per backend. On CPU a batch job
# runs fastest with every sequence decoding in one step (the weights are read once per step for all of
# them) and big prefill steps: llama-batched-bench's B=64 x (64 + 32) job took 12.3 s at (64, 1024)
# against 17.1 s at (64, 512) and 27.7 s at (32, 512) (scripts/bench_vs_llamacpp.py, BENCHMARKS.md,
# issue 17). Accelerators keep vLLM-like limits. This is the one place these defaults are decided.
BATCH_LIMITS = {"cpu": (64, 1024)}
DEFAULT_BATCH_LIMITS = (32, 512)


def default_batch_limits(max_num_seqs: Optional[int], max_num_batched_tokens: Optional[int]) -> tuple[int, int]:
    """The backend's (max_num_seqs, max_num_batched_tokens) for the ones not given; a given token budget
    below the default sequence count lowers that count to it (a step holds at least one token a sequence)."""
    seqs, tokens = BATCH_LIMITS.get(jax.default_backend(), DEFAULT_BATCH_LIMITS)
    if max_num_seqs is None:
        max_num_seqs = seqs if max_num_batched_tokens is None else min(seqs, max_num_batched_tokens)
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(tokens, max_num_seqs)
    return max_num_seqs, max_num_batched_tokens


class LLM:
    def __init__(self, model: Optional[str] = None, *, dtype: str = "auto", page_size: int = 16,
                 num_pages: Optional[int] = None, kv_cache_memory_bytes: Optional[int] = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: Optional[int] = None,
                 max_num_batched_tokens: Optional[int] = None,
                 max_model_len: Optional[int] = None, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, attn_impl: str = "auto", quantization: Optional[str] = "auto",
                 kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 quantization_group_size: Optional[int] = None,
                 speculative=None, unroll_layers: Optional[bool] = None, num_decode_steps: int = 1,
                 async_scheduling: bool = False, quantize_lm_head: Optional[bool] = None, _loaded=None):
        if dtype != "auto" and dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype={dtype!r} must be 'auto' or one of {sorted(FLOAT_DTYPES)}")
        # Quantization: "int8" (per channel) / "int4" (groups of quantization_group_size inputs, default the
        # largest of 128/64/32 dividing every projection's input dim) of the projections, or "gguf": the
        # GGUF's own Q8_0/Q4_0/Q4_1 blocks. From a GGUF, tensors already in the requested width are kept
        # as they are (no float round trip); see model.gguf_loader.load_gguf. "auto": see _auto_quantization.
        # "w8a8": int8 weights as "int8" and int8 activations (one scale per 64 inputs, computed per step):
        # integer dot products, which the CPU runs at twice its float rate (pallas_kernels/cpu_int8_dot.cc).
        if quantization not in ("auto", None, "int8", "int4", "gguf", "w8a8"):
            raise ValueError(f"quantization={quantization!r} must be 'auto', None, 'int8', 'int4', 'w8a8' or 'gguf'")
        if quantization == "w8a8" and tensor_parallel_size > 1:
            raise ValueError(f"quantization='w8a8' runs on one device (its activation blocks span the whole input "
                             f"dim); got tensor_parallel_size={tensor_parallel_size}: use 'int8'")
        t0 = time.perf_counter()
        weights_given = _loaded is not None
        if quantization == "auto":
            quantization = _auto_quantization(dtype, weights_given, tensor_parallel_size * data_parallel_size)
        if _loaded is None and quantization is not None:
            from model.weights import resolve_model

            path = resolve_model(model)
            if path.is_file() and path.suffix.lower() == ".gguf":
                from model.gguf_loader import load_gguf

                _loaded = load_gguf(path, quantization=quantization)
        cfg, params, tokenizer = _loaded if _loaded is not None else load_model(model)
        if tokenizer is None:
            raise ValueError(f"model {model!r} has no tokenizer (tokenizer.json missing)")
        from model.quantize import QuantizedWeight, default_int4_group_size, quantize_params, with_int8_lm_head

        is_quantized = lambda a: isinstance(a, QuantizedWeight)  # noqa: E731
        if dtype == "auto":
            dtype = _auto_dtype(model, params, from_loaded=weights_given)
        self.dtype = dtype
        # Cast on the host: with tensor parallelism each device then receives only its own shards (no whole
        # weight ever sits on one device).
        params = jax.tree.map(lambda a: a if is_quantized(a) else np.asarray(a).astype(FLOAT_DTYPES[dtype], copy=False),
                              params, is_leaf=is_quantized)
        if quantization == "gguf" and not any(map(is_quantized, params["layers"].values())):
            raise ValueError("quantization='gguf' needs a GGUF model with Q8_0/Q4_0/Q4_1 projection weights")
        # With tensor parallelism, quantize on the host CPU device too, so that `shard_params` below sends each
        # accelerator only its shards (never a whole float or quantized weight).
        quantize_on = (jax.default_device(jax.devices("cpu")[0]) if tensor_parallel_size > 1
                       else contextlib.nullcontext())
        if quantization in ("int8", "w8a8"):
            with quantize_on:
                params = quantize_params(params, quantization)
        elif quantization == "int4":
            group_size = quantization_group_size or default_int4_group_size(params)
            with quantize_on:
                params = quantize_params(params, "int4", group_size)
        if quantize_lm_head is None:
            # An int8 / int4 model on CPU also gets an int8 LM head (groups of 32: a GGUF's Q8_0 embedding is
            # re-gridded exactly): the CPU kernel reads 32 MB for SmolLM2-135M's head instead of XLA's 113 MB
            # float one, measured 15-20% off a batch-1 decode step (BENCHMARKS.md, issue 17). "gguf" takes
            # the file's own head blocks when it has them (model.gguf_loader). Not measured on accelerators
            # or with tensor parallelism, so off there.
            quantize_lm_head = (quantization in ("int8", "int4", "w8a8") and jax.default_backend() == "cpu"
                                and tensor_parallel_size == 1)
        if quantize_lm_head:
            with quantize_on:
                params = with_int8_lm_head(params, int8_activations=quantization == "w8a8")
        self.config = cfg
        self.tokenizer = tokenizer
        self.quantization = quantization
        max_num_seqs, max_num_batched_tokens = default_batch_limits(max_num_seqs, max_num_batched_tokens)
        engine_cfg = EngineConfig(
            page_size=page_size, num_pages=num_pages, kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            attn_impl=attn_impl, kv_cache_dtype=kv_cache_dtype,
            speculative=speculative,  # None, a SpeculativeConfig or a dict of its fields
            num_decode_steps=num_decode_steps,  # multi-step decode (EngineConfig.num_decode_steps)
            async_scheduling=async_scheduling)  # overlapped dispatch (EngineConfig.async_scheduling)
        self.mesh = None
        if unroll_layers is None:
            # XLA:CPU copies each layer's weights out of stacked arrays under lax.scan (3x the bytes of a
            # memory-bound decode step); unrolled layers read them in place at the price of longer compiles.
            # Quantized weights keep the scan: the CPU kernel reads each layer in place from the stack
            # (model.quantize.StackedLayer).
            unroll_layers = jax.default_backend() == "cpu" and quantization is None
        if tensor_parallel_size * data_parallel_size > 1:
            from inference.data_parallel import DataParallelEngine
            from sharding.mesh import make_mesh, replica_meshes
            from sharding.rules import bytes_per_device, cache_sharding, shard_params

            self.mesh = make_mesh(tensor_parallel_size, data_parallel_size)
            # One engine (weights copy, KV pool, scheduler) per replica group of TP devices; with
            # data_parallel_size > 1 the DataParallelEngine splits the requests between them.
            engines = []
            for group in replica_meshes(self.mesh):
                group_params = shard_params(params, cfg, group)
                if unroll_layers:
                    group_params = unstack_layers(group_params)
                kv_dtype = jnp.int8 if kv_cache_dtype == "int8" else None
                engines.append(Engine(cfg, group_params, tokenizer, engine_cfg,
                                      cache_sharding(cfg, group, kv_dtype),
                                      bytes_per_device(group_params)))
                # Replicas are identical: give every KV pool the size the first one got (the memory budget
                # is read from the default device, which the first replica's pool already fills).
                engine_cfg = dataclasses.replace(engine_cfg, num_pages=engines[0].runner.num_pages)
            self.engine = engines[0] if len(engines) == 1 else DataParallelEngine(engines)
        else:
            params = jax.device_put(params)
            if unroll_layers:
                params = unstack_layers(params)
            weight_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(params))
            self.engine = Engine(cfg, params, tokenizer, engine_cfg, None, weight_bytes)
        self.load_seconds = time.perf_counter() - t0
        self._closed = False

    # ------------------------------------------------------------------ helpers
    def _encode(self, prompt: Prompt) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt='' is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            if "messages" in prompt:
                return None, self.tokenizer.encode_chat(prompt["messages"])
            if "prompt" in prompt:
                return self._encode(prompt["prompt"])
            raise ValueError(f"prompt dict keys={sorted(prompt)} need 'prompt', 'prompt_token_ids' or 'messages'")
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return None, _token_ids(prompt)
        hint = " (decode bytes to str first)" if isinstance(prompt, (bytes, bytearray)) else ""
        raise TypeError(f"prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}: "
                        f"{prompt!r}{hint}")

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this LLM was closed; create a new one")

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                 use_tqdm: bool = False, raise_on_error: bool = False) -> list[RequestOutput]:
        """Generates for every prompt through the continuous-batching engine.

        A bad request (empty, too long, bad token ids, bad parameters) fails alone: its RequestOutput has
        `error` set and finish_reason "error"; the others complete. `raise_on_error=True` raises instead
        (before anything runs) for a single prompt.
        """
        self._check_open()
        if not isinstance(prompts, (list, tuple, np.ndarray)) or (len(prompts) and _is_number(prompts[0])):
            prompts = [prompts]  # one prompt: a str, dict, token id list (or a bad value, named per request)
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                       else [sampling_params] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")

        engine = self.engine
        results: list[Optional[RequestOutput]] = [None] * len(prompts)
        children: dict[str, tuple[int, int]] = {}  # engine request id -> (prompt index, sample index)
        partial: dict[int, list] = {}
        base = f"gen{time.monotonic_ns()}"
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            text, ids = None, []
            try:
                text, ids = self._encode(prompt)
                if not isinstance(params, SamplingParams):
                    raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(params).__name__}")
                n = params.n
                partial[i] = [None] * n
                for j in range(n):
                    child = params.for_child(j) if n > 1 else params
                    rid = engine.add_request(f"{base}-{i}-{j}", ids, child, prompt=text, stream=False)
                    children[rid] = (i, j)
            except (ValueError, TypeError) as e:
                if raise_on_error:
                    for rid in children:
                        engine.abort(rid)
                    raise
                for rid in [r for r, (pi, _) in children.items() if pi == i]:
                    engine.abort(rid)
                    del children[rid]
                partial.pop(i, None)
                results[i] = RequestOutput(f"{base}-{i}", text if isinstance(prompt, str) else None, ids,
                                           [CompletionOutput(0, "", [], "error")], True, error=str(e))
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(children), desc="generate", unit="req", file=sys.stderr)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id not in children or not out.finished:
                        continue
                    i, j = children[out.request_id]
                    if out.error:
                        results[i] = RequestOutput(out.request_id, out.prompt, out.prompt_token_ids,
                                                   out.outputs, True, out.metrics, error=out.error)
                        partial.pop(i, None)
                    elif i in partial:
                        completion = dataclasses.replace(out.outputs[0], index=j)
                        partial[i][j] = (completion, out)
                        if all(p is not None for p in partial[i]):
                            first = partial[i][0][1]
                            results[i] = RequestOutput(
                                f"{base}-{i}", first.prompt, first.prompt_token_ids,
                                [c for c, _ in partial.pop(i)], True, first.metrics)
                    if progress is not None:
                        progress.update(1)
        except BaseException:
            # Interrupted (Ctrl-C) or failed: this call's requests must not stay queued holding pages.
            for rid in children:
                engine.abort(rid)
            raise
        finally:
            if progress is not None:
                progress.close()
        # prompt_logprobs: one scoring pass per k over every prompt that asks for it
        wanted: dict[int, list[int]] = {}
        for i, params in enumerate(params_list):
            if results[i] is not None and results[i].error is None and params.prompt_logprobs is not None:
                wanted.setdefault(params.prompt_logprobs, []).append(i)
        for k, indices in wanted.items():
            ids = [results[i].prompt_token_ids for i in indices]
            for i, prompt_ids, scores in zip(indices, ids, self._score_tokens(ids, top_k=k)):
                results[i].prompt_logprobs = prompt_logprob_entries(prompt_ids, scores)
        return results

    def chat(self, conversations, sampling_params: Optional[SamplingParams] = None, **kw) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation (a list of {role, content} messages)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([{"messages": c} for c in conversations], sampling_params, **kw)

    def generate_stream(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None
                        ) -> Iterator[StreamDelta]:
        """Yields new tokens of one prompt as they are generated (other queued work keeps running)."""
        self._check_open()
        params = sampling_params or SamplingParams()
        text, ids = self._encode(prompt)
        rid = self.engine.add_request(f"stream{time.monotonic_ns()}", ids, params, prompt=text)
        sent_tokens, sent_text = 0, ""
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    if out.error:
                        finished = True
                        raise ValueError(out.error)
                    toks = out.token_ids
                    new_text = out.text
                    finished = out.finished
                    if len(toks) > sent_tokens or out.finished:
                        yield StreamDelta(rid, 0, toks[sent_tokens:], new_text[len(sent_text):], out.finished,
                                          out.finish_reason)
                        sent_tokens, sent_text = len(toks), new_text
                if not self.engine.has_unfinished_requests():
                    return
        finally:
            # A consumer that stops early (break, close(), garbage collection) must not leave the request
            # running in the engine, holding its KV pages.
            if not finished:
                self.engine.abort(rid)

    # ------------------------------------------------------------------ scoring
    def score(self, texts: Union[str, Sequence[str]], add_special_tokens: bool = True) -> list[ScoreOutput]:
        """Per-token log-likelihoods log p(token_i | tokens_<i) for research use. All texts are scored
        together in packed steps, whole pages they share computed once (inference.scoring.score_tokens)."""
        self._check_open()
        if isinstance(texts, str):
            texts = [texts]
        outs: list[Optional[ScoreOutput]] = [None] * len(texts)
        encoded = {}  # text index -> token ids
        max_len = self.engine.engine_cfg.max_model_len
        for i, text in enumerate(texts):
            try:  # a bad text fails alone, like a bad request in generate()
                if not isinstance(text, str):
                    raise TypeError(f"texts[{i}]={text!r} must be a str, got {type(text).__name__}")
                _, ids = self._encode(text)
                if len(ids) > max_len:
                    raise ValueError(f"text of {len(ids)} tokens exceeds max_model_len={max_len}")
                encoded[i] = ids
            except (ValueError, TypeError) as e:
                outs[i] = ScoreOutput(text, [], [], error=str(e))
        for i, scores in zip(encoded, self._score_tokens(list(encoded.values()))):
            outs[i] = ScoreOutput(texts[i], encoded[i], [None] + scores.logprobs.tolist())
        return outs

    def _score_tokens(self, token_lists: list[list[int]], top_k: int = 0):
        engine = self.engine
        sharding = None
        if self.mesh is not None:  # the scratch pool is split over the TP devices like the engine's
            sharding = {key: engine.runner.cache[key].sharding for key in ("k", "v")}
        return score_tokens(engine.runner.params, self.config, token_lists, top_k=top_k,
                            attn_impl=engine.engine_cfg.attn_impl, page_size=engine.engine_cfg.page_size,
                            cache_sharding=sharding)

    def _prompt_logprobs(self, ids: list[int], k: int):
        return prompt_logprob_entries(ids, self._score_tokens([ids], top_k=k)[0])

    # ------------------------------------------------------------------ warm-up
    def warmup(self, logprobs: Optional[bool] = None, penalties: Optional[bool] = None,
               max_seq_len: Optional[int] = None, structured_output: Optional[bool] = False) -> int:
        """Compiles every step program a job can use, so that generation compiles nothing: each token
        bucket (its sequence count follows from it) at each block-table width up to `max_seq_len`
        tokens (default max_model_len). logprobs / penalties / structured_output: True or False when the
        job does or does not ask for them (logprobs=k of any k; repetition/frequency/presence penalties;
        structured_outputs / guided_* requests, whose steps apply a token mask); None warms both.
        structured_output defaults to False (its programs double the warm-up). Returns the number of
        programs run."""
        self._check_open()
        variants = lambda flag: [False, True] if flag is None else [bool(flag)]  # noqa: E731
        for engine in getattr(self.engine, "engines", [self.engine]):
            count = engine.warmup(logprobs=variants(logprobs), penalties=variants(penalties),
                                  max_seq_len=max_seq_len, structured_output=variants(structured_output))
        return count

    # ------------------------------------------------------------------ lifecycle
    def stats(self) -> dict:
        return self.engine.scheduler_stats()

    def close(self):
        """Releases this LLM's device memory (params, KV pool). Compiled programs are JAX's process-wide
        cache, shared with every other LLM of the same shapes, so they are left alone."""
        if not self._closed:
            self.engine.close()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
