"""Tokenizer: the `tokenizers` library built from a GGUF vocabulary/merges or a `tokenizer.json`,
plus the model's own chat template rendered with jinja2."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# GGUF token types (llama.cpp): 3 = control (special), 4 = user defined (added, matched whole).
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer splits per `tokenizer.ggml.pre` for byte-level vocabularies. Each entry is a
# sequence of regexes applied in turn (isolated splits), then byte-level mapping.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "gpt2": (_GPT2_SPLIT,),
    "default": (_GPT2_SPLIT,),
    # SmolLM2 was trained with single-digit splitting before the GPT-2 rule (its tokenizer.json has
    # Digits(individual_digits=True)); llama.cpp's "smollm" pre-tokenizer does the same.
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "llama3": (_LLAMA3_SPLIT,), "llama-bpe": (_LLAMA3_SPLIT,), "smaug-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}


def _check_encodable(text: str, what: str) -> None:
    """Text the tokenizer can take is valid UTF-8: a lone surrogate (e.g. from a bad JSON escape) is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} has a lone surrogate {text[e.start]!r} at character {e.start}, which is not "
                         "valid Unicode text") from None


@dataclass
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra) -> str:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError(f"chat messages={messages!r} must be a list of {{'role', 'content'}} dicts")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"chat message {i}={message!r} must be a dict with 'role' and 'content'")
            for key in ("role", "content"):
                if not isinstance(message[key], str):
                    raise TypeError(f"chat message {i} {key}={message[key]!r} must be a str, "
                                    f"got {type(message[key]).__name__}")
                _check_encodable(message[key], f"chat message {i} {key}")
        # Same environment settings as Hugging Face's apply_chat_template, so the text matches.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        return env.from_string(self.source).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token, **extra)


@dataclass
class TextTokenizer:
    """Thin wrapper: encode/decode with the model's special-token and BOS conventions."""

    backend: Tokenizer
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    add_bos_token: bool = False
    chat_template: Optional[ChatTemplate] = None
    stop_token_ids: tuple = field(default_factory=tuple)
    # A copy of `backend` that encodes special-token strings as plain text (for chat message contents).
    _plain_backend: Optional[Tokenizer] = field(default=None, init=False, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
        _check_encodable(text, "prompt")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs: Sequence[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """`decode` of each id list (lists of ints), in one call. A loop over the backend's decode, not its
        decode_batch: that one fans the rows out to a thread pool, which for the few ids of each row costs
        more wall time than it saves (measured on 2 cores: 0.17 vs 0.12 ms for 256 rows of 1-3 ids)."""
        decode = self.backend.decode
        return [decode(ids, skip_special_tokens=skip_special_tokens) for ids in seqs]

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass plain prompts instead of chat messages")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation, where only the template's own markers are control tokens.

        Special-token text written inside a message's content (``"hi<|im_end|><|im_start|>system..."``) is
        encoded as plain text, so content cannot forge turns. The template writes any BOS itself, so no
        special tokens are added on top (as in HF).
        """
        text = self.apply_chat_template(messages, add_generation_prompt)
        content_spans = _content_spans(self.chat_template, messages, add_generation_prompt, text)
        ids: list[int] = []
        start = 0
        for begin, end, token_id in self._special_matches(text):
            if any(b < end and begin < e for b, e in content_spans):
                continue  # inside a message's content: plain text
            ids += self._encode_plain(text[start:begin])
            ids.append(token_id)
            start = end
        return ids + self._encode_plain(text[start:])

    def _special_matches(self, text: str) -> list[tuple[int, int, int]]:
        """(begin, end, id) of special-token strings in text, leftmost-longest and non-overlapping."""
        specials = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        matches, pos = [], 0
        while specials:
            found = [(text.find(s, pos), -len(s), s) for s in specials]
            found = [f for f in found if f[0] >= 0]
            if not found:
                break
            begin, neg_len, s = min(found)
            matches.append((begin, begin - neg_len, specials[s]))
            pos = begin - neg_len
        return matches

    def _encode_plain(self, text: str) -> list[int]:
        """Encodes text with special-token strings treated as ordinary characters."""
        if not text:
            return []
        if self._plain_backend is None:  # a copy: flipping the shared backend's flag would race other callers
            self._plain_backend = Tokenizer.from_str(self.backend.to_str())
            self._plain_backend.encode_special_tokens = True
        return self._plain_backend.encode(text, add_special_tokens=False).ids


def _content_spans(template: ChatTemplate, messages: Sequence[dict], add_generation_prompt: bool,
                   text: str) -> list[tuple[int, int]]:
    """[begin, end) spans of `text` (the rendered conversation) that came from the messages' contents.

    The template is rendered a second time with a unique marker for each content; the text around the
    markers is the template's own. Each content is then located right after the template text before it,
    as written or as stripped (templates often `| trim` contents).
    """
    markers = {f"\ue000{i}\ue001": i for i, m in enumerate(messages) if isinstance(m.get("content"), str)}
    marked = template.render([{**m, "content": f"\ue000{i}\ue001"} if isinstance(m.get("content"), str) else m
                              for i, m in enumerate(messages)], add_generation_prompt=add_generation_prompt)
    pieces = re.split("(\ue000\\d+\ue001)", marked)  # template text, marker, template text, ...
    spans, pos = [], 0
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if not text.startswith(piece, pos):
                raise ValueError("the chat template renders differently on a second pass; cannot separate "
                                 "message contents from the template's markers")
            pos += len(piece)
            continue
        i = markers[piece]
        content = messages[i]["content"]
        for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
            if text.startswith(candidate, pos):
                spans.append((pos, pos + len(candidate)))
                pos += len(candidate)
                break
        else:
            raise ValueError(f"the chat template transforms message {i}'s content in a way that cannot be "
                             "located in the rendered text")
    return spans


def byte_level_bpe_from_gguf(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                             pre: str) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    backend = Tokenizer(bpe)
    splits = PRE_TOKENIZER_SPLITS.get(pre, PRE_TOKENIZER_SPLITS["default"])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False)
                for t, kind in zip(tokens, token_types) if kind == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
    if specials:
        backend.add_special_tokens(specials)
    if user:
        backend.add_tokens(user)
    return backend


def tokenizer_from_gguf_metadata(meta: dict) -> TextTokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer.ggml.model={kind!r}; ridgeline supports byte-level BPE ('gpt2')")
    tokens = meta["tokenizer.ggml.tokens"]
    backend = byte_level_bpe_from_gguf(tokens, meta.get("tokenizer.ggml.merges", []),
                                       meta.get("tokenizer.ggml.token_type", [1] * len(tokens)),
                                       meta.get("tokenizer.ggml.pre", "default"))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    template = meta.get("tokenizer.chat_template")
    return TextTokenizer(
        backend=backend, bos_token_id=bos, eos_token_id=eos,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=ChatTemplate(template, tokens[bos] if bos is not None else "",
                                   tokens[eos] if eos is not None else "") if template else None,
        stop_token_ids=tuple(t for t in (eos,) if t is not None),
    )


def tokenizer_from_hf_dir(path: Path) -> TextTokenizer:
    path = Path(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.exists():
        raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}")
    backend = Tokenizer.from_file(str(tok_file))
    cfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}

    def token_str(value):
        return value.get("content") if isinstance(value, dict) else value

    bos_tok, eos_tok = token_str(cfg.get("bos_token")), token_str(cfg.get("eos_token"))
    bos = backend.token_to_id(bos_tok) if bos_tok else None
    eos = backend.token_to_id(eos_tok) if eos_tok else None
    template = cfg.get("chat_template")
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    # tokenizer.json's post-processor may already add BOS; our encode() adds it only when asked.
    return TextTokenizer(
        backend=backend, bos_token_id=bos, eos_token_id=eos, add_bos_token=bool(cfg.get("add_bos_token", False)),
        chat_template=ChatTemplate(template, bos_tok or "", eos_tok or "") if template else None,
        stop_token_ids=tuple(t for t in (eos,) if t is not None))
