"""Per-request sampling parameters, with vLLM's field names, defaults and validation.

Only the host-side description lives here; `inference.sampler` turns a batch of these into device
arrays and `inference.stop` applies the stop / length rules.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

# Temperatures below this are treated as greedy (as in vLLM): dividing logits by a tiny temperature
# only produces inf/NaN, and the limit of softmax(l / t) as t -> 0 is argmax anyway.
SAMPLING_EPS = 1e-5
# Upper bound on `logprobs` / `prompt_logprobs` (vLLM's default `max_logprobs`).
MAX_LOGPROBS = 20


def _is_int(x) -> bool:
    # bool is an int subclass; `top_k=True` is almost certainly a bug, so reject it.
    return isinstance(x, int) and not isinstance(x, bool)


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


@dataclass
class SamplingParams:
    """Sampling parameters for one request (vLLM-compatible names and defaults).

    top_k: 0 or -1 disables it. stop: a string or a list of strings (normalised to a list).
    logprobs: if set to k, return the top-k logprobs of every generated token plus the chosen
    token's own logprob (k = 0 returns only the chosen token's).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Normalise first so validation sees the canonical form.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop={self.stop!r} must be a str, a list of str or None")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be a list of ints or None")
        self._validate()

    def _validate(self) -> None:
        # Comparisons are written as `not (ok)` so that NaN is rejected too.
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be a number, got {type(value).__name__}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n={self.n!r} must be an int >= 1")
        if not (self.temperature >= 0.0) or math.isinf(self.temperature):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not _is_int(self.top_k) or not (self.top_k >= 1 or self.top_k in (0, -1)):
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 1, or 0 / -1 to disable")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not (self.repetition_penalty > 0.0) or self.repetition_penalty == float("inf"):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be a finite value > 0")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise ValueError(f"presence_penalty={self.presence_penalty!r} must be in [-2, 2]")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError(f"frequency_penalty={self.frequency_penalty!r} must be in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an int or None")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop={self.stop!r}: every stop string must be a non-empty str")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be non-negative ints")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an int >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens!r} must be an int >= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens!r} must be <= max_tokens={self.max_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name}={k!r} must be an int in [0, {MAX_LOGPROBS}] or None")

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: temperature 0 (below SAMPLING_EPS) or top_k == 1."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k >= 1

    def for_child(self, index: int) -> "SamplingParams":
        """Params for the index-th of the n sequences of this request (fanned out by the engine).

        As in vLLM, a seeded request gives child i the seed `seed + i`, so the n samples differ
        from each other yet are reproducible.
        """
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)
