"""lm-evaluation-harness backend: `ridgeline` as an lm-eval model (pip install -e '.[eval]').

    ridgeline eval --model ridgeline --model_args pretrained=PATH,max_model_len=2048 --tasks hellaswag --limit 100

lm-eval 0.4.13 finds external models only once the module defining them has been imported (no entry-point
discovery, no --plugins flag), so `ridgeline eval ...` / `python -m inference.lm_eval_backend ...` import
this module and then run lm-eval's own command line with the same arguments. From Python, pass an instance:
`lm_eval.simple_evaluate(model=RidgelineLM(llm=LLM()), tasks=[...])`. pyproject also declares the
`lm_eval.models` entry point that newer lm-eval releases read.

Requests map onto ridgeline as follows:
- loglikelihood: TemplateLM tokenises (empty context -> the prefix token; trailing context spaces moved to
  the continuation), then `inference.scoring.score_continuations` scores every request of the call in packed
  ragged batches; requests sharing a context (multiple-choice answers) prefill that context once.
- loglikelihood_rolling: disjoint windows of at most `max_length` tokens (lm_eval.utils), scored the same way.
- generate_until: every request of the call goes to one `LLM.generate` (the engine batches them), greedy
  unless do_sample; stops at the `until` strings and at EOS (the engine's stop tokens).
"""

from __future__ import annotations

import sys
from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from inference.llm import LLM
from inference.sampling_params import SamplingParams
from inference.scoring import score_continuations

# lm-eval passes these to every model; the engine schedules its own batches, so they have no meaning here.
_HARNESS_ARGS = ("batch_size", "max_batch_size", "device")
_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed")


@register_model("ridgeline")
class RidgelineLM(TemplateLM):
    def __init__(self, pretrained: Optional[str] = None, *, llm: Optional[LLM] = None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256,
                 prefix_token_id: Optional[int] = None, **kwargs):
        """pretrained: a .gguf / HF directory / checkpoint (default: the default model), or `llm` an LLM
        already built. max_length caps the tokens of one forward (default: the LLM's max_model_len);
        prefix_token_id overrides the token an empty context is conditioned on. Other keyword arguments (dtype, max_model_len, quantization, attn_impl, ...) go to `LLM(...)`."""
        super().__init__()
        for name in _HARNESS_ARGS:
            kwargs.pop(name, None)
        if llm is None:
            llm = LLM(None if pretrained in (None, "", "default") else str(pretrained), **kwargs)
        elif kwargs or pretrained is not None:
            raise ValueError(f"pass either llm= or pretrained/LLM arguments, not both (got {sorted(kwargs)})")
        self.llm = llm
        model_len = llm.engine.engine_cfg.max_model_len
        self.max_length = int(max_length) if max_length is not None else model_len
        if not 2 <= self.max_length <= model_len:
            raise ValueError(f"max_length={max_length} must be in [2, max_model_len={model_len}]")
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.max_gen_toks = int(max_gen_toks)
        if self.max_gen_toks < 1:
            raise ValueError(f"max_gen_toks={max_gen_toks} must be >= 1")

    # ------------------------------------------------------------------ tokenisation (TemplateLM)
    @property
    def eot_token_id(self) -> int:
        eos = self.llm.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the model's tokenizer has no EOS token, needed as lm-eval's prefix token")
        return eos

    @property
    def prefix_token_id(self) -> int:
        # What an empty context and the first rolling window condition on: as lm-eval's hf and vllm
        # backends choose it (BOS when the tokenizer has one, else EOS), so the numbers compare.
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.llm.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.llm.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False)

    def tok_decode(self, tokens) -> str:
        return self.llm.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context_ids, continuation_ids) -> (sum of continuation logprobs, every token the argmax)."""
        llm = self.llm
        results = score_continuations(llm.engine.runner.params, llm.config, pairs,
                                      attn_impl=llm.engine.engine_cfg.attn_impl,
                                      page_size=llm.engine.engine_cfg.page_size)
        return [(float(lp.sum()), bool(greedy.all())) for lp, greedy in results]

    def _truncate(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        # One forward reads context + continuation[:-1]; drop the oldest context tokens past max_length.
        if len(continuation) > self.max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
        keep = self.max_length + 1 - len(continuation)
        return context[-keep:], continuation

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [self._truncate(list(ctx), list(cont)) for _, ctx, cont in requests]
        answers = self._score(pairs)
        for (request_args, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", request_args, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, request in enumerate(tqdm(requests, desc="rolling windows", disable=disable_tqdm)):
            (text,) = request.args
            for window in get_rolling_token_windows(self.tok_encode(text, add_special_tokens=False),
                                                    self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(windows)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _sampling_params(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str]]:
        unknown = sorted(set(gen_kwargs) - set(_GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation kwargs {unknown} are not supported (supported: {list(_GEN_KWARGS)})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0.0))
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0))
        params = SamplingParams(
            max_tokens=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
            temperature=(temperature or 1.0) if do_sample else 0.0,
            top_p=float(gen_kwargs.get("top_p", 1.0)) if do_sample else 1.0,
            top_k=int(gen_kwargs.get("top_k", 0)) if do_sample else 0,
            seed=gen_kwargs.get("seed"), stop=until)  # EOS: the engine's stop tokens
        return params, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params_list, stops = [], [], []
        for request in requests:
            context, gen_kwargs = request.args
            params, until = self._sampling_params(dict(gen_kwargs))
            if params.max_tokens >= self.max_length:
                raise ValueError(f"max_gen_toks={params.max_tokens} must be below max_length={self.max_length}")
            ids = self.tok_encode(context) or [self.prefix_token_id]
            prompts.append({"prompt_token_ids": ids[-(self.max_length - params.max_tokens):]})
            params_list.append(params)
            stops.append(until)
        outputs = self.llm.generate(prompts, params_list, use_tqdm=not disable_tqdm, raise_on_error=True)
        texts = []
        for request, out, until in zip(requests, outputs, stops):
            if out.error:
                raise ValueError(f"generation failed for context {request.args[0][:80]!r}: {out.error}")
            text = out.outputs[0].text
            for stop in until:  # the engine already stops there; this also trims a stop split across tokens
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            texts.append(text)
        return texts


def cli_evaluate(argv: Optional[list] = None) -> int:
    """lm-eval's own command line, with the `ridgeline` model registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate as lm_eval_main

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    lm_eval_main()
    return 0


if __name__ == "__main__":
    sys.exit(cli_evaluate())
