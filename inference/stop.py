"""Host-side stop / length decisions for one request, with vLLM semantics.

The checker is fed one generated token at a time and decides whether the request finishes:

* "stop": an eos token (unless ignore_eos), a `stop_token_ids` token, or a stop string appearing
  in the generated text. None of these fire until more than `min_tokens` tokens were generated
  (the sampler also bans eos / stop ids during that window, see `SamplingTensors.banned_ids`).
* "length": `max_tokens` tokens were generated. A stop condition met by that same last token wins,
  since it is the more informative reason (vLLM V0 order).

Text is decoded incrementally, as vLLM does: a window of ids starting at `prefix_offset` is decoded,
and the part past the text of ids[prefix_offset:read_offset] is new. The window moves on only once
its text is complete (no trailing U+FFFD, i.e. no half of a multi-byte character), so a window always
starts on a character boundary and decoding a window agrees with decoding the whole output. Each step
therefore decodes a few ids however long the output is, and stop strings are searched only in the
newly decoded text (reaching back len(stop) - 1 characters for a match that straddles the boundary).
Without stop strings nothing is decoded until the text is asked for. The text is kept in pieces (a
token copies nothing however long the output), and `append_batch` does the appends of a whole step
with two batched decode calls for all of its rows (windows, then new prefixes) instead of two per row.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional, Sequence, Union

from inference.sampling_params import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

# What a byte-level decoder renders for an incomplete UTF-8 sequence; such a tail may still change.
_REPLACEMENT = "\ufffd"


class StopChecker:
    """Tracks one request's output and decides when it finishes.

    decode(ids) -> str renders generated ids (the caller binds skip_special_tokens etc.).
    After each `append`: `finish_reason` is None / "stop" / "length"; `stop_reason` is, like
    vLLM's, the stop string or stop token id that fired (None for eos, length or not finished);
    `text` is the visible output text.
    """

    def __init__(self, params: SamplingParams, eos_token_id: Union[int, Sequence[int], None],
                 decode: Callable[[Sequence[int]], str]):
        self.params = params
        self._decode = decode
        if eos_token_id is None or params.ignore_eos:
            self._eos_ids: frozenset[int] = frozenset()
        elif isinstance(eos_token_id, int):
            self._eos_ids = frozenset([eos_token_id])
        else:
            self._eos_ids = frozenset(int(e) for e in eos_token_id)
        self._stop_ids = frozenset(params.stop_token_ids)
        self.token_ids: list[int] = []
        self.finish_reason: Optional[str] = None
        self.stop_reason: Union[int, str, None] = None
        self._final_text: Optional[str] = None
        self._checked_len = 0      # prefix of the text already searched for stop strings
        # Incremental detokenization state: _parts are the pieces of the decoded text of
        # token_ids[:_read_offset] (_text_len characters; appending one copies nothing, however long the
        # output), _tail its end (the last piece and the characters before it that a stop string could
        # reach back over); _prefix_text the text of token_ids[_prefix_offset:_read_offset]; _pending the
        # complete characters decoded past _read_offset (the window's text ends in an incomplete
        # character, so it waits).
        self._parts: list[str] = []
        self._text_len = 0
        self._tail = ""
        self._tail_keep = max(map(len, params.stop or ()), default=1) - 1
        self._joined, self._joined_parts = "", 0  # "".join(_parts[:_joined_parts]), kept for streaming
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        self._pending = ""
        self._num_decoded = 0      # ids covered by _parts + _pending

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> Optional[str]:
        """Adds one generated token; returns the finish reason, or None to keep generating."""
        if self._take(token_id):
            self._refresh()
            self._check_stop_strings()
        return self._end_append()

    def _take(self, token_id: int) -> bool:
        """`append`'s first part: the token itself (eos / stop ids). Returns whether its stop strings
        must be checked on the text (`_check_stop_strings`), before `_end_append`."""
        if self.finished:
            raise RuntimeError(f"request already finished ({self.finish_reason}); cannot append")
        token_id = int(token_id)
        self.token_ids.append(token_id)
        p = self.params
        if len(self.token_ids) > p.min_tokens and (token_id in self._eos_ids or token_id in self._stop_ids):
            # The stop token is not part of the visible text unless explicitly asked for.
            ids = self.token_ids if p.include_stop_str_in_output else self.token_ids[:-1]
            reason = None if token_id in self._eos_ids else token_id
            self._finish(FINISH_STOP, reason, self._text_of_first(len(ids)))
            return False
        return bool(p.stop)

    def _check_stop_strings(self) -> None:
        """`append`'s second part (with stop strings), once the text is decoded (`_refresh`)."""
        p = self.params
        # The stable text's end: all that a new occurrence can lie in (see _find_stop_string).
        base = self._text_len - len(self._tail)
        view = self._tail + self._pending if self._pending else self._tail
        if len(self.token_ids) > p.min_tokens:
            hit = self._find_stop_string(view, base)
            if hit is not None:
                start, s = hit
                end = start + len(s) if p.include_stop_str_in_output else start
                self._finish(FINISH_STOP, s, self._stable_text()[:end])
        # Occurrences completed inside the min_tokens window are skipped for good, like vLLM.
        self._checked_len = base + len(view)

    def _end_append(self) -> Optional[str]:
        if not self.finished and len(self.token_ids) >= self.params.max_tokens:
            self._finish(FINISH_LENGTH, None, self._text_of_first(len(self.token_ids)))
        return self.finish_reason

    def finish_stop(self) -> str:
        """Ends the request after the last appended token with reason "stop" (e.g. its structured output
        is complete); returns the reason."""
        self._finish(FINISH_STOP, None, self._text_of_first(len(self.token_ids)))
        return FINISH_STOP

    @property
    def text(self) -> str:
        """Visible output text. Final once finished; before that, text that is safe to stream:
        an incomplete UTF-8 tail and a tail that could still grow into a stop string are held back.
        """
        if self._final_text is not None:
            return self._final_text
        text = self._stable_text()
        if not self.params.include_stop_str_in_output:
            text = text[: len(text) - self._partial_stop_len(text)]
        return text

    # State `append` changes besides token_ids (which it only extends): what `snapshot` keeps.
    _STATE = ("finish_reason", "stop_reason", "_final_text", "_checked_len", "_text_len", "_tail",
              "_joined", "_joined_parts", "_prefix_offset", "_read_offset", "_prefix_text", "_pending", "_num_decoded")

    def snapshot(self) -> tuple:
        """The checker's state, for `restore` to undo later appends; O(1) in the output length."""
        return len(self.token_ids), len(self._parts), _get_state(self)

    def restore(self, snapshot: tuple) -> None:
        """Undoes every `append` since `snapshot` was taken."""
        num_tokens, num_parts, state = snapshot
        del self.token_ids[num_tokens:]
        del self._parts[num_parts:]
        for name, value in zip(self._STATE, state):
            setattr(self, name, value)

    # -- internals ---------------------------------------------------------------------------

    def _finish(self, reason: str, stop_reason: Union[int, str, None], text: str) -> None:
        self.finish_reason, self.stop_reason, self._final_text = reason, stop_reason, text

    def _stable_text(self) -> str:
        """Text of all ids so far without an incomplete trailing character (which the next token may
        complete): the same as decoding every id and stripping trailing U+FFFD."""
        self._refresh()
        text = self._full_text()
        return text + self._pending if self._pending else text

    def _full_text(self) -> str:
        """The text of token_ids[:_read_offset] (joining only the pieces added since the last call)."""
        if self._joined_parts < len(self._parts):
            self._joined += "".join(self._parts[self._joined_parts:])
            self._joined_parts = len(self._parts)
        return self._joined

    def _refresh(self) -> None:
        """Decodes the ids not yet covered by the text state."""
        window = self._window()
        if window is not None:
            prefix = self._take_window(self._decode(window))
            if prefix is not None:
                self._prefix_text = self._decode(prefix)

    # _stable_text in steps, so that `append_batch` can decode many checkers' ids in one call.
    def _window(self) -> Optional[list[int]]:
        """The ids to decode for the stable text (None: it is up to date)."""
        return self.token_ids[self._prefix_offset:] if self._num_decoded < len(self.token_ids) else None

    def _take_window(self, window: str) -> Optional[list[int]]:
        """Takes the decoded `_window()`; returns the ids whose text becomes `_prefix_text` (to decode and
        store there), or None when the window waits for more ids."""
        ids = self.token_ids
        self._num_decoded = len(ids)
        if window.endswith(_REPLACEMENT) or len(window) <= len(self._prefix_text):
            # Wait for more ids; the complete characters already decoded still count.
            self._pending = window.rstrip(_REPLACEMENT)[len(self._prefix_text):]
            return None
        piece = window[len(self._prefix_text):]
        self._parts.append(piece)
        self._text_len += len(piece)
        self._tail = (self._tail[-self._tail_keep:] if self._tail_keep else "") + piece
        self._pending = ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return ids[self._prefix_offset:self._read_offset]

    def _text_of_first(self, n: int) -> str:
        """Full text of token_ids[:n] (an incomplete trailing character included, as decoded)."""
        if n < self._read_offset:  # never happens in append's order; kept exact anyway
            return self._decode(self.token_ids[:n])
        tail = self._decode(self.token_ids[self._prefix_offset:n])
        return self._full_text() + tail[len(self._prefix_text):]

    def _find_stop_string(self, view: str, base: int) -> Optional[tuple[int, str]]:
        """Earliest stop string occurrence (its index in the stable text) that ends in the not-yet-searched
        part of the stable text, of which `view` is the end, from index `base` on."""
        # Start far enough back to catch a stop string straddling the old/new boundary (the longest one
        # reaches back _tail_keep characters).
        checked = self._checked_len
        if base and checked - self._tail_keep < base:
            view, base = self._stable_text(), 0  # the view does not reach back that far: the whole text
        best: Optional[tuple[int, str]] = None
        for s in self.params.stop:
            i = view.find(s, max(0, checked - len(s) + 1) - base)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        return None if best is None else (best[0] + base, best[1])

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


_get_state = operator.attrgetter(*StopChecker._STATE)


def append_batch(checkers: Sequence[StopChecker], token_ids: Sequence[int],
                 decode_batch: Callable[[list[list[int]], bool], list[str]]) -> list[Optional[str]]:
    """`checker.append(token)` for each (checker, token) pair (distinct checkers), with the text the
    stop-string checks need decoded for all of them at once: decode_batch(id lists, skip_special_tokens)
    -> their texts, as each checker's own decode would give (so a step costs two batched decodes, not
    two decodes per row). Returns the finish reasons."""
    texts = [c for c, t in zip(checkers, token_ids) if c._take(t)]
    windows = [(c, w) for c, w in zip(texts, [c._window() for c in texts]) if w is not None]
    prefixes = [(c, ids) for (c, _), text in zip(windows, _decode_pairs(windows, decode_batch))
                for ids in [c._take_window(text)] if ids is not None]
    for (c, _), text in zip(prefixes, _decode_pairs(prefixes, decode_batch)):
        c._prefix_text = text
    for c in texts:
        c._check_stop_strings()
    return [c._end_append() for c in checkers]


def _decode_pairs(pairs: list[tuple[StopChecker, list[int]]], decode_batch: Callable) -> list[str]:
    """Texts of the (checker, ids) pairs' ids: one decode_batch call per skip_special_tokens value."""
    texts: list = [None] * len(pairs)
    groups: dict[bool, list[int]] = {}
    for i, (c, _) in enumerate(pairs):
        groups.setdefault(c.params.skip_special_tokens, []).append(i)
    for skip, rows in groups.items():
        for i, text in zip(rows, decode_batch([pairs[i][1] for i in rows], skip)):
            texts[i] = text
    return texts
