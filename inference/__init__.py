"""ridgeline inference: `LLM` facade, engine, scheduler, sampler."""

from inference.sampling_params import SamplingParams
from inference.outputs import CompletionOutput, RequestOutput, ScoreOutput, StreamDelta


def __getattr__(name):
    # LLM pulls in JAX and the model; import it lazily so light modules stay cheap to import.
    if name == "LLM":
        from inference.llm import LLM

        return LLM
    if name == "Engine":
        from inference.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ScoreOutput", "StreamDelta"]
