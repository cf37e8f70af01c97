"""`LLM`: the facade Python scripts and batch jobs use.

    from inference import LLM, SamplingParams
    llm = LLM()                                   # the default model (SmolLM2-135M-Instruct)
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].text, outs[0].token_ids, outs[0].finish_reason)
"""

from __future__ import annotations

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
from model.checkpoint import load_model

Prompt = Union[str, Sequence[int], dict]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class LLM:
    def __init__(self, model: Optional[str] = None, *, dtype: str = "float32", page_size: int = 16,
                 num_pages: Optional[int] = None, kv_cache_memory_bytes: Optional[int] = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 max_model_len: Optional[int] = None, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, attn_impl: str = "auto", quantization: Optional[str] = None,
                 kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 _loaded=None):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {sorted(_DTYPES)}")
        if quantization not in (None, "int8", "int4"):
            raise ValueError(f"quantization={quantization!r} must be None, 'int8' or 'int4'")
        t0 = time.perf_counter()
        cfg, params, tokenizer = _loaded if _loaded is not None else load_model(model)
        if tokenizer is None:
            raise ValueError(f"model {model!r} has no tokenizer (tokenizer.json missing)")
        params = jax.tree.map(lambda a: jnp.asarray(a, _DTYPES[dtype]), params)
        if quantization is not None:
            from model.quantize import quantize_params

            params = quantize_params(params, quantization)
        self.config = cfg
        self.tokenizer = tokenizer
        self.quantization = quantization
        engine_cfg = EngineConfig(
            page_size=page_size, num_pages=num_pages, kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            attn_impl=attn_impl, kv_cache_dtype=kv_cache_dtype)
        param_sharding = cache_sharding = None
        self.mesh = None
        if tensor_parallel_size * data_parallel_size > 1:
            from sharding.mesh import make_mesh
            from sharding.rules import shard_params, cache_sharding as make_cache_sharding

            self.mesh = make_mesh(tensor_parallel_size, data_parallel_size)
            params = shard_params(params, cfg, self.mesh)
            cache_sharding = make_cache_sharding(cfg, self.mesh)
        else:
            params = jax.device_put(params)
        weight_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(params))
        self.engine = Engine(cfg, params, tokenizer, engine_cfg, param_sharding, cache_sharding, weight_bytes)
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
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "messages" in prompt:
                return None, self.tokenizer.encode_chat(prompt["messages"])
            if "prompt" in prompt:
                return self._encode(prompt["prompt"])
            raise ValueError(f"prompt dict keys={sorted(prompt)} need 'prompt', 'prompt_token_ids' or 'messages'")
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return None, [int(t) for t in prompt]
        raise TypeError(f"prompt must be a str, token id list or dict, got {type(prompt).__name__}: {prompt!r}")

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
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
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
                    rid = engine.add_request(f"{base}-{i}-{j}", ids, child, prompt=text)
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
        finally:
            if progress is not None:
                progress.close()
        for i, params in enumerate(params_list):
            if results[i] is not None and results[i].error is None and params.prompt_logprobs is not None:
                results[i].prompt_logprobs = self._prompt_logprobs(results[i].prompt_token_ids, params.prompt_logprobs)
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
        while True:
            for out in self.engine.step():
                if out.request_id != rid:
                    continue
                if out.error:
                    raise ValueError(out.error)
                toks = out.token_ids
                new_text = out.text
                if len(toks) > sent_tokens or out.finished:
                    yield StreamDelta(rid, 0, toks[sent_tokens:], new_text[len(sent_text):], out.finished,
                                      out.finish_reason)
                    sent_tokens, sent_text = len(toks), new_text
                if out.finished:
                    return
            if not self.engine.has_unfinished_requests():
                return

    # ------------------------------------------------------------------ scoring
    def score(self, texts: Union[str, Sequence[str]], add_special_tokens: bool = True) -> list[ScoreOutput]:
        """Per-token log-likelihoods log p(token_i | tokens_<i) for research use."""
        self._check_open()
        if isinstance(texts, str):
            texts = [texts]
        outs = []
        for text in texts:
            _, ids = self._encode(text)
            lps = self._token_logprobs(ids)
            outs.append(ScoreOutput(text, ids, [None] + [float(x) for x in lps]))
        return outs

    def _token_logprobs(self, ids: list[int]) -> np.ndarray:
        from inference.scoring import token_logprobs

        if len(ids) > self.engine.engine_cfg.max_model_len:
            raise ValueError(f"text of {len(ids)} tokens exceeds max_model_len={self.engine.engine_cfg.max_model_len}")
        return token_logprobs(self.engine.runner.params, self.config, ids, attn_impl=self.engine.engine_cfg.attn_impl)

    def _prompt_logprobs(self, ids: list[int], k: int):
        from inference.scoring import prompt_top_logprobs

        return prompt_top_logprobs(self.engine.runner.params, self.config, ids, k,
                                   attn_impl=self.engine.engine_cfg.attn_impl)

    # ------------------------------------------------------------------ lifecycle
    def stats(self) -> dict:
        return self.engine.scheduler_stats()

    def close(self):
        """Releases device memory (params, KV pool, compiled programs)."""
        if not self._closed:
            self.engine.close()
            self._closed = True
            jax.clear_caches()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
