"""Continuous-batching scheduler (host side, vLLM v1 style).

Every step the scheduler decides, for each sequence, how many new tokens it computes:

  1. running sequences that are decoding (1 token, or 1 + k speculative draft tokens),
  2. running sequences in the middle of a chunked prefill,
  3. waiting requests in FCFS order, while `max_num_seqs` and the token budget allow.

A request's state is just `num_computed_tokens` (tokens whose K/V is in the cache) against its token list
(prompt + generated). A step feeds `tokens[num_computed:num_computed + n]`; when that reaches the last known
token the runner samples the next one. Prefill, chunked prefill, decode and recompute after preemption are
all the same operation with different `n`.

When pages run out, the most recently arrived running request is preempted by recompute: it frees all its
pages and goes back to the front of the waiting queue with prompt + generated tokens, which are recomputed
later (often from the prefix cache), so its final output does not change.

Overlapped steps (the engine's async scheduling): the engine applies a launched step at once with a
placeholder token per sampling sequence (`update_from_output(..., placeholders=True)`), schedules the
next step on top of it (a placeholder is fed as such; the runner reads the real token on the device),
and swaps in the real tokens with `resolve_placeholders` once they are read, one step behind. Until
then a sequence at its length limit is not scheduled, and stops are applied at resolution (the KV
the next step computed for a stopped sequence is freed with it). `discard_placeholders` undoes an
unresolved step.

A step whose results never arrive (the device call or the caller's output processing raised, or Ctrl-C)
is undone with `cancel_step`: its pages are freed and every request is as before `schedule()`. A request
that needs more pages than the whole pool (only possible when pages are held outside the scheduler, since
the engine checks the pool against max_model_len) ends with finish_reason "length" and keeps its tokens.

The step contract with the runner (docs/DESIGN.md, StepInputs) is `SchedulerOutput.to_step_arrays`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import operator
from typing import Iterable, Mapping, Optional, Sequence as SequenceT, Union

import numpy as np

from inference.kv_pool import BlockAllocator


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # never scheduled yet
    RUNNING = "running"        # holds pages; scheduled in the current batch when budget allows
    PREEMPTED = "preempted"    # gave its pages back; waiting to be recomputed
    FINISHED = "finished"      # done (finish_reason says why: "stop", "length", "abort", "error")


class Sequence:
    """One request's token history and cache state. The scheduler owns and mutates it."""

    def __init__(self, request_id: str, prompt_token_ids: SequenceT[int], arrival: int,
                 max_tokens: Optional[int] = None):
        self.request_id = request_id
        self.prompt_token_ids: list[int] = [int(t) for t in prompt_token_ids]
        self.output_token_ids: list[int] = []
        self.arrival = arrival                  # FCFS order (monotonic counter)
        self.max_tokens = max_tokens            # optional cap on generated tokens (finish_reason "length")
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0            # tokens whose K/V is in the cache
        self.block_table: list[int] = []        # page ids, in position order
        self.num_cached_tokens = 0              # prefix-cache hit at first scheduling
        self.num_preemptions = 0
        self.draft_token_ids: list[int] = []    # speculative proposals for the next step
        self.error: Optional[str] = None
        self.finish_reason: Optional[str] = None
        self._tokens: list[int] = list(self.prompt_token_ids)  # prompt + output, kept in sync
        self._page_hashes: list[bytes] = []     # chain hashes of full pages of _tokens (lazy)
        self._num_registered_pages = 0          # leading pages already offered to the prefix cache
        # block_table's pages in a numpy array (valid up to len(block_table)), which to_step_arrays
        # copies whole: the step's block tables cost no per-page Python however long the sequence.
        self._block_array = np.zeros(0, np.int32)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + generated tokens (do not mutate)."""
        return self._tokens

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_decoding(self) -> bool:
        """Only the last (just sampled) token is missing from the cache."""
        return self.num_computed_tokens >= self.num_tokens - 1

    def _append(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.output_token_ids.append(int(t))
            self._tokens.append(int(t))

    def _add_pages(self, pages: list[int]) -> None:
        """Appends pages to block_table and its numpy mirror."""
        start, end = len(self.block_table), len(self.block_table) + len(pages)
        if end > len(self._block_array):
            grown = np.zeros(max(end, 2 * len(self._block_array), 8), np.int32)
            grown[:start] = self._block_array[:start]
            self._block_array = grown
        self._block_array[start:end] = pages
        self.block_table.extend(pages)

    def _trim(self, num_tokens: int) -> None:
        """Drops the last num_tokens output tokens (an overlapped step's unresolved placeholder)."""
        if num_tokens:
            del self.output_token_ids[-num_tokens:]
            del self._tokens[-num_tokens:]

    def page_hashes(self, allocator: BlockAllocator, num_pages: int) -> list[bytes]:
        """Chain hashes of the first `num_pages` full pages of the token history (cached across steps)."""
        if num_pages * allocator.page_size > self.num_tokens:
            raise ValueError(f"{num_pages} full pages need {num_pages * allocator.page_size} tokens, "
                             f"have {self.num_tokens}")
        if len(self._page_hashes) < num_pages:
            self._page_hashes += allocator.page_hashes(
                self._tokens, num_pages, first=len(self._page_hashes),
                parent_hash=self._page_hashes[-1] if self._page_hashes else None)
        return self._page_hashes[:num_pages]

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, pages={len(self.block_table)})")


def tokens_left(seq: Sequence, max_model_len: int) -> int:
    """Tokens the sequence may still emit under its max_tokens and the context window, at least 1."""
    room = max_model_len - seq.num_tokens
    if seq.max_tokens is not None:
        room = min(room, seq.max_tokens - len(seq.output_token_ids))
    return max(1, room)


@dataclasses.dataclass
class ScheduledSequence:
    """What one sequence computes this step."""
    request_id: str
    token_ids: list[int]          # tokens fed this step (prompt/output tokens, then draft tokens)
    block_array: np.ndarray       # the sequence's page array; its first num_pages entries (until the
    num_pages: int                # step's results are applied) are the pages covering 0..kv_len-1
    kv_len: int                   # KV length after this step's tokens are written
    num_computed_tokens: int      # KV length before this step (== positions[0])
    num_draft_tokens: int         # trailing speculative tokens in token_ids
    samples: bool                 # reaches the end of the known tokens: the runner samples from it
    page_size: int

    @property
    def block_table(self) -> list[int]:
        """The sequence's pages covering 0..kv_len-1."""
        return self.block_array[:self.num_pages].tolist()

    @property
    def num_new_tokens(self) -> int:
        """q_len of this sequence in the step."""
        return len(self.token_ids)

    @property
    def positions(self) -> list[int]:
        """Absolute positions: num_computed_tokens .. kv_len - 1."""
        return list(range(self.num_computed_tokens, self.kv_len))

    @property
    def slot_mapping(self) -> list[int]:
        """page * page_size + offset for each token."""
        ps, table = self.page_size, self.block_table
        return [table[p // ps] * ps + p % ps for p in self.positions]

    @property
    def num_logits_rows(self) -> int:
        """Rows of logits_indices owned by this sequence: last token + each draft token, or 0 (mid-prefill)."""
        return 1 + self.num_draft_tokens if self.samples else 0


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    num_batched_tokens: int
    page_size: int
    preempted_request_ids: list[str] = dataclasses.field(default_factory=list)
    failed: list[Sequence] = dataclasses.field(default_factory=list)   # failed this step; .error says why
    # Finished this step with reason "length" because their next tokens cannot fit in the whole KV pool;
    # they keep what they generated, and .error says why.
    out_of_pool: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sampling_layout(self) -> list[tuple[str, int]]:
        """(request_id, num_rows) in logits_indices order: which logits rows belong to which request."""
        return [(s.request_id, s.num_logits_rows) for s in self.scheduled if s.samples]

    def to_step_arrays(self, pad_tokens_to: Optional[int] = None, pad_seqs_to: Optional[int] = None,
                       pad_pages_to: Optional[int] = None, pad_logits_to: Optional[int] = None
                       ) -> dict[str, np.ndarray]:
        """numpy arrays of DESIGN.md's StepInputs, padded to the given bucket sizes (None: exact size).

        Padding: tokens 0 at position 0 written to slot -1 (dropped); padded sequences have q_len 0
        (cu_q_lens repeats its total), kv_len 0 and block table rows of page 0; padded logits_indices
        repeat row 0 and their logits are to be ignored.
        """
        seqs = self.scheduled
        num_tokens, num_seqs = self.num_batched_tokens, len(seqs)
        max_pages = max((s.num_pages for s in seqs), default=0)
        num_logits = sum(s.num_logits_rows for s in seqs)
        T = _padded("pad_tokens_to", num_tokens, pad_tokens_to)
        S = _padded("pad_seqs_to", num_seqs, pad_seqs_to)
        P = _padded("pad_pages_to", max(max_pages, 1), pad_pages_to)
        N = _padded("pad_logits_to", num_logits, pad_logits_to)

        # Whole-batch numpy ops: this runs every step. Per sequence only its token ids and a copy of its
        # numpy page array; positions and slots follow from the block tables.
        q_lens = np.fromiter((len(s.token_ids) for s in seqs), np.int32, num_seqs)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int32, num_seqs)
        tokens = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slot_mapping = np.full(T, -1, np.int32)
        cu_q_lens = np.zeros(S + 1, np.int32)
        np.cumsum(q_lens, out=cu_q_lens[1:num_seqs + 1])
        cu_q_lens[num_seqs + 1:] = num_tokens
        kv_lens = np.zeros(S, np.int32)
        kv_lens[:num_seqs] = starts + q_lens
        block_tables = np.zeros((S, P), np.int32)
        for i, s in enumerate(seqs):
            block_tables[i, :s.num_pages] = s.block_array[:s.num_pages]
        if num_seqs:
            tokens[:num_tokens] = list(itertools.chain.from_iterable(s.token_ids for s in seqs))
            seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
            pos = starts[seq_of_token] + (np.arange(num_tokens, dtype=np.int32) - cu_q_lens[seq_of_token])
            positions[:num_tokens] = pos
            page_size = self.page_size
            slot_mapping[:num_tokens] = block_tables[seq_of_token, pos // page_size] * page_size + pos % page_size
        # Sampling rows: the last token, plus one row per draft token to verify it.
        logits_indices = np.zeros(N, np.int32)
        logits_indices[:num_logits] = [cu + q - s.num_logits_rows + j
                                       for s, cu, q in zip(seqs, cu_q_lens[:num_seqs].tolist(), q_lens.tolist())
                                       for j in range(s.num_logits_rows)]
        return {
            "tokens": tokens,
            "positions": positions,
            "slot_mapping": slot_mapping,
            "cu_q_lens": cu_q_lens,
            "kv_lens": kv_lens,
            "block_tables": block_tables,
            "num_seqs": np.array([num_seqs], np.int32),
            "logits_indices": logits_indices,
        }


def _padded(name: str, size: int, pad_to: Optional[int]) -> int:
    if pad_to is None:
        return size
    if pad_to < size:
        raise ValueError(f"{name}={pad_to} is smaller than the step's size {size}")
    return int(pad_to)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True):
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0 or max_model_len <= 0:
            raise ValueError(f"max_num_seqs={max_num_seqs}, max_num_batched_tokens={max_num_batched_tokens} and "
                             f"max_model_len={max_model_len} must all be > 0")
        if max_num_batched_tokens < max_num_seqs:
            # Otherwise running decodes could be starved of budget forever.
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= "
                             f"max_num_seqs={max_num_seqs}")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            # Without chunking a whole prompt (or a recompute) must fit in one step.
            raise ValueError(f"without chunked prefill max_num_batched_tokens={max_num_batched_tokens} must be >= "
                             f"max_model_len={max_model_len}")
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill

        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._requests: dict[str, Sequence] = {}       # unfinished requests by id
        self._next_arrival = 0
        self._in_flight: list[tuple[Sequence, ScheduledSequence]] = []  # last schedule() not yet updated
        self.num_preemptions = 0
        self.num_failed = 0
        self.num_out_of_pool = 0  # ended with finish_reason "length" by the KV pool's size
        self.num_steps = 0

    # ----- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: SequenceT[int],
                    max_tokens: Optional[int] = None) -> Sequence:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already exists")
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r} has an empty prompt")
        if len(prompt_token_ids) > self.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt length {len(prompt_token_ids)} exceeds "
                             f"max_model_len={self.max_model_len}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_tokens={max_tokens} must be >= 1")
        seq = Sequence(request_id, prompt_token_ids, self._next_arrival, max_tokens)
        self._next_arrival += 1
        self._requests[request_id] = seq
        self.waiting.append(seq)
        return seq

    def get_request(self, request_id: str) -> Sequence:
        return self._requests[request_id]

    def find_request(self, request_id: str) -> Optional[Sequence]:
        """The waiting or running request, or None (finished, aborted or unknown)."""
        return self._requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def step_in_flight(self) -> bool:
        """schedule() returned a step that update_from_output() has not taken yet."""
        return bool(self._in_flight)

    def has_request(self, request_id: str) -> bool:
        """Whether `request_id` is waiting or running (not finished, aborted or unknown)."""
        return request_id in self._requests

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def abort(self, request_id: str) -> bool:
        """Drop a request (waiting or running) and free its pages. False if it is unknown or finished."""
        return self.finish_request(request_id, "abort") is not None

    def finish_request(self, request_id: str, reason: str = "stop") -> Optional[Sequence]:
        seq = self._requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, reason)
        return seq

    def set_draft_tokens(self, request_id: str, draft_token_ids: SequenceT[int]) -> None:
        """Attach speculative proposals: the next step that reaches the end of the sequence feeds them after
        its last token (budget and max_model_len permitting) and returns logits rows for all of them."""
        self._requests[request_id].draft_token_ids = [int(t) for t in draft_token_ids]

    # ----- scheduling --------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self._in_flight:
            raise RuntimeError("schedule() called again before update_from_output() for the previous step")
        budget = self.max_num_batched_tokens
        plan: dict[str, tuple[Sequence, int, int]] = {}   # request_id -> (seq, new tokens, draft tokens)
        preempted: list[str] = []
        failed: list[Sequence] = []
        out_of_pool: list[Sequence] = []

        # 1+2) Running sequences: decodes first (latency), then continuing chunked prefills, FCFS in each.
        by_arrival = sorted(self.running, key=operator.attrgetter("arrival"))
        decodes, prefills = [], []
        for s in by_arrival:  # (Sequence.is_decoding, inlined: this runs for every sequence every step)
            (decodes if s.num_computed_tokens >= len(s._tokens) - 1 else prefills).append(s)
        running, ps, max_len = SequenceStatus.RUNNING, self.page_size, self.max_model_len
        for idx, seq in enumerate(decodes + prefills):
            if budget <= 0:
                break
            if seq.status is not running:
                continue  # preempted earlier in this loop
            num_tokens = len(seq._tokens)
            if num_tokens >= max_len or (seq.max_tokens is not None and len(seq.output_token_ids) >= seq.max_tokens):
                continue  # (_length_reason) its last token is a placeholder: it finishes when that is resolved
            if not seq.draft_token_ids and seq.num_computed_tokens == num_tokens - 1:
                n, k = 1, 0  # a plain decode (what _num_new_tokens gives it)
            else:
                # Leave one token for each decode still to come, so drafts cannot starve other decodes.
                reserve = max(0, len(decodes) - idx - 1)
                n, k = self._num_new_tokens(seq, seq.num_computed_tokens, budget, reserve)
                if n == 0:
                    continue
            # (_pages_needed: preempting others does not change it)
            needed = max(0, -(-(seq.num_computed_tokens + n) // ps) - len(seq.block_table))
            while needed and needed > self.allocator.num_free:
                victim = max(self.running, key=lambda s: s.arrival)
                if victim is seq:
                    if len(self.running) == 1:
                        # Alone and still too big: it can never run. End it (keeping what it generated)
                        # instead of looping.
                        self._out_of_pool(seq, seq.num_computed_tokens + n, failed, out_of_pool)
                    else:
                        self._preempt(seq)
                        preempted.append(seq.request_id)
                    break
                if victim.request_id in plan:        # already scheduled this step: give its budget back
                    budget += plan.pop(victim.request_id)[1]
                self._preempt(victim)
                preempted.append(victim.request_id)
            if seq.status is not running:
                continue
            if needed:
                seq._add_pages(self.allocator.allocate_many(needed))
            plan[seq.request_id] = (seq, n, k)
            budget -= n

        # 3) Waiting requests, strictly FCFS: if the head does not fit, later ones wait too.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if _cdiv(seq.num_tokens, self.page_size) > self.allocator.num_pages:
                self.waiting.popleft()
                self._out_of_pool(seq, seq.num_tokens, failed, out_of_pool)
                continue
            cached = self._lookup_cached_pages(seq)
            num_cached = len(cached) * self.page_size
            n, k = self._num_new_tokens(seq, num_cached, budget, reserve=0)
            if n == 0:
                break  # whole prompt needed without chunking: wait for a step with more budget
            need = _cdiv(num_cached + n, self.page_size) - len(cached) + self.allocator.num_revived(cached)
            if need > self.allocator.num_free:
                break  # never preempt running work for a new request
            self.waiting.popleft()
            self.allocator.acquire_cached(cached, num_query_tokens=seq.num_tokens)
            seq.block_table = []
            seq._add_pages(list(cached))
            seq.num_computed_tokens = num_cached
            seq._num_registered_pages = len(cached)
            if seq.status is SequenceStatus.WAITING:
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._allocate_pages(seq, n)
            plan[seq.request_id] = (seq, n, k)
            budget -= n

        scheduled = []
        in_flight = self._in_flight
        num_batched = 0
        for seq, n, k in plan.values():
            s = self._make_scheduled(seq, n, k)
            if s.samples and seq.draft_token_ids:
                seq.draft_token_ids = []  # consumed (or stale once this step's token is appended)
            scheduled.append(s)
            in_flight.append((seq, s))
            num_batched += len(s.token_ids)
        self.num_steps += 1
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=num_batched,
                               page_size=self.page_size, preempted_request_ids=preempted, failed=failed,
                               out_of_pool=out_of_pool)

    def _num_new_tokens(self, seq: Sequence, num_computed: int, budget: int, reserve: int) -> tuple[int, int]:
        """(tokens to compute incl. drafts, draft tokens) for `seq` with `budget` tokens left this step."""
        remaining = seq.num_tokens - num_computed
        if remaining > budget:
            return (budget, 0) if self.enable_chunked_prefill else (0, 0)
        # The step reaches the last token: append drafts if budget and max_model_len leave room.
        k = min(len(seq.draft_token_ids), budget - remaining - reserve, self.max_model_len - seq.num_tokens)
        k = max(k, 0)
        return remaining + k, k

    def _pages_needed(self, seq: Sequence, n: int) -> int:
        return max(0, _cdiv(seq.num_computed_tokens + n, self.page_size) - len(seq.block_table))

    def _allocate_pages(self, seq: Sequence, n: int) -> None:
        needed = self._pages_needed(seq, n)
        if needed:
            seq._add_pages(self.allocator.allocate_many(needed))

    def _lookup_cached_pages(self, seq: Sequence) -> list[int]:
        if not self.allocator.enable_prefix_caching:
            return []
        # Never the page holding the last token: it must be computed to produce logits.
        num_matchable = (seq.num_tokens - 1) // self.page_size
        return self.allocator.lookup_prefix(seq.page_hashes(self.allocator, num_matchable), seq.all_token_ids)

    def _make_scheduled(self, seq: Sequence, n: int, k: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        tokens = seq.all_token_ids[start:start + n - k]
        return ScheduledSequence(
            request_id=seq.request_id,
            token_ids=tokens + seq.draft_token_ids[:k] if k else tokens,
            block_array=seq._block_array,
            num_pages=len(seq.block_table),
            kv_len=start + n,
            num_computed_tokens=start,
            num_draft_tokens=k,
            samples=start + n - k == seq.num_tokens,
            page_size=self.page_size,
        )

    def _out_of_pool(self, seq: Sequence, num_tokens: int, failed: list, out_of_pool: list) -> None:
        """`seq` needs more pages than the whole pool holds: a request with generated tokens ends with
        finish_reason "length" and keeps them; one that generated nothing fails."""
        message = self._too_big_message(seq, num_tokens)
        if seq.output_token_ids:
            self._finish(seq, "length")
            seq.error = message
            self.num_out_of_pool += 1
            out_of_pool.append(seq)
        else:
            self._fail(seq, message)
            failed.append(seq)

    def _too_big_message(self, seq: Sequence, num_tokens: int) -> str:
        pages = _cdiv(num_tokens, self.page_size)
        return (f"request {seq.request_id!r} of length {seq.num_tokens} tokens (prompt {seq.num_prompt_tokens}) "
                f"needs {pages} KV pages for {num_tokens} tokens, but the KV pool has only "
                f"{self.allocator.num_pages} pages of {self.page_size} tokens "
                f"({self.allocator.num_pages * self.page_size} tokens); increase the KV cache memory or "
                f"lower max_model_len")

    # ----- state transitions -------------------------------------------------------------------------------
    def _release_pages(self, seq: Sequence) -> None:
        # Tail first: the LRU then evicts a sequence's last pages before its shareable prefix.
        self.allocator.free_all(reversed(seq.block_table))
        seq.block_table = []
        seq._num_registered_pages = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_pages(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_pages(seq)
        self._requests.pop(seq.request_id, None)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _fail(self, seq: Sequence, message: str) -> None:
        self._finish(seq, "error")
        seq.error = message
        self.num_failed += 1

    def _register_full_pages(self, seq: Sequence) -> None:
        """Offer pages that became full (all their KV computed) to the prefix cache."""
        if not self.allocator.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.page_size
        if num_full <= seq._num_registered_pages:
            return
        hashes = seq.page_hashes(self.allocator, num_full)
        ps = self.page_size
        for i in range(seq._num_registered_pages, num_full):
            parent = hashes[i - 1] if i else self.allocator.root_hash
            self.allocator.register_full_page(seq.block_table[i], hashes[i], parent, seq.all_token_ids[i * ps:(i + 1) * ps])
        seq._num_registered_pages = num_full

    def _truncate_kv(self, seq: Sequence, num_kv: int) -> None:
        """Forget KV past `num_kv` tokens and free the pages no longer needed."""
        ps = self.page_size
        num_kv = min(num_kv, seq.num_computed_tokens)
        if num_kv % ps:
            page = seq.block_table[num_kv // ps]
            if self.allocator.is_cached(page) or self.allocator.ref_count(page) > 1:
                # The next write would land in a shared/cached page: recompute that page into a fresh one.
                num_kv -= num_kv % ps
        keep = _cdiv(num_kv, ps)
        self.allocator.free_all(reversed(seq.block_table[keep:]))
        del seq.block_table[keep:]
        seq.num_computed_tokens = num_kv
        seq._num_registered_pages = min(seq._num_registered_pages, num_kv // ps)

    # ----- results -----------------------------------------------------------------------------------------
    def update_from_output(self, sampled_token_ids: Mapping[str, Union[int, SequenceT[int]]],
                           finished: Union[Iterable[str], Mapping[str, str]] = (),
                           placeholders: bool = False) -> list[Sequence]:
        """Apply one step's results; returns the sequences that finished in this call.

        sampled_token_ids: for every scheduled sequence with `samples`, the new token (int) or tokens. For a
            sequence that had k draft tokens, pass the accepted drafts followed by the one token sampled after
            them (1..k+1 tokens); the KV of rejected drafts is discarded here and unused pages are freed.
        finished: request ids the caller ends now (EOS, stop string, ...) with finish_reason "stop", or a
            {request_id: reason} mapping. Requests also finish on their own max_tokens or max_model_len
            (reason "length"). Finished requests free their pages (full ones stay in the prefix cache).
        placeholders: the tokens are negative stand-ins (one per sequence) for tokens not read yet; nothing
            finishes now, `resolve_placeholders` applies the real tokens and the stops.
        """
        reasons = dict(finished) if isinstance(finished, Mapping) else {rid: "stop" for rid in finished}
        # Validate everything first so a bad call leaves the scheduler state untouched.
        new_tokens: dict[str, list[int]] = {}
        for seq, s in self._in_flight:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step was running
            tokens = sampled_token_ids.get(seq.request_id)
            if s.samples:
                if tokens is None:
                    raise ValueError(f"no sampled token for request {seq.request_id!r}, which sampled this step")
                if type(tokens) is list and len(tokens) == 1 and type(tokens[0]) is int and not placeholders:
                    new_tokens[seq.request_id] = tokens  # the engine's usual form: one token, valid as is
                    continue
                if isinstance(tokens, list):  # the engine's form; np.ndim would convert it to an array
                    tokens = [int(t) for t in tokens]
                elif isinstance(tokens, int):  # a placeholder
                    tokens = [tokens]
                else:
                    tokens = [int(tokens)] if np.ndim(tokens) == 0 else [int(t) for t in tokens]
                if placeholders and (len(tokens) != 1 or tokens[0] >= 0):
                    raise ValueError(f"request {seq.request_id!r}: placeholder {tokens} must be one negative id")
                if not 1 <= len(tokens) <= 1 + s.num_draft_tokens:
                    raise ValueError(f"request {seq.request_id!r}: got {len(tokens)} tokens, expected 1.."
                                     f"{1 + s.num_draft_tokens} (accepted drafts + 1)")
                new_tokens[seq.request_id] = tokens
            elif tokens is not None and np.size(tokens):
                raise ValueError(f"request {seq.request_id!r} did not reach the end of its prompt this step "
                                 f"but got sampled tokens {tokens}")

        in_flight, self._in_flight = self._in_flight, []
        done: list[Sequence] = []
        running, max_len = SequenceStatus.RUNNING, self.max_model_len
        for seq, s in in_flight:
            if seq.status is not running:
                continue
            seq.num_computed_tokens += len(s.token_ids)
            if s.samples:
                tokens = new_tokens[seq.request_id]
                if len(tokens) == 1:  # the usual case: room for one token was checked when scheduling
                    seq.output_token_ids.append(tokens[0])
                    seq._tokens.append(tokens[0])
                else:
                    seq._append(tokens[:tokens_left(seq, self.max_model_len)])
            # Rejected drafts (or tokens cut by max_tokens) leave KV past the last token: drop it. (Skipped
            # when there is nothing to drop: then the page of the next write is this sequence's own
            # partial page, never a cached or shared one, so _truncate_kv would change nothing.)
            if seq.num_computed_tokens > len(seq._tokens) - 1 or len(seq.block_table) * self.page_size > \
                    seq.num_computed_tokens + self.page_size - 1:
                self._truncate_kv(seq, seq.num_tokens - 1)
            if seq.num_computed_tokens // self.page_size > seq._num_registered_pages:
                self._register_full_pages(seq)
            if placeholders:
                continue
            reason = reasons.pop(seq.request_id, None) if reasons else None
            if not reason and (len(seq._tokens) >= max_len or (seq.max_tokens is not None and
                                                                len(seq.output_token_ids) >= seq.max_tokens)):
                reason = "length"  # (_length_reason)
            if reason:
                self._finish(seq, reason)
                done.append(seq)
        for rid, reason in reasons.items():  # caller-finished requests not in this step
            seq = self.finish_request(rid, reason)
            if seq is not None:
                done.append(seq)
        return done

    def resolve_placeholders(self, sampled_token_ids: Mapping[str, int],
                             finished: Mapping[str, str]) -> list[Sequence]:
        """Swaps each placeholder (the last token of `sampled_token_ids`' requests) for the real token and
        finishes the requests in `finished` and those at their length limit; returns the finished ones.
        Requests that were aborted meanwhile are skipped. A step may be in flight (scheduled on top)."""
        seqs = [(self._requests[rid], int(t)) for rid, t in sampled_token_ids.items() if rid in self._requests]
        for seq, _ in seqs:  # validate first: a bad call changes nothing
            if not seq.output_token_ids or seq.output_token_ids[-1] >= 0:
                raise ValueError(f"request {seq.request_id!r} has no placeholder token to resolve")
        done = []
        for seq, token in seqs:
            seq.output_token_ids[-1] = seq._tokens[-1] = token
            reason = finished.get(seq.request_id) or self._length_reason(seq)
            if reason:
                self._finish(seq, reason)
                done.append(seq)
        return done

    def discard_placeholders(self) -> int:
        """Undoes an overlapped step whose tokens were never resolved (its results were lost): drops each
        placeholder token and the KV computed for the token before it, which the step is then redone
        from. Returns how many were dropped. Nothing may be in flight (see `cancel_step`)."""
        if self._in_flight:
            raise RuntimeError("discard_placeholders() with a step in flight; call cancel_step first")
        dropped = 0
        for seq in self._requests.values():
            if seq.output_token_ids and seq.output_token_ids[-1] < 0:
                seq._trim(1)
                del seq._page_hashes[seq.num_tokens // self.page_size:]
                if seq.status is SequenceStatus.RUNNING:
                    self._truncate_kv(seq, seq.num_tokens - 1)
                dropped += 1
        return dropped

    def _length_reason(self, seq: Sequence) -> Optional[str]:
        if seq.max_tokens is not None and len(seq.output_token_ids) >= seq.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def cancel_step(self) -> None:
        """Forgets the step `schedule()` returned, as if it had not been scheduled: for when its device
        work or its output processing failed or was interrupted (even half way through `schedule()`
        itself). Pages allocated for it are freed, so KV a half-run step wrote is never read; requests
        keep the tokens they had, and draft / lookahead tokens are dropped (proposed again next step)."""
        self._in_flight = []
        running = set(map(id, self.running))
        waiting = set(map(id, self.waiting))
        lost = [s for s in self._requests.values() if id(s) not in running and id(s) not in waiting]
        for seq in sorted(lost, key=lambda s: s.arrival, reverse=True):  # caught between the two queues
            self._release_pages(seq)
            seq.num_computed_tokens = 0
            if seq.status is not SequenceStatus.WAITING:
                seq.status = SequenceStatus.PREEMPTED
            self.waiting.appendleft(seq)
        for seq in self.running:
            # Outside a step a running sequence holds exactly the pages of its computed tokens.
            self._truncate_kv(seq, seq.num_computed_tokens)
        for seq in self._requests.values():
            seq.draft_token_ids = []

    def reset_pool(self) -> None:
        """The KV pool's contents were lost (see Engine.step): an empty allocator of the same size takes
        the old one's place and every request is recomputed from its tokens (running ones are preempted)."""
        old = self.allocator
        self.allocator = BlockAllocator(old.num_pages, old.page_size, old.enable_prefix_caching, old.hash_fn)
        self.allocator.stats = old.stats
        self._in_flight = []
        for seq in sorted(self.running, key=lambda s: s.arrival, reverse=True):
            seq.status = SequenceStatus.PREEMPTED
            seq.num_preemptions += 1
            self.num_preemptions += 1
            self.waiting.appendleft(seq)
        self.running = []
        for seq in self._requests.values():
            seq.block_table, seq.num_computed_tokens = [], 0
            seq._page_hashes, seq._num_registered_pages = [], 0  # chained from the old allocator's root

    def stats(self) -> dict:
        a = self.allocator.stats
        return {
            "num_steps": self.num_steps,
            "num_preemptions": self.num_preemptions,
            "num_failed": self.num_failed,
            "num_out_of_pool": self.num_out_of_pool,
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "pages_free": self.allocator.num_free,
            "pages_allocated": a.pages_allocated,
            "prefix_hits": a.prefix_hits,
            "prefix_tokens_saved": a.prefix_tokens_saved,
            "prefix_hit_rate": a.prefix_hit_rate,
            "evictions": a.evictions,
        }
