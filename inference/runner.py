"""The model runner: device params, KV pool and penalty state, and the jitted step programs.

`ModelRunner.execute` pads a scheduled ragged batch to one of a fixed set of shapes (token buckets,
with the sequence count tied to them, times a block-table width ladder ending at max_model_len) and
runs one jitted program: the model forward plus sampling (or speculative verification) on device,
with the KV pool and penalty state donated. `warmup` compiles the whole set up front. A plain step can
be launched (`dispatch`) and read later (`fetch`): the engine's overlapped dispatch launches the next
step first, whose placeholder tokens read this one's samples on the device.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.sampler import SamplingTensors, sample
from inference.scheduler import SchedulerOutput
from inference.speculative import verify
from model.config import LlamaConfig
from model.llama import StepInputs, forward, init_cache
from pallas_kernels.backend import next_power_of_two

if TYPE_CHECKING:
    from inference.engine import EngineConfig
    from inference.spec_runner import DraftRunner


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The padded size of n in a power-of-two shape bucket (at least `minimum`)."""
    return max(minimum, next_power_of_two(n))


# Block-table widths are a ladder ending at max_model_len / page_size, a factor of this apart: the
# XLA attention path gathers every page of the table, so a single full width would make short
# sequences pay for the longest possible one; a coarse ladder keeps the compiled set small.
_PAGE_BUCKET_RATIO = 4


class PenaltyState(NamedTuple):
    """Per-slot penalty inputs kept on the device between steps (R = max_num_seqs slots).

    A request using penalties holds a slot while it runs: its row is written once at admission
    (output tokens so far, prompt tokens) and the step adds the tokens it samples on device.
    """

    counts: jax.Array       # [R, V] i32 occurrences of each token in the slot's output
    prompt_mask: jax.Array  # [R, V] bool tokens of the slot's prompt


def _gather_penalty_rows(state: PenaltyState, slots: jax.Array):
    """[S, V] counts and prompt mask of the step's rows; rows with slot R (none) read zeros."""
    return (state.counts.at[slots].get(mode="fill", fill_value=0),
            state.prompt_mask.at[slots].get(mode="fill", fill_value=False))


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_penalty_row(state: PenaltyState, slot, counts_row, mask_row) -> PenaltyState:
    return PenaltyState(state.counts.at[slot].set(counts_row), state.prompt_mask.at[slot].set(mask_row))


@functools.lru_cache(maxsize=None)
def _sample_step_fn(cfg: LlamaConfig, attn_impl: str, num_logprobs: Optional[int]):
    """Jitted forward + sample with the cache (and penalty state) donated. Module-level so that engines
    with the same config share compiled programs (params are arguments, never closed over).

    The step's host inputs (StepInputs, penalty slots, SamplingTensors) arrive as one int32 buffer
    (`_pack_host_inputs`; `layout` is static) and the results leave as one [S, 2 + 2k] int32 buffer
    (`_pack_sampler_output`): one host-to-device and one device-to-host copy per step."""

    def step(params, cache, penalties: Optional[PenaltyState], packed, fed_back, layout):
        fields, tensors, slots = _unpack_device_inputs(packed, layout)
        inputs = StepInputs(**fields)
        inputs = inputs._replace(tokens=_feed_back(inputs.tokens, fed_back))
        # One logits row per sequence, the real ones first (_first_logits_rows).
        logits, cache = forward(params, cache, inputs, cfg, attn_impl=attn_impl, logits_rows=inputs.num_seqs[0])
        if penalties is None:
            out = sample(logits, tensors, num_logprobs=num_logprobs)
        else:
            out = sample(logits, tensors, *_gather_penalty_rows(penalties, slots), num_logprobs=num_logprobs)
            penalties = PenaltyState(penalties.counts.at[slots, out.tokens].add(1, mode="drop"), penalties.prompt_mask)
        # The sampled tokens, padded to a fixed width, for the next step's placeholders.
        fed_back = jnp.zeros_like(fed_back).at[:out.tokens.shape[0]].set(out.tokens)
        return _pack_sampler_output(out), cache, penalties, fed_back

    return jax.jit(step, donate_argnums=(1, 2), static_argnames=("layout",))


def _pack_host_inputs(arrays: dict[str, np.ndarray], tensors: SamplingTensors,
                      slots: Optional[np.ndarray]) -> tuple[np.ndarray, tuple]:
    """A step's host inputs (its own arrays, host SamplingTensors, penalty slots or None) as one flat
    int32 buffer of 4-byte (int32, uint32, float32) and bool arrays, and its static layout ((name, shape,
    dtype) per field) for `_unpack_device_inputs`."""
    fields = dict(arrays)
    if slots is not None:
        fields["slots"] = slots
    fields.update(("sampling." + name, value) for name, value in zip(SamplingTensors._fields, tensors)
                  if value is not None)
    layout = tuple((name, a.shape, a.dtype.str) for name, a in fields.items())
    flat = [a.reshape(-1).view(np.int32) if a.dtype.itemsize == 4 else a.reshape(-1).astype(np.int32)
            for a in fields.values()]
    return np.concatenate(flat), layout


def _unpack_device_inputs(packed: jax.Array, layout: tuple):
    """Inside a step program: (the step's own arrays by name, SamplingTensors, penalty slots or None)."""
    fields, offset = {}, 0
    for name, shape, dtype in layout:
        size = int(np.prod(shape, dtype=np.int64))
        x = packed[offset:offset + size].reshape(shape)
        offset += size
        dtype = np.dtype(dtype)
        if dtype == np.bool_:
            x = x != 0
        elif dtype != np.int32:
            x = jax.lax.bitcast_convert_type(x, dtype)
        fields[name] = x
    tensors = SamplingTensors(*(fields.pop("sampling." + name, None) for name in SamplingTensors._fields))
    return fields, tensors, fields.pop("slots", None)


def _pack_sampler_output(out) -> jax.Array:
    """[S, 2 + 2k] int32: token, chosen logprob (float32 bits), k top ids, k top logprobs (bits)."""
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    return jnp.concatenate([out.tokens[:, None], bits(out.chosen_logprob)[:, None], out.top_ids,
                            bits(out.top_logprobs)], axis=1)


def _feed_back(tokens: jax.Array, fed_back: jax.Array) -> jax.Array:
    """Overlapped steps: a negative input token is a placeholder for the token the previous step
    sampled in row -token - 1, still on the device (fed_back [R] i32, that step's tokens)."""
    return jnp.where(tokens < 0, fed_back[jnp.maximum(-tokens - 1, 0)], tokens)


@functools.lru_cache(maxsize=None)
def _verify_step_fn(cfg: LlamaConfig, attn_impl: str, num_logprobs: Optional[int]):
    """Jitted forward + speculative verify: logits_indices come grouped as [S * (k+1)] (row-major)."""

    def step(params, cache, penalties: Optional[PenaltyState], inputs: StepInputs, tensors: SamplingTensors,
             slots, draft_tokens, num_draft, ban_len, draft_probs, probs_rows):
        logits, cache = forward(params, cache, inputs, cfg, attn_impl=attn_impl)
        S, K = draft_tokens.shape
        counts, mask = (None, None) if penalties is None else _gather_penalty_rows(penalties, slots)
        q = None if draft_probs is None else draft_probs[probs_rows]  # the draft's rows in this step's order
        out = verify(logits.reshape(S, K + 1, logits.shape[-1]), draft_tokens, q, num_draft, tensors,
                     token_counts=counts, prompt_mask=mask, ban_len=ban_len, num_logprobs=num_logprobs)
        if penalties is not None:
            emitted = (jnp.arange(K + 1)[None, :] < out.num_output[:, None]).astype(jnp.int32)
            penalties = PenaltyState(penalties.counts.at[slots[:, None], out.output_tokens].add(emitted, mode="drop"),
                                     penalties.prompt_mask)
        return out, cache, penalties

    return jax.jit(step, donate_argnums=(1, 2))


class DecodeBatch(NamedTuple):
    """Rows of a multi-step decode (padded to S): each feeds its last known token, then its own samples."""

    first_tokens: np.ndarray  # [S] i32
    positions: np.ndarray     # [S] i32 position of the first token
    num_steps: np.ndarray     # [S] i32 decode steps of the row (0: padding row)
    block_tables: np.ndarray  # [S, P] i32 pages covering every step's position


@functools.lru_cache(maxsize=None)
def _multi_step_fn(cfg: LlamaConfig, attn_impl: str, num_logprobs: Optional[int], num_steps: int):
    """Jitted `num_steps` decode steps in one lax.scan: step i feeds the tokens step i - 1 sampled.
    Host inputs (DecodeBatch, SamplingTensors, penalty slots) arrive as one packed int32 buffer, as in
    `_sample_step_fn`; the results leave as one [num_steps, S, 2 + 2k] int32 buffer (each step's
    `_pack_sampler_output`). Rows past their num_steps write nothing."""

    def step(params, cache, penalties: Optional[PenaltyState], packed, layout):
        fields, tensors, slots = _unpack_device_inputs(packed, layout)
        batch = DecodeBatch(**fields)
        S = batch.first_tokens.shape[0]
        page_size = cache["k"].shape[2]
        rows = jnp.arange(S, dtype=jnp.int32)

        def one(carry, i):
            cache, penalties, tokens = carry
            active = i < batch.num_steps
            pos = batch.positions + i
            page = jnp.take_along_axis(batch.block_tables, (pos // page_size)[:, None], axis=1, mode="clip")[:, 0]
            inputs = StepInputs(
                tokens=tokens, positions=jnp.where(active, pos, 0),
                slot_mapping=jnp.where(active, page * page_size + pos % page_size, -1),
                cu_q_lens=jnp.arange(S + 1, dtype=jnp.int32), kv_lens=jnp.where(active, pos + 1, 1),
                block_tables=batch.block_tables, num_seqs=jnp.full((1,), S, jnp.int32), logits_indices=rows)
            logits, cache = forward(params, cache, inputs, cfg, attn_impl=attn_impl)
            step_tensors = tensors._replace(step=tensors.step + i.astype(jnp.uint32))
            if penalties is None:
                out = sample(logits, step_tensors, num_logprobs=num_logprobs)
            else:
                out = sample(logits, step_tensors, *_gather_penalty_rows(penalties, slots), num_logprobs=num_logprobs)
                row_slots = jnp.where(active, slots, penalties.counts.shape[0])
                penalties = PenaltyState(penalties.counts.at[row_slots, out.tokens].add(1, mode="drop"),
                                         penalties.prompt_mask)
            return (cache, penalties, jnp.where(active, out.tokens, tokens)), _pack_sampler_output(out)

        (cache, penalties, _), outs = jax.lax.scan(one, (cache, penalties, batch.first_tokens),
                                                   jnp.arange(num_steps, dtype=jnp.int32))
        return outs, cache, penalties

    return jax.jit(step, donate_argnums=(1, 2), static_argnames=("layout",))


class count_xla_compiles:
    """Counts XLA backend compilations (JAX's own compile events) while active:

        with count_xla_compiles() as compiles: ...
        compiles.count
    """

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.seconds = 0.0

    def _listener(self, event: str, duration_secs: float, **_):
        if event == self._EVENT:
            self.count += 1
            self.seconds += duration_secs

    def __enter__(self) -> "count_xla_compiles":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


class StepResult(NamedTuple):
    """Host results of one step, per sampling row (in `sampling_layout` order, padded to S rows).

    A plain step emits one token per row (K = 0); a speculative step emits the accepted guesses and
    then the target's token: `tokens[b, :num_output[b]]`.
    """

    tokens: np.ndarray          # [S, K+1] int32
    num_output: np.ndarray      # [S] int32, 1..K+1
    num_accepted: np.ndarray    # [S] int32 guesses accepted (num_output - 1)
    chosen_logprob: np.ndarray  # [S, K+1] f32 raw logprob of each emitted token
    top_logprobs: np.ndarray    # [S, K+1, n] f32
    top_ids: np.ndarray         # [S, K+1, n] int32


class SpecBatch(NamedTuple):
    """Per sampling row inputs of a speculative step (padded to S rows; K = the engine's k)."""

    draft_tokens: np.ndarray  # [S, K] int32 guesses fed after the last token (0 padding)
    num_draft: np.ndarray     # [S] int32 guesses of the row (0 = plain sampling row)
    ban_len: np.ndarray       # [S] int32 leading positions the min_tokens ban covers
    draft_probs: Optional[jax.Array] = None  # [B, K, V] q of a sampling draft model (None: one-hot guesses)
    probs_rows: Optional[np.ndarray] = None  # [S] int32 row of draft_probs for each sampling row


class ModelRunner:
    """Owns the device params, KV pool and penalty state; runs one padded, jitted step (forward + sample
    or verify). Steps are padded to a fixed set of shapes (see `buckets`), so a job compiles nothing
    once `warmup` ran the set."""

    def __init__(self, cfg: LlamaConfig, params, engine_cfg: EngineConfig, num_pages: int,
                 kv_dtype, cache_sharding=None, draft: Optional[DraftRunner] = None):
        self.cfg = cfg
        self.engine_cfg = engine_cfg
        self.num_pages = num_pages  # pages the scheduler allocates
        self.params = params
        # A draft model's runner (spec_runner.DraftRunner): its own pool follows every step's tokens.
        self.draft = draft
        self._new_cache = functools.partial(init_cache, cfg, num_pages, engine_cfg.page_size, kv_dtype,
                                            sharding=cache_sharding)
        self.cache = self._new_cache()
        self.max_pages_per_seq = -(-engine_cfg.max_model_len // engine_cfg.page_size)
        self.max_seqs_bucket = pow2_bucket(engine_cfg.max_num_seqs)
        self.num_slots = engine_cfg.max_num_seqs  # penalty slots (one per running request at most)
        self.penalties: Optional[PenaltyState] = None  # allocated when the first request needs it
        self.device_wait_seconds = 0.0  # host time spent blocked on step results (the rest is host work)
        # The last plain step's sampled tokens [max_seqs_bucket], on device: what placeholder input tokens
        # of an overlapped step read (host zeros + device_put: no XLA program).
        self._fed_back = jax.device_put(np.zeros(self.max_seqs_bucket, np.int32))
        widths, w = [], self.max_pages_per_seq
        while True:
            widths.append(w)
            if w == 1:
                break
            w = -(-w // _PAGE_BUCKET_RATIO)
        self.page_buckets = sorted(widths)
        self.token_buckets = [1 << i for i in range(3, pow2_bucket(engine_cfg.max_num_batched_tokens, 8)
                                                     .bit_length())]

    def seqs_bucket(self, num_tokens_bucket: int) -> int:
        # Sequences never outnumber tokens: tying S to T keeps the compiled set one-dimensional in
        # (tokens, sequences); padded sequence rows cost little (q_len 0, kv_len 0).
        return min(num_tokens_bucket, self.max_seqs_bucket)

    def bucket(self, sched: SchedulerOutput) -> tuple[int, int, int]:
        """(tokens, seqs, pages) padded sizes, from the fixed set `warmup` compiles."""
        T = pow2_bucket(sched.num_batched_tokens, 8)
        longest = max(s.num_pages for s in sched.scheduled)
        P = next((w for w in self.page_buckets if w >= longest), longest)
        return T, self.seqs_bucket(T), P

    # ------------------------------------------------------------------ penalty state
    def write_penalty_row(self, slot: int, output_token_ids: Sequence[int], prompt_token_ids: Sequence[int]):
        """Sets a slot's penalty row: counts of the output tokens so far and the prompt's token mask."""
        V = self.cfg.vocab_size
        if self.penalties is None:  # host zeros + device_put: no XLA program per shape
            self.penalties = jax.device_put(PenaltyState(np.zeros((self.num_slots, V), np.int32),
                                                         np.zeros((self.num_slots, V), bool)))
        counts = np.bincount(np.asarray(output_token_ids, np.int64), minlength=V).astype(np.int32)
        mask = np.zeros(V, bool)
        mask[np.asarray(prompt_token_ids, np.int64)] = True
        self.penalties = _write_penalty_row(self.penalties, np.int32(slot), counts, mask)

    # ------------------------------------------------------------------ steps
    def rows_bucket(self, sched: SchedulerOutput, multi_step: bool) -> int:
        """Sampling rows of the step's program (S)."""
        if multi_step:  # one row per sequence; the steps are a loop inside the program
            return self.seqs_bucket(pow2_bucket(len(sched.scheduled), 8))
        return self.bucket(sched)[1]

    def execute(self, sched: SchedulerOutput, tensors: SamplingTensors, slots: Optional[np.ndarray],
                num_logprobs: Optional[int], spec: Optional[SpecBatch] = None) -> StepResult:
        """Runs the step (with `spec`: forward + verify of the drafts); returns host results per sampling
        row. slots [S] i32: each row's penalty slot (num_slots = none), or None for a step without penalties.

        Without `spec`, trailing draft tokens are multi-step lookahead placeholders (see
        `execute_decode_steps`) that could not run as such: each row samples after its last real token
        and the placeholders' KV is discarded by the scheduler."""
        if spec is None:
            return self.fetch(self.dispatch(sched, tensors, slots, num_logprobs))
        T, S, P = self.bucket(sched)
        arrays = sched.to_step_arrays(pad_tokens_to=T, pad_seqs_to=S, pad_pages_to=P)
        K1 = spec.draft_tokens.shape[1] + 1
        arrays["logits_indices"] = _group_logits_rows(arrays["logits_indices"], sched.sampling_layout, S, K1)
        fn = _verify_step_fn(self.cfg, self.engine_cfg.attn_impl, num_logprobs)
        inputs = StepInputs(**jax.device_put(arrays))
        out, _ = self._run(fn, slots, inputs, tensors, None if slots is None else jnp.asarray(slots),
                           *(None if a is None else jnp.asarray(a) for a in spec))
        self._write_draft_kv(inputs)
        out = self._fetch(out)
        return StepResult(np.asarray(out.output_tokens), np.asarray(out.num_output),
                          np.asarray(out.accepted_counts), np.asarray(out.chosen_logprob),
                          np.asarray(out.top_logprobs), np.asarray(out.top_ids))

    def dispatch(self, sched: SchedulerOutput, tensors: SamplingTensors, slots: Optional[np.ndarray],
                 num_logprobs: int):
        """Launches a plain sampling step and returns its device results without waiting for them
        (`fetch` reads them). Input tokens may be placeholders for tokens the previously launched plain
        step sampled: -(row + 1) stands for that step's sampling row `row` (see `_feed_back`).
        tensors: host (numpy) SamplingTensors, sent with the step's other inputs in one buffer."""
        T, S, P = self.bucket(sched)
        arrays = sched.to_step_arrays(pad_tokens_to=T, pad_seqs_to=S, pad_pages_to=P)
        arrays["logits_indices"] = _first_logits_rows(sched, S)
        out = self._launch_sample(arrays, tensors, slots, num_logprobs)
        if self.draft is not None:
            self._write_draft_kv(StepInputs(**jax.device_put(arrays)))
        return out

    def _launch_sample(self, arrays: dict, tensors: SamplingTensors, slots: Optional[np.ndarray], num_logprobs: int):
        packed, layout = _pack_host_inputs(arrays, tensors, slots)
        fn = _sample_step_fn(self.cfg, self.engine_cfg.attn_impl, num_logprobs)
        out, (self._fed_back,) = self._run(fn, slots, packed, self._fed_back, layout=layout)
        return out

    def _write_draft_kv(self, inputs: StepInputs) -> None:
        """The draft model's K/V for the step's tokens (its pool follows the target's); runs on the device
        while the host processes the step's results."""
        if self.draft is not None:
            self.draft.write_kv(inputs)

    def fetch(self, out) -> StepResult:
        """Host results of a `dispatch`ed step (blocks until the device has them): one token per row,
        the K = 0 case of a verify result."""
        host = self._fetch(out)  # [S, 2 + 2k] int32 (_pack_sampler_output)
        S, k = host.shape[0], (host.shape[1] - 2) // 2
        return StepResult(host[:, :1], np.ones(S, np.int32), np.zeros(S, np.int32), host[:, 1:2].view(np.float32),
                          host[:, None, 2 + k:].view(np.float32), host[:, None, 2:2 + k])

    def execute_decode_steps(self, sched: SchedulerOutput, tensors: SamplingTensors, slots: Optional[np.ndarray],
                             num_logprobs: int, num_steps: int) -> StepResult:
        """Multi-step decode: every scheduled sequence feeds its last token followed by placeholders (its
        draft tokens) for the tokens it samples itself; runs up to `num_steps` steps in one program.
        Row b emits `num_output[b]` tokens (1 + its placeholders)."""
        S, P = self.rows_bucket(sched, True), self.bucket(sched)[2]
        batch = DecodeBatch(np.zeros(S, np.int32), np.zeros(S, np.int32), np.zeros(S, np.int32),
                            np.zeros((S, P), np.int32))
        for b, s in enumerate(sched.scheduled):
            batch.first_tokens[b] = s.token_ids[0]
            batch.positions[b] = s.num_computed_tokens
            batch.num_steps[b] = s.num_new_tokens
            batch.block_tables[b, :s.num_pages] = s.block_array[:s.num_pages]
        return self._run_decode_steps(batch, tensors, slots, num_logprobs, num_steps)

    def _run_decode_steps(self, batch: DecodeBatch, tensors: SamplingTensors, slots: Optional[np.ndarray],
                          num_logprobs: int, num_steps: int) -> StepResult:
        """tensors: host (numpy) SamplingTensors, sent with the batch and slots in one buffer."""
        packed, layout = _pack_host_inputs(batch._asdict(), tensors, slots)
        fn = _multi_step_fn(self.cfg, self.engine_cfg.attn_impl, num_logprobs, num_steps)
        host = self._fetch(self._run(fn, slots, packed, layout=layout)[0])  # [num_steps, S, 2 + 2k]
        host = host.transpose(1, 0, 2)  # [S, num_steps, 2 + 2k]
        S, k = host.shape[0], (host.shape[2] - 2) // 2
        return StepResult(host[:, :, 0], np.maximum(batch.num_steps, 1), np.zeros(S, np.int32),
                          host[:, :, 1].view(np.float32), host[:, :, 2 + k:].view(np.float32), host[:, :, 2:2 + k])

    def _run(self, fn, slots: Optional[np.ndarray], *args, **kwargs):
        """Launches a step program fn(params, cache, penalties, *args, **kwargs), donating the cache and
        (for a step with penalty `slots`) the penalty state; returns its device results and the
        program's further outputs, without waiting for them."""
        penalties = None
        if slots is not None:
            penalties, self.penalties = self.penalties, None  # donated
        out, self.cache, new_penalties, *more = fn(self.params, self.cache, penalties, *args, **kwargs)
        if slots is not None:
            self.penalties = new_penalties
        return out, more

    def _fetch(self, out):
        """Host copy of a launched step's results, counting the time blocked on the device."""
        t0 = time.perf_counter()
        out = np.asarray(out) if isinstance(out, jax.Array) else jax.device_get(out)
        self.device_wait_seconds += time.perf_counter() - t0
        return out

    def warmup(self, num_logprobs: Sequence[Optional[int]], penalties: Sequence[bool], max_seq_len: int,
               eos_token_id=None, masked: Sequence[bool] = (False,)) -> int:
        """Runs every (tokens, pages) bucket a job with sequences up to max_seq_len tokens can use, for
        each logprobs width, penalty variant and with / without a structured-output token mask (`masked`),
        on empty inputs (no sequence: nothing is written), and with multi-step decode every (sequences,
        pages) bucket of its program (never masked: constrained requests do not run multi-step); returns
        the number of programs run. Each one is compiled at its first run."""
        max_pages = -(-max_seq_len // self.engine_cfg.page_size)
        widths = self.page_buckets[:next(i for i, w in enumerate(self.page_buckets) if w >= max_pages) + 1]
        if any(penalties) and self.penalties is None:
            self.write_penalty_row(0, [], [])
        count = 0
        mask_words = -(-self.cfg.vocab_size // 32)
        for T in self.token_buckets:
            S = self.seqs_bucket(T)
            for with_mask in masked:
                bitmask = np.full((S, mask_words), -1, np.int32) if with_mask else None  # every token allowed
                tensors = SamplingTensors.from_params([], pad_to=S, eos_token_id=eos_token_id, token_bitmask=bitmask,
                                                      on_device=False)
                for P in widths:
                    arrays = SchedulerOutput([], 0, self.engine_cfg.page_size).to_step_arrays(
                        pad_tokens_to=T, pad_seqs_to=S, pad_pages_to=P, pad_logits_to=S)
                    count += self._warm(lambda k, slots: self._fetch(self._launch_sample(arrays, tensors, slots, k)),
                                        S, num_logprobs, penalties)
        K = self.engine_cfg.num_decode_steps
        if K > 1:
            for S in sorted({self.seqs_bucket(T) for T in self.token_buckets}):
                tensors = SamplingTensors.from_params([], pad_to=S, eos_token_id=eos_token_id, on_device=False)
                for P in widths:
                    batch = DecodeBatch(np.zeros(S, np.int32), np.zeros(S, np.int32), np.zeros(S, np.int32),
                                        np.zeros((S, P), np.int32))
                    count += self._warm(lambda k, slots: self._run_decode_steps(batch, tensors, slots, k, K),
                                        S, num_logprobs, penalties)
        return count

    def _warm(self, run, S: int, num_logprobs: Sequence[int], penalties: Sequence[bool]) -> int:
        for k in num_logprobs:
            for with_penalties in penalties:
                run(k, np.full(S, self.num_slots, np.int32) if with_penalties else None)
        return len(num_logprobs) * len(penalties)

    def cache_lost(self) -> bool:
        """True when the KV pool was donated to a step program whose result was never stored (the step
        was interrupted between the two): its buffers are deleted and it must be rebuilt."""
        lost = self.cache is not None and any(a.is_deleted() for a in jax.tree.leaves(self.cache))
        return lost or (self.draft is not None and self.draft.cache_lost())

    def reset_cache(self) -> None:
        """A fresh (zeroed) KV pool in place of a lost one (and the draft's, whose pages follow it)."""
        self.cache = self._new_cache()
        if self.draft is not None:
            self.draft.reset_cache()

    def reset_penalties(self) -> None:
        """Drops the penalty state (rows are rewritten when their requests next run)."""
        self.penalties = None

    def release(self):
        self.params = None
        self.cache = None
        self.penalties = None
        if self.draft is not None:
            self.draft.release()


def _first_logits_rows(sched: SchedulerOutput, num_rows: int) -> np.ndarray:
    """[num_rows] logits row of each sampling sequence's last real token (before any draft tokens);
    padding rows use row 0."""
    rows = np.zeros(num_rows, np.int32)
    first, offset = [], 0
    for s in sched.scheduled:  # (num_new_tokens and num_logits_rows inlined: every sequence, every step)
        offset += len(s.token_ids)
        if s.samples:
            first.append(offset - 1 - s.num_draft_tokens)
    rows[:len(first)] = first
    return rows


def _group_logits_rows(flat: np.ndarray, layout: list, num_rows: int, k1: int) -> np.ndarray:
    """Ragged logits rows (1 + drafts per sampling sequence, in layout order) -> [num_rows * k1] where
    row b's block holds its rows then repeats of its last row (ignored by verify); padding rows use 0."""
    grouped = np.zeros((num_rows, k1), np.int32)
    start = 0
    for b, (_, n) in enumerate(layout):
        grouped[b, :n] = flat[start:start + n]
        grouped[b, n:] = flat[start + n - 1]
        start += n
    return grouped.reshape(-1)
