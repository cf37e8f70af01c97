"""Per-request sampling parameters, with vLLM's field names, defaults and validation.

Only the host-side description lives here; `inference.sampler` turns a batch of these into device
arrays and `inference.stop` applies the stop / length rules.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

# Temperatures below this are treated as greedy (as in vLLM): dividing logits by a tiny temperature
# only produces inf/NaN, and the limit of softmax(l / t) as t -> 0 is argmax anyway.
SAMPLING_EPS = 1e-5
# Upper bound on `logprobs` / `prompt_logprobs` (vLLM's default `max_logprobs`).
MAX_LOGPROBS = 20
# `logit_bias` values are clamped to this range, as the OpenAI API specifies (and vLLM does).
MAX_LOGIT_BIAS = 100.0


def _short(value: Any, limit: int = 120) -> str:
    """repr of a value, cut to `limit` characters (schemas can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(x) -> bool:
    # bool is an int subclass; `top_k=True` is almost certainly a bug, so reject it.
    return isinstance(x, int) and not isinstance(x, bool)


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


@dataclass
class StructuredOutputsParams:
    """A constraint on the output (vLLM's names): exactly one of

    json: a JSON schema (a dict or its JSON text); the output is a JSON value valid against it.
    json_object: True for any JSON object.
    regex: the output fully matches this regular expression (Rust `regex` syntax, as llguidance takes).
    choice: the output is exactly one of these strings.
    grammar: a Lark (or GBNF) context-free grammar.

    disable_any_whitespace: JSON without whitespace between tokens (small models given the choice may
    produce whitespace for ever). Enforced as a token mask by `inference.structured_output`
    (llguidance); checked here at construction, so a bad schema or regex fails before any work.
    """

    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: bool = False

    _KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        given = [k for k in self._KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs={self!r} must set exactly one of {', '.join(self._KINDS)}, "
                             f"got {len(given)}" + (f" ({', '.join(given)})" if given else ""))
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"disable_any_whitespace={self.disable_any_whitespace!r} must be True or False")

    @property
    def kind(self) -> str:
        return next(k for k in self._KINDS if getattr(self, k) not in (None, False))


# SamplingParams' vLLM-style shortcuts and the StructuredOutputsParams field each one sets.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


@dataclass
class SamplingParams:
    """Sampling parameters for one request (vLLM-compatible names and defaults).

    top_k: 0 or -1 disables it. stop: a string or a list of strings (normalised to a list).
    logprobs: if set to k, return the top-k logprobs of every generated token plus the chosen
    token's own logprob (k = 0 returns only the chosen token's).
    logit_bias: {token_id: bias} added to the logits before penalties (keys may be str, as in JSON;
    biases clamped to [-100, 100]). allowed_token_ids: only these tokens can be sampled.
    bad_words: words never generated: each is tokenized with and without a leading space
    (`update_from_tokenizer`), and a word's last token is banned whenever the output so far ends
    with the rest of the word. Token ids are checked against the vocab by `validate_token_ids`.
    structured_outputs (or one of vLLM's shortcuts guided_json / guided_regex / guided_choice /
    guided_grammar; guided_json=True means any JSON object): constrains the output to a JSON schema,
    regex, choice or grammar (see `StructuredOutputsParams`; needs llguidance, the `structured` extra).
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
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    structured_outputs: Optional[StructuredOutputsParams] = None
    guided_json: Optional[Union[str, dict, bool]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    # Token ids of every bad-word variant, set by `update_from_tokenizer` (None until then).
    _bad_words_token_ids: Optional[list[list[int]]] = field(default=None, init=False, repr=False, compare=False)

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
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias={self.logit_bias!r} must be a dict {{token_id: bias}} or None")
            bias = {}
            for token, value in self.logit_bias.items():
                try:
                    token_id = int(token)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias={self.logit_bias!r}: key {token!r} is not a token id") from None
                if (not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value)
                        or isinstance(token, bool) or (isinstance(token, float) and token != token_id)):
                    raise ValueError(f"logit_bias={self.logit_bias!r}: {token!r}: {value!r} must map a token id "
                                     "to a number")
                bias[token_id] = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(value)))
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not all(
                    _is_int(t) for t in self.allowed_token_ids):
                raise ValueError(f"allowed_token_ids={self.allowed_token_ids!r} must be a list of ints or None")
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids=[] is empty: no token could be sampled")
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(
                    isinstance(w, str) and w.strip() for w in self.bad_words):
                raise ValueError(f"bad_words={self.bad_words!r} must be a list of non-blank strings or None")
            self.bad_words = list(self.bad_words)
        self._validate()
        self._normalize_structured_outputs()

    def _normalize_structured_outputs(self) -> None:
        """Folds the guided_* shortcuts into `structured_outputs` and compiles its grammar text (checking
        the schema / regex); errors name the field the user gave."""
        guided = {name: getattr(self, name) for name in _GUIDED_FIELDS if getattr(self, name) is not None}
        if len(guided) > 1:
            raise ValueError(f"{next(iter(guided))}={_short(next(iter(guided.values())))}: only one of "
                             f"{', '.join(guided)} may be set")
        field_name = "structured_outputs"
        if guided:
            field_name, value = next(iter(guided.items()))
            if field_name == "guided_json" and value is True:
                derived = StructuredOutputsParams(json_object=True)
            elif field_name == "guided_json" and not isinstance(value, (str, dict)):
                raise ValueError(f"guided_json={_short(value)} must be a JSON schema (a dict or a str) or True")
            else:
                derived = StructuredOutputsParams(**{_GUIDED_FIELDS[field_name]: value})
            # dataclasses.replace passes both the shortcut and the object derived from it: that is fine.
            if self.structured_outputs is not None and self.structured_outputs != derived:
                raise ValueError(f"{field_name}={_short(value)} cannot be combined with structured_outputs="
                                 f"{_short(self.structured_outputs)}")
            self.structured_outputs = derived
        self._grammar: Optional[str] = None  # llguidance grammar text (not a dataclass field)
        if self.structured_outputs is None:
            return
        if isinstance(self.structured_outputs, dict):  # e.g. from a JSON config
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValueError(f"structured_outputs={_short(self.structured_outputs)}: {e}") from None
        if not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs={_short(self.structured_outputs)} must be a "
                             "StructuredOutputsParams or None")
        from inference.structured_output import build_grammar  # lazy: llguidance is an optional extra

        self._grammar = build_grammar(self.structured_outputs, field_name)

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

    def validate_token_ids(self, vocab_size: int) -> None:
        """Raises ValueError naming the ids of logit_bias / allowed_token_ids / tokenized bad_words
        outside [0, vocab_size) (vLLM checks these against the model at admission too)."""
        fields = [("logit_bias", list(self.logit_bias or ())), ("allowed_token_ids", self.allowed_token_ids or [])]
        if self._bad_words_token_ids is not None:
            fields.append(("bad_words", [t for ids in self._bad_words_token_ids for t in ids]))
        for name, ids in fields:
            bad = sorted({t for t in ids if not 0 <= t < vocab_size})
            if bad:
                raise ValueError(f"{name}: token id(s) {bad} out of range for vocab_size={vocab_size} "
                                 f"(valid ids are 0..{vocab_size - 1})")

    def update_from_tokenizer(self, tokenizer) -> None:
        """Tokenizes `bad_words` as vLLM does: every word as is (leading spaces stripped) and with one
        leading space; the spaced variant is kept only when it is a different first token and the
        same number of tokens (a spaced word is then a word in the middle of text)."""
        if not self.bad_words:
            return
        variants: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            variants.append(list(plain))
            if spaced[0] != plain[0] and len(spaced) == len(plain):
                variants.append(list(spaced))
        self._bad_words_token_ids = variants

    @property
    def bad_words_token_ids(self) -> list[list[int]]:
        """Token ids of every bad-word variant ([] without bad_words)."""
        if not self.bad_words:
            return []
        if self._bad_words_token_ids is None:
            raise ValueError(f"bad_words={self.bad_words!r} are not tokenized: call update_from_tokenizer first")
        return self._bad_words_token_ids

    @property
    def grammar(self) -> Optional[str]:
        """llguidance grammar text of `structured_outputs` (None when the output is unconstrained)."""
        return self._grammar

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
