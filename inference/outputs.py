"""Result types returned by `LLM` (shaped like vLLM's, with shortcuts for the common single-sample case)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_generated_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> Optional[float]:
        """Time to first token, seconds."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> Optional[float]:
        """Mean time per output token after the first, seconds."""
        if self.finished_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: object = None  # the stop string or token id that fired
    logprobs: Optional[list[dict[int, float]]] = None  # per generated token: {token_id: logprob}
    cumulative_logprob: Optional[float] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None
    error: Optional[str] = None  # set when this request failed alone (bad parameters, too long, ...)

    # Shortcuts for the first (usually only) sample.
    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> Optional[str]:
        return self.outputs[0].finish_reason if self.outputs else ("error" if self.error else None)


@dataclass
class ScoreOutput:
    """Per-token log-likelihoods of a text under the model (teacher forcing)."""

    text: str
    token_ids: list[int]
    token_logprobs: list[Optional[float]]  # None for the first token (nothing predicts it)
    error: Optional[str] = None  # set when this text could not be scored (empty, too long, not a str)

    @property
    def total_logprob(self) -> float:
        return float(sum(lp for lp in self.token_logprobs if lp is not None))

    @property
    def perplexity(self) -> Optional[float]:
        """exp of the mean negative log-likelihood; None when no token was scored (e.g. a one-token text)."""
        import math

        scored = [lp for lp in self.token_logprobs if lp is not None]
        return math.exp(-sum(scored) / len(scored)) if scored else None


@dataclass
class StreamDelta:
    """One streaming update: the new tokens of one sample since the previous update."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: Optional[str] = None
    extra: dict = field(default_factory=dict)
