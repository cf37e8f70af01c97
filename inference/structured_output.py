"""Structured output: JSON schema / regex / choice / grammar constraints through llguidance.

The grammar engine is llguidance (an optional extra: `pip install 'ridgeline[structured]'`); this module only
connects it to the engine:

* `build_grammar` turns a `StructuredOutputsParams` into llguidance grammar text and checks it (bad schemas
  and regexes fail when the SamplingParams is built, naming the field).
* `StructuredOutputManager` (one per engine) holds the llguidance tokenizer, built from ridgeline's own
  `tokenizers` tokenizer; `new_matcher` compiles a request's grammar at `add_request` (one LLMatcher per
  constrained request) and `bitmask` computes, on the host, the step's packed allowed-token bitmask
  [S, ceil(V / 32)] int32 (bit j of word w allows token 32 w + j; rows without a constraint all ones).
  The device sampler unpacks it and sets disallowed logits to -inf (`inference.sampler`).
* After sampling, the engine feeds each accepted token to its matcher (`advance`); a request whose grammar
  is complete (nothing but EOS can follow) finishes there with reason "stop", without a step for the EOS.

Only steps with a constrained row carry a mask: other steps run the sampler program they always ran. The
mask depends on the tokens before it, so constrained requests decode one token per step (no speculative
drafts, no multi-step decode; see inference/engine.py).
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from inference.sampling_params import StructuredOutputsParams

INSTALL_HINT = "pip install 'ridgeline[structured]' (llguidance)"


def _llguidance(field_name: str):
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)
    except ImportError:
        raise ImportError(f"{field_name} needs the llguidance package, which is not installed: "
                          f"{INSTALL_HINT}") from None
    return llguidance


def build_grammar(spec: "StructuredOutputsParams", field_name: str = "structured_outputs") -> str:
    """llguidance grammar text for the constraint; ValueError naming `field_name` if it is invalid (checked
    by llguidance without a tokenizer, so this works before any model is loaded)."""
    llg = _llguidance(field_name)
    kind = spec.kind
    value = getattr(spec, kind)

    def bad(message: str) -> ValueError:
        text = repr(value)
        text = text if len(text) <= 120 else text[:117] + "..."
        return ValueError(f"{field_name}={text}: {message}")

    if kind in ("json", "json_object"):
        if kind == "json_object":
            if value is not True:
                raise bad("json_object must be True")
            schema = {"type": "object"}
        elif isinstance(value, str):
            try:
                schema = json.loads(value)
            except json.JSONDecodeError as e:
                raise bad(f"the JSON schema is not valid JSON: {e}") from None
        elif isinstance(value, dict):
            schema = value
        else:
            raise bad("a JSON schema must be a dict or a JSON string")
        if not isinstance(schema, (dict, bool)):
            raise bad(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(
                schema, overrides={"whitespace_flexible": not spec.disable_any_whitespace})
        except (ValueError, TypeError) as e:
            raise bad(f"invalid JSON schema: {e}") from None
        what = "invalid JSON schema"
    elif kind == "regex":
        if not isinstance(value, str) or not value:
            raise bad("a regex must be a non-empty string")
        grammar, what = llg.LLMatcher.grammar_from_regex(value), "invalid regex"
    elif kind == "choice":
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(c, str) and c for c in value)):
            raise bad("choice must be a non-empty list of non-empty strings")
        grammar, what = llg.grammar_from("choice", list(value)), "invalid choice"
    else:  # grammar
        if not isinstance(value, str) or not value.strip():
            raise bad("a grammar must be a non-empty string (Lark or GBNF)")
        try:
            grammar = llg.grammar_from("grammar", value)
        except ValueError as e:
            raise bad(f"invalid grammar: {e}") from None
        what = "invalid grammar"
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        raise bad(f"{what}: {error.strip()}")
    return grammar


def unpack_bitmask_np(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """[B, W] int32 packed bitmask -> [B, vocab_size] bool (the host reference of the sampler's unpacking)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=-1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)


class StructuredOutputManager:
    """The engine's llguidance state: the tokenizer view, per-request matchers, and mask timing.

    vocab_size is the model's (logits) width, which may exceed the tokenizer's: ids past the tokenizer's are
    never allowed by a grammar.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_id):
        llg = _llguidance("structured output")
        if tokenizer is None:
            raise ValueError("structured output needs a tokenizer; the engine has none")
        self._llg = llg
        self.vocab_size = vocab_size
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) or eos_token_id is None else [eos_token_id]
        # LLTokenizer takes a tokenizers JSON (what llguidance.hf.from_tokenizer passes), so no transformers.
        self.tokenizer = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                         eos_token=None if eos is None else list(eos))
        self._executor = llg.LLExecutor()
        self.mask_seconds = 0.0  # host time spent computing masks
        self.mask_steps = 0

    def new_matcher(self, grammar: str, request_id: str):
        """An LLMatcher for one request; ValueError naming the request if the grammar does not compile."""
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"request {request_id!r}: structured_outputs grammar failed to compile: "
                             f"{matcher.get_error().strip()}")
        return matcher

    def bitmask(self, matchers: Sequence[Optional[object]], num_rows: int) -> Optional[np.ndarray]:
        """[num_rows, ceil(V / 32)] int32 packed allowed tokens of the step's rows (matchers[i] None: row i is
        unconstrained, all ones; rows past len(matchers) are padding), or None if no row is constrained."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        t0 = time.perf_counter()
        mask = self._llg.numpy.allocate_token_bitmask(num_rows, self.vocab_size)  # all ones
        self._llg.numpy.fill_next_token_bitmask_par(self._executor, rows, mask)
        self.mask_seconds += time.perf_counter() - t0
        self.mask_steps += 1
        return mask

    @staticmethod
    def advance(matcher, token: int) -> bool:
        """Feeds a sampled token; returns True once the grammar is complete (nothing but EOS may follow).
        The mask never allows a token the grammar rejects, so a rejection is a bug: RuntimeError."""
        if not matcher.consume_token(int(token)):
            raise RuntimeError(f"token {int(token)} was sampled but the grammar rejects it: "
                               f"{matcher.get_error().strip()}")
        return matcher.is_stopped()
