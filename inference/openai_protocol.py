"""The OpenAI protocol mapping, in one place for the HTTP server and OpenAI Batch files.

Requests (`/v1/completions`, `/v1/chat/completions` bodies as plain dicts) become a `PreparedRequest`:
tokenized prompts plus `SamplingParams`; every bad field raises `OpenAIError` naming it. Finished engine
outputs become OpenAI response bodies (`completion_body`), and streaming updates become chunk dicts
(`StreamEncoder`). No web framework is imported here, so batch jobs need none.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from inference.outputs import RequestOutput
from inference.sampling_params import SamplingParams, StructuredOutputsParams

COMPLETIONS = "completions"
CHAT = "chat"
ROUTES = {"/v1/completions": COMPLETIONS, "/v1/chat/completions": CHAT}

# OpenAI's default for completions; chat defaults to whatever room the context window leaves.
_DEFAULT_COMPLETION_MAX_TOKENS = 16
_MESSAGE_ROLES = {"system", "developer", "user", "assistant", "tool"}
# Accepted for compatibility; they do not change what is generated.
_IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# vLLM's extra sampling fields (sent by the openai client through `extra_body`).
_EXTRA_SAMPLING_FIELDS = {"top_k": int, "min_p": float, "repetition_penalty": float, "min_tokens": int,
                          "ignore_eos": bool, "stop_token_ids": list, "skip_special_tokens": bool,
                          "include_stop_str_in_output": bool, "allowed_token_ids": list, "bad_words": list,
                          # structured output (vLLM's names; `structured_outputs` takes StructuredOutputsParams'
                          # fields as an object)
                          "guided_json": (dict, str), "guided_regex": str, "guided_choice": list,
                          "guided_grammar": str, "structured_outputs": dict}
_COMMON_FIELDS = {"model", "n", "temperature", "top_p", "max_tokens", "stop", "seed", "stream", "stream_options",
                  "presence_penalty", "frequency_penalty", "logit_bias", *_IGNORED_FIELDS, *_EXTRA_SAMPLING_FIELDS}
_KNOWN_FIELDS = {
    COMPLETIONS: _COMMON_FIELDS | {"prompt", "echo", "logprobs", "best_of", "suffix", "response_format"},
    CHAT: _COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                            "tools", "tool_choice"},
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: Optional[str] = None, status_code: int = 400,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status_code, self.type, self.code = message, param, status_code, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class PreparedRequest:
    """One API request, validated: `prompts[p]` is (text or None, token ids), sampled `n` times each."""

    kind: str  # COMPLETIONS or CHAT
    model: str
    prompts: list[tuple[Optional[str], list[int]]]
    params: list[SamplingParams]  # per prompt (chat: one); n > 1 is fanned out by `engine_requests`
    n: int
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: Optional[int] = None  # top alternatives per token (completions `logprobs`, chat `top_logprobs`)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == CHAT else "cmpl-") + self.request_id

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None

    def engine_requests(self, base_id: str) -> list[tuple[str, int, list[int], SamplingParams, Optional[str]]]:
        """(engine request id, choice index, prompt ids, single-sample params, prompt text) per choice;
        choice p * n + j is sample j of prompt p (sample j of a seeded request gets seed + j)."""
        out = []
        for p, ((text, ids), params) in enumerate(zip(self.prompts, self.params)):
            for j in range(self.n):
                child = params.for_child(j) if self.n > 1 else params
                index = p * self.n + j
                out.append((f"{base_id}-{index}", index, ids, child, text))
        return out


# ---------------------------------------------------------------------------------------------- parsing
def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "an array",
            dict: "an object"}[t]


def _field(body: dict, name: str, expected, default=None, nullable: bool = True):
    """body[name] checked against `expected` (a type or tuple of types); ints pass as floats, bools never
    pass as numbers."""
    value = body.get(name, default)
    if value is None and nullable:
        return default
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in types)
    if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise OpenAIError(f"{name}={value!r} must be {' or '.join(_type_name(t) for t in types)}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise OpenAIError(f"{name}={value!r} must be finite", param=name)
    return value


def _sampling_params(body: dict, max_tokens: int, logprobs: Optional[int], field_names: dict) -> SamplingParams:
    """SamplingParams from the body; its ValueError (which starts with the field name) becomes a 400
    naming the request's own field (`field_names` maps SamplingParams names to request names)."""
    kwargs = dict(n=1, max_tokens=max_tokens, logprobs=logprobs,
                  temperature=_field(body, "temperature", float, 1.0),
                  top_p=_field(body, "top_p", float, 1.0),
                  seed=_field(body, "seed", int),
                  stop=_field(body, "stop", (str, list)),
                  presence_penalty=_field(body, "presence_penalty", float, 0.0),
                  frequency_penalty=_field(body, "frequency_penalty", float, 0.0),
                  logit_bias=_field(body, "logit_bias", dict))  # {"token id": bias in [-100, 100]}
    for name, t in _EXTRA_SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            kwargs[name] = _field(body, name, t)
    response_format = _response_format(body)
    if response_format is not None:
        given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                   "structured_outputs") if name in kwargs]
        if given:
            raise OpenAIError(f"response_format cannot be combined with {given[0]}", param="response_format")
        kwargs["structured_outputs"] = response_format
    try:
        return SamplingParams(**kwargs)
    except ImportError as e:  # structured output asked of a server without llguidance
        raise OpenAIError(str(e), param=str(e).split(" ", 1)[0]) from None
    except (ValueError, TypeError) as e:
        message = str(e)
        match = re.match(r"(\w+)=", message)
        name = match.group(1) if match else None
        param = field_names.get(name, name)
        if name and param != name:  # say it with the request's own field name
            message = param + message[len(name):]
        raise OpenAIError(message, param=param) from None


def _response_format(body: dict) -> Optional[StructuredOutputsParams]:
    """OpenAI's `response_format` as a constraint: {"type": "text"} (none), {"type": "json_object"}, or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (always enforced, strict or not)."""
    fmt = _field(body, "response_format", dict)
    if fmt is None or fmt.get("type") == "text":
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        spec = StructuredOutputsParams(json_object=True)
    elif kind == "json_schema":
        json_schema = fmt.get("json_schema")
        if not isinstance(json_schema, dict):
            raise OpenAIError(f"response_format.json_schema={json_schema!r} must be an object with 'name' and "
                              "'schema'", param="response_format")
        name = json_schema.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise OpenAIError(f"response_format.json_schema.name={name!r} must be a string of up to 64 letters, "
                              "digits, '_' or '-'", param="response_format")
        if not isinstance(json_schema.get("strict", False), (bool, type(None))):
            raise OpenAIError(f"response_format.json_schema.strict={json_schema['strict']!r} must be a boolean",
                              param="response_format")
        schema = json_schema.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise OpenAIError(f"response_format.json_schema.schema={schema!r} must be a JSON schema object",
                              param="response_format")
        spec = StructuredOutputsParams(json=schema)
    else:
        raise OpenAIError(f"response_format.type={kind!r} must be 'text', 'json_object' or 'json_schema'",
                          param="response_format")
    from inference.structured_output import build_grammar

    try:  # checked here so that the error names the request's own field
        build_grammar(spec, "response_format.json_schema.schema" if kind == "json_schema" else "response_format")
    except (ValueError, ImportError) as e:
        raise OpenAIError(str(e), param="response_format") from None
    return spec


def _check_unsupported(body: dict, kind: str) -> None:
    unknown = sorted(set(body) - _KNOWN_FIELDS[kind])
    if unknown:
        raise OpenAIError(f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    if kind == COMPLETIONS and body.get("suffix") is not None:
        raise OpenAIError("suffix is not supported", param="suffix")
    if kind == CHAT:
        if body.get("tools") or body.get("tool_choice") not in (None, "none"):
            param = "tools" if body.get("tools") else "tool_choice"
            raise OpenAIError("tool calling is not supported", param=param)


def _check_model(body: dict, model_name: str, strict: bool) -> str:
    model = _field(body, "model", str)
    if model is None:
        if strict:
            raise OpenAIError("model is required", param="model")
        return model_name
    if strict and model != model_name:
        raise OpenAIError(f"the model {model!r} does not exist; this server serves {model_name!r}", param="model",
                          status_code=404, code="model_not_found")
    return model_name


def _check_prompt_ids(ids: list, param: str, vocab_size: int, max_model_len: int, max_tokens: Optional[int],
                      max_tokens_param: str) -> None:
    if not ids:
        raise OpenAIError(f"{param} is empty (no tokens)", param=param)
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise OpenAIError(f"token id {bad[0]!r} in {param} is out of range for vocab_size={vocab_size}", param=param)
    if len(ids) >= max_model_len:
        raise OpenAIError(f"{param} has {len(ids)} tokens, which leaves no room to generate within "
                          f"max_model_len={max_model_len}", param=param)
    if max_tokens is not None and len(ids) + max_tokens > max_model_len:
        raise OpenAIError(f"this model's maximum context length is {max_model_len} tokens; {param} has {len(ids)} "
                          f"and {max_tokens_param}={max_tokens} asks for {max_tokens} more", param=max_tokens_param)


def _stream_options(body: dict, stream: bool) -> bool:
    opts = _field(body, "stream_options", dict)
    if opts is None:
        return False
    if not stream:
        raise OpenAIError("stream_options is only allowed with stream=true", param="stream_options")
    return bool(_field(opts, "include_usage", bool, False))


def _completion_prompts(body: dict, tokenizer) -> list[tuple[Optional[str], list[int]]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise OpenAIError("prompt is required", param="prompt")
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]  # one prompt given as token ids
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise OpenAIError(f"prompt={prompt!r} must be a string, an array of strings, an array of token ids or "
                          "an array of token id arrays", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise OpenAIError("prompt is an empty string", param="prompt")
            out.append((item, tokenizer.encode(item)))
        elif isinstance(item, list):
            out.append((None, item))
        else:
            raise OpenAIError(f"prompt item {item!r} must be a string or an array of token ids", param="prompt")
    return out


def _message_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(f"messages[{index}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                  f"are supported, got {part!r}", param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise OpenAIError(f"messages[{index}].content={content!r} must be a string or an array of text parts",
                      param=f"messages[{index}].content")


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(f"messages={messages!r} must be a non-empty array of messages", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise OpenAIError(f"messages[{i}]={m!r} must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in _MESSAGE_ROLES:
            raise OpenAIError(f"messages[{i}].role={role!r} must be one of {sorted(_MESSAGE_ROLES)}",
                              param=f"messages[{i}].role")
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        out.append({"role": "system" if role == "developer" else role, "content": _message_text(m.get("content"), i)})
    return out


def parse_request(kind: str, body, tokenizer, *, model_name: str, max_model_len: int,
                  strict_model: bool = True) -> PreparedRequest:
    """Validates an OpenAI request body and tokenizes its prompts. Raises OpenAIError naming the field.

    strict_model: the body's `model` must be `model_name` (404 otherwise); batch files accept any.
    """
    if not isinstance(body, dict):
        raise OpenAIError(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_unsupported(body, kind)
    model = _check_model(body, model_name, strict_model)
    n = _field(body, "n", int, 1)
    if n < 1:
        raise OpenAIError(f"n={n} must be >= 1", param="n")
    stream = _field(body, "stream", bool, False)
    include_usage = _stream_options(body, stream)
    vocab_size = tokenizer.vocab_size

    if kind == COMPLETIONS:
        best_of = _field(body, "best_of", int)
        if best_of is not None and best_of != n:
            raise OpenAIError(f"best_of={best_of} is not supported unless it equals n={n}", param="best_of")
        echo = _field(body, "echo", bool, False)
        logprobs = _field(body, "logprobs", int)
        max_tokens = _field(body, "max_tokens", int, _DEFAULT_COMPLETION_MAX_TOKENS)
        prompts = _completion_prompts(body, tokenizer)
        for _, ids in prompts:
            _check_prompt_ids(ids, "prompt", vocab_size, max_model_len, max_tokens, "max_tokens")
        params = _sampling_params(body, max_tokens, logprobs, {})
        return PreparedRequest(kind, model, prompts, [params] * len(prompts), n, stream, include_usage, echo,
                               logprobs)

    if kind != CHAT:
        raise ValueError(f"kind={kind!r} must be {COMPLETIONS!r} or {CHAT!r}")
    want_logprobs = _field(body, "logprobs", bool, False)
    top_logprobs = _field(body, "top_logprobs", int)
    if top_logprobs is not None and not want_logprobs:
        raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (top_logprobs or 0) if want_logprobs else None
    max_tokens_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, max_tokens_param, int)
    messages = _chat_messages(body)
    try:
        ids = tokenizer.encode_chat(messages)
    except ValueError as e:  # e.g. the template rejects the role order
        raise OpenAIError(f"messages: {e}", param="messages") from None
    _check_prompt_ids(ids, "messages", vocab_size, max_model_len, max_tokens, max_tokens_param)
    if max_tokens is None:
        max_tokens = max_model_len - len(ids)
    params = _sampling_params(body, max_tokens, logprobs, {"max_tokens": max_tokens_param, "logprobs": "top_logprobs"})
    return PreparedRequest(kind, model, [(None, ids)], [params], n, stream, include_usage, logprobs=logprobs)


# --------------------------------------------------------------------------------------------- responses
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(tokenizer, token_ids: list[int], entries: list, text_offset: int = 0) -> dict:
    """Legacy completions logprobs: parallel lists over tokens (a None entry: nothing predicts the token)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        text = _token_text(tokenizer, tid)
        tokens.append(text)
        token_logprobs.append(None if entry is None else entry[tid])
        top.append(None if entry is None else {_token_text(tokenizer, t): lp for t, lp in entry.items()})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(tokenizer, token_ids: list[int], entries: list, k: int) -> dict:
    def item(tid, lp):
        text = _token_text(tokenizer, tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, entry in zip(token_ids, entries):
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        content.append({**item(tid, entry[tid]), "top_logprobs": [item(t, lp) for t, lp in best]})
    return {"content": content, "refusal": None}


def _choice_logprobs(req: PreparedRequest, tokenizer, token_ids: list[int], entries: Optional[list],
                     text_offset: int = 0) -> Optional[dict]:
    if req.logprobs is None or entries is None:
        return None
    if req.kind == CHAT:
        return _chat_logprobs(tokenizer, token_ids, entries, req.logprobs)
    return _completion_logprobs(tokenizer, token_ids, entries, text_offset)


def _prompt_text(req: PreparedRequest, prompt_index: int, tokenizer) -> str:
    text, ids = req.prompts[prompt_index]
    return text if text is not None else tokenizer.decode(ids)


def _usage(req: PreparedRequest, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(ids) for _, ids in req.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(req: PreparedRequest, outputs: list[RequestOutput], tokenizer,
                    prompt_logprobs: Optional[list] = None) -> dict:
    """The response body of a finished request. outputs[i]: the final output of choice i;
    prompt_logprobs[p] (echo with logprobs): prompt p's per-token entries, the first None."""
    choices = []
    for index, out in enumerate(outputs):
        completion = out.outputs[0]
        if req.kind == CHAT:
            choices.append({"index": index, "message": {"role": "assistant", "content": completion.text},
                            "logprobs": _choice_logprobs(req, tokenizer, completion.token_ids, completion.logprobs),
                            "finish_reason": completion.finish_reason})
            continue
        p = index // req.n
        text, logprobs = completion.text, None
        if req.echo:
            prompt_text = _prompt_text(req, p, tokenizer)
            text = prompt_text + text
            if req.logprobs is not None:
                ids = req.prompts[p][1]
                logprobs = _completion_logprobs(tokenizer, ids + completion.token_ids,
                                                prompt_logprobs[p] + completion.logprobs)
        else:
            logprobs = _choice_logprobs(req, tokenizer, completion.token_ids, completion.logprobs)
        choices.append({"index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": completion.finish_reason})
    return {"id": req.response_id, "object": "chat.completion" if req.kind == CHAT else "text_completion",
            "created": req.created, "model": req.model, "choices": choices, "system_fingerprint": None,
            "usage": _usage(req, sum(len(o.token_ids) for o in outputs))}


class StreamEncoder:
    """Turns a request's streaming engine outputs into OpenAI chunk dicts (sent as SSE `data:` lines)."""

    def __init__(self, req: PreparedRequest, tokenizer, prompt_logprobs: Optional[list] = None):
        self.req, self.tokenizer, self.prompt_logprobs = req, tokenizer, prompt_logprobs
        self._sent_tokens = [0] * req.num_choices
        self._sent_text = [""] * req.num_choices
        self._started = [False] * req.num_choices
        self._completion_tokens = 0

    def _chunk(self, choices: list, usage: Optional[dict] = None) -> dict:
        req = self.req
        body = {"id": req.response_id, "object": "chat.completion.chunk" if req.kind == CHAT else "text_completion",
                "created": req.created, "model": req.model, "choices": choices, "system_fingerprint": None}
        if req.include_usage:
            body["usage"] = usage
        return body

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        """Chunks for choice `index`'s latest output (none when nothing new is visible yet)."""
        req, completion = self.req, out.outputs[0]
        chunks = []
        if not self._started[index]:
            self._started[index] = True
            if req.kind == CHAT:  # the first chat chunk carries the role
                chunks.append(self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]))
            elif req.echo:
                p = index // req.n
                logprobs = None
                if req.logprobs is not None:
                    logprobs = _completion_logprobs(self.tokenizer, req.prompts[p][1], self.prompt_logprobs[p])
                chunks.append(self._chunk([{"index": index, "text": _prompt_text(req, p, self.tokenizer),
                                            "logprobs": logprobs, "finish_reason": None}]))
        start = self._sent_tokens[index]
        new_ids = completion.token_ids[start:]
        new_text = completion.text[len(self._sent_text[index]):]
        finish = completion.finish_reason if out.finished else None
        if not (new_text or finish or (new_ids and req.logprobs is not None)):
            return chunks  # e.g. a token held back as a possible stop-string prefix
        entries = completion.logprobs[start:] if completion.logprobs is not None else None
        logprobs = _choice_logprobs(req, self.tokenizer, new_ids, entries)
        self._sent_tokens[index] = len(completion.token_ids)
        self._sent_text[index] = completion.text
        if finish:
            self._completion_tokens += len(completion.token_ids)
        if req.kind == CHAT:
            choice = {"index": index, "delta": {"content": new_text} if new_text else {}, "logprobs": logprobs,
                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": new_text, "logprobs": logprobs, "finish_reason": finish}
        chunks.append(self._chunk([choice]))
        return chunks

    def usage_chunk(self) -> Optional[dict]:
        """The last chunk when stream_options.include_usage: no choices, the request's usage."""
        if not self.req.include_usage:
            return None
        return self._chunk([], _usage(self.req, self._completion_tokens))
