"""Host-side stop / length decisions for one request, with vLLM semantics.

The checker is fed one generated token at a time and decides whether the request finishes:

* "stop": an eos token (unless ignore_eos), a `stop_token_ids` token, or a stop string appearing
  in the generated text. None of these fire until more than `min_tokens` tokens were generated
  (the sampler also bans eos / stop ids during that window, see `SamplingTensors.banned_ids`).
* "length": `max_tokens` tokens were generated. A stop condition met by that same last token wins,
  since it is the more informative reason (vLLM V0 order).

Text is always re-derived by decoding the whole generated id list, so multi-byte UTF-8 characters
split over several tokens and stop strings spanning token boundaries need no special cases.
"""
from __future__ import annotations

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
        self._cache = (-1, "")     # (number of ids decoded, their text)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> Optional[str]:
        """Adds one generated token; returns the finish reason, or None to keep generating."""
        if self.finished:
            raise RuntimeError(f"request already finished ({self.finish_reason}); cannot append")
        token_id = int(token_id)
        self.token_ids.append(token_id)
        p = self.params
        may_stop = len(self.token_ids) > p.min_tokens

        if may_stop and (token_id in self._eos_ids or token_id in self._stop_ids):
            # The stop token is not part of the visible text unless explicitly asked for.
            ids = self.token_ids if p.include_stop_str_in_output else self.token_ids[:-1]
            reason = None if token_id in self._eos_ids else token_id
            self._finish(FINISH_STOP, reason, self._decode_ids(ids))
        elif p.stop:
            text = self._stable_text()
            if may_stop:
                hit = self._find_stop_string(text)
                if hit is not None:
                    start, s = hit
                    end = start + len(s) if p.include_stop_str_in_output else start
                    self._finish(FINISH_STOP, s, text[:end])
            # Occurrences completed inside the min_tokens window are skipped for good, like vLLM.
            self._checked_len = len(text)

        if not self.finished and len(self.token_ids) >= p.max_tokens:
            self._finish(FINISH_LENGTH, None, self._decode_ids(self.token_ids))
        return self.finish_reason

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

    # -- internals ---------------------------------------------------------------------------

    def _finish(self, reason: str, stop_reason: Union[int, str, None], text: str) -> None:
        self.finish_reason, self.stop_reason, self._final_text = reason, stop_reason, text

    def _decode_ids(self, ids: Sequence[int]) -> str:
        # Decoding is the expensive part; the same prefix is often asked for twice in one step.
        # `ids` is always a prefix of token_ids (which only grows), so its length is a valid key.
        n = len(ids)
        if self._cache[0] != n:
            self._cache = (n, self._decode(list(ids)))
        return self._cache[1]

    def _stable_text(self) -> str:
        # A trailing U+FFFD may be half of a multi-byte character that the next token completes.
        return self._decode_ids(self.token_ids).rstrip(_REPLACEMENT)

    def _find_stop_string(self, text: str) -> Optional[tuple[int, str]]:
        """Earliest stop string occurrence that ends in the not-yet-searched part of `text`."""
        best: Optional[tuple[int, str]] = None
        for s in self.params.stop:
            # Start far enough back to catch a stop string straddling the old/new boundary.
            i = text.find(s, max(0, self._checked_len - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
