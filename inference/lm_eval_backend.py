"""lm-evaluation-harness backend: `ridgeline` as an lm-eval model (the `[eval]` extra).

lm-eval 0.4.x finds a model class only once the module that registers it has been imported (no entry-point
discovery), so run evaluations through ridgeline's wrapper, which imports this module first and then hands
its arguments to lm-eval's own command line:

    ridgeline lm-eval --model ridgeline --model_args pretrained=model.gguf,max_num_seqs=16 --tasks hellaswag

or from Python: `lm_eval.simple_evaluate(model=RidgelineLM(...), tasks=[...])` (or `model="ridgeline"` after
importing this module).

Log-likelihoods come from `LLM.score`'s path: one contiguous prefill per sequence, reduced to log-probs on the
device (`inference.scoring`), with the top-1 token per position for is-greedy. Generation runs every request
through the continuous-batching engine at once (`LLM.generate`).
"""

from __future__ import annotations

from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from inference.sampling_params import SamplingParams

_DEFAULT_MAX_GEN_TOKS = 256
_ENGINE_ARGS = {"dtype": str, "quantization": str, "kv_cache_dtype": str, "attn_impl": str, "max_num_seqs": int,
                "max_num_batched_tokens": int, "max_model_len": int, "tensor_parallel_size": int,
                "data_parallel_size": int}


@register_model("ridgeline")
class RidgelineLM(TemplateLM):
    """`--model_args pretrained=PATH[,dtype=bfloat16,max_num_seqs=16,...]` (any LLM engine argument; PATH
    defaults to the default model). `llm=` passes an existing `LLM` instead."""

    def __init__(self, pretrained: Optional[str] = None, llm=None, max_gen_toks: int = _DEFAULT_MAX_GEN_TOKS,
                 batch_size=None, max_batch_size=None, device=None, **engine_args):
        super().__init__()
        # batch_size / max_batch_size / device come from lm-eval's command line; the engine batches by itself.
        unknown = sorted(set(engine_args) - set(_ENGINE_ARGS))
        if unknown:
            raise ValueError(f"unknown ridgeline model_args {unknown}; known: pretrained, max_gen_toks, "
                             f"{', '.join(sorted(_ENGINE_ARGS))}")
        if llm is None:
            from inference.llm import LLM

            llm = LLM(pretrained, **{k: _ENGINE_ARGS[k](v) for k, v in engine_args.items()})
        self.llm = llm
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = llm.engine.engine_cfg.max_model_len

    # -- tokenization (TemplateLM) ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.llm.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.llm.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.llm.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.llm.tokenizer.decode(tokens)

    # -- scoring ----------------------------------------------------------------------------------------
    def _score_continuation(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax)."""
        from inference.scoring import prompt_top_logprobs

        ids = (context + continuation)[-self.max_length:]  # an over-long context loses its oldest tokens
        n = len(continuation)
        if n == 0:
            return 0.0, True
        if n >= len(ids):
            raise ValueError(f"continuation of {n} tokens leaves no context within max_model_len={self.max_length}")
        engine = self.llm.engine
        entries = prompt_top_logprobs(engine.runner.params, self.llm.config, ids, 1,
                                      attn_impl=engine.engine_cfg.attn_impl)  # [None, {top-1 and actual}, ...]
        logprob, greedy = 0.0, True
        for token, entry in zip(ids[-n:], entries[-n:]):
            logprob += entry[token]
            greedy = greedy and entry[token] >= max(entry.values())
        return logprob, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return [self._score_continuation(context, continuation)
                for _, context, continuation in tqdm(requests, desc="loglikelihood", disable=disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document: disjoint windows of at most max_model_len tokens, each
        token predicted exactly once (the first from the prefix token)."""
        out = []
        for (string,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            out.append(sum(self._score_continuation(context, continuation)[0] for context, continuation in windows))
        return out

    # -- generation -------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for context, gen_kwargs in [r.args for r in requests]:
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            sampling = {k: kwargs.pop(k) for k in ("top_p", "top_k", "seed") if k in kwargs}
            if kwargs:
                raise ValueError(f"unsupported generation kwargs {sorted(kwargs)} (until, max_gen_toks, do_sample, "
                                 "temperature, top_p, top_k, seed)")
            ids = self.tok_encode(context)
            # Leave room to generate: keep the end of an over-long context (as lm-eval's HF backend does).
            ids = ids[-(self.max_length - max_tokens):] if len(ids) + max_tokens > self.max_length else ids
            prompts.append({"prompt_token_ids": ids})
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=until or None,
                                         **sampling))
        outputs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        errors = [o.error for o in outputs if o.error]
        if errors:
            raise ValueError(f"generation failed: {errors[0]}")
        return [o.text for o in outputs]


def main(argv: Optional[list] = None) -> None:
    """lm-eval's command line with the ridgeline model registered (`ridgeline lm-eval ...`)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
