"""Device-side batched sampler: one jitted program for a batch that mixes greedy and sampled rows.

Pipeline per row, in vLLM V1's order (`vllm/v1/sample/sampler.py`):
    raw logits --> structured-output mask --> allowed_token_ids mask --> bad_words ban
    --> min_tokens ban --> + logit_bias --> repetition, frequency, presence penalties
    --(greedy? argmax)-- else /temperature --> min-p --> top-k --> top-p --> inverse-CDF draw.
The processors before the penalties change greedy rows too. min-p comes first (V1; V0 ran it last):
it keeps p_i >= min_p * p_max of the full distribution, top-k then keeps the k largest of those, and
top-p renormalises over the survivors of both, so with min-p and top-p set the nucleus is taken
over the min-p survivors (V0 took it over the whole top-k set, then cut by min-p).

Per-request processors cost nothing when unused: `logit_bias` and the bad-word bans travel as one
sparse (ids, values) pair, `allowed_token_ids` as sparse ids and structured output's allowed tokens
as a packed [B, V / 32] bitmask, each only when some row of the batch uses it (otherwise the field
is None and the traced program has no such step). Bad words
depend on the request's output so far; the host works out which token each word bans at this step.

Cost (where a full vocab sort or a Gumbel draw over the vocab per row would dominate a small model's
step): every filter is a per-row cut-off on values (`filter_cutoff`); top-k/top-p cut-offs come from
the TOP_CANDIDATES largest values per row, and rows whose cut-off lies deeper are bisected on the
values' bits (no sort); the draw puts two uniforms per row through the inverse CDF (`categorical`).
All of it is exact, not an approximation. On CPU, C++ kernels (pallas_kernels/cpu_top_k.py) pick the
candidates (XLA:CPU's TopK sorts per row), cut the open rows off by a quickselect instead of the
bisection's 32 passes, and make the draw in one pass; elsewhere `lax.top_k`, the bisection and `_draw` run.

Returned logprobs are vLLM's default "raw" logprobs: log_softmax of the logits the model produced,
before penalties, temperature and filtering. That keeps them a property of the model (comparable
across requests and with other engines) rather than of the sampling settings. A program compiled
with num_logprobs=None (no request asked for any) computes none: no vocab-wide exp pass.

Randomness: every row's key is derived on device from (seed, stream, step), where `step` is the number
of tokens the request has generated so far. A request's samples therefore depend only on its own seed
and progress, never on which other requests share the batch or at which row it sits.
"""
from __future__ import annotations

import itertools
from functools import partial
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from inference.sampling_params import SAMPLING_EPS, SamplingParams
from pallas_kernels import cpu_top_k

# Padding value for `banned_ids`; out of range for any vocab, so the scatter drops it.
# (Not -1: JAX normalises negative indices, which would ban the last token.)
BAN_PAD = np.iinfo(np.int32).max

# Key streams keep user seeds and engine-assigned seeds apart, so that `seed=5` never replays
# the stream of the 5th unseeded request.
STREAM_USER = 0
STREAM_ENGINE = 1

_engine_seed_counter = itertools.count()


def next_engine_seed() -> int:
    """A fresh seed for a request that has none (process-wide counter).

    The engine should call this once per request at admission and pass it via
    `SamplingTensors.from_params(..., fallback_seeds=...)` so that the request keeps one stream.
    """
    return next(_engine_seed_counter)


class SamplingTensors(NamedTuple):
    """Per-row sampling parameters as device arrays (a pytree; B = batch rows)."""

    temperature: jax.Array         # [B] f32; 0 for greedy rows
    top_k: jax.Array               # [B] i32; 0 = disabled
    top_p: jax.Array               # [B] f32; 1 = disabled
    min_p: jax.Array               # [B] f32; 0 = disabled
    repetition_penalty: jax.Array  # [B] f32
    presence_penalty: jax.Array    # [B] f32
    frequency_penalty: jax.Array   # [B] f32
    seed_lo: jax.Array             # [B] u32  low / high 32 bits of the 64-bit request seed
    seed_hi: jax.Array             # [B] u32
    stream: jax.Array              # [B] u32  STREAM_USER or STREAM_ENGINE
    step: jax.Array                # [B] u32  tokens generated so far by the request
    banned_ids: jax.Array          # [B, S] i32  token ids forbidden this step (min_tokens); BAN_PAD = none
    # None unless some row uses logit_bias or bad_words: added to the logits (-inf bans a bad word's
    # last token); ids unique per row, BAN_PAD = none.
    bias_ids: Optional[jax.Array] = None     # [B, W] i32
    bias_values: Optional[jax.Array] = None  # [B, W] f32
    # None unless some row uses allowed_token_ids: rows with `restricted` sample only these ids.
    allowed_ids: Optional[jax.Array] = None  # [B, A] i32; BAN_PAD = none
    restricted: Optional[jax.Array] = None   # [B] bool
    # None unless some row has structured output: packed allowed tokens, bit j of word w = token 32 w + j
    # (llguidance's layout; unconstrained rows all ones). Built on the host by inference.structured_output.
    token_bitmask: Optional[jax.Array] = None  # [B, ceil(V / 32)] i32

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        *,
        steps: Optional[Sequence[int]] = None,
        fallback_seeds: Optional[Sequence[Optional[int]]] = None,
        eos_token_id: Union[int, Sequence[int], None] = None,
        pad_to: Optional[int] = None,
        output_token_ids: Optional[Sequence[Sequence[int]]] = None,
        token_bitmask: Optional[np.ndarray] = None,
        on_device: bool = True,
    ) -> "SamplingTensors":
        """Builds the batch on the host with numpy and transfers it in one `device_put` (with
        on_device=False the numpy arrays themselves, for a caller that packs them with other inputs).

        steps: tokens generated so far per row (default 0); folded into the row key and used for
            the min_tokens ban.
        fallback_seeds: per-row seeds for requests whose `seed` is None (entries for seeded rows are
            ignored). Rows left without one draw `next_engine_seed()`, i.e. fresh randomness.
        eos_token_id: eos id(s), banned together with `stop_token_ids` while step < min_tokens
            (unless ignore_eos), like vLLM's min_tokens logits processor.
        pad_to: pad the batch to this many rows with inert greedy rows (keeps shapes bucketed).
        output_token_ids: per row the tokens the request has generated so far (default none), for
            bad_words (rows using them need `SamplingParams.update_from_tokenizer` first).
        token_bitmask: [pad_to or len(params), ceil(V / 32)] int32 packed allowed tokens (structured output),
            or None when no row is constrained.
        """
        n = len(params)
        rows = n if pad_to is None else pad_to
        if rows < n:
            raise ValueError(f"pad_to={pad_to} is smaller than the batch ({n} rows)")
        steps = [0] * n if steps is None else list(steps)
        if len(steps) != n:
            raise ValueError(f"steps has {len(steps)} entries for {n} rows")
        if fallback_seeds is not None and len(fallback_seeds) != n:
            raise ValueError(f"fallback_seeds has {len(fallback_seeds)} entries for {n} rows")
        if output_token_ids is not None and len(output_token_ids) != n:
            raise ValueError(f"output_token_ids has {len(output_token_ids)} entries for {n} rows")
        if token_bitmask is not None and (token_bitmask.ndim != 2 or token_bitmask.shape[0] != rows
                                          or token_bitmask.dtype != np.int32):
            raise ValueError(f"token_bitmask of shape {token_bitmask.shape} and dtype {token_bitmask.dtype} must "
                             f"be int32 [{rows}, ceil(vocab / 32)]")
        if eos_token_id is None:
            eos_ids = []
        elif isinstance(eos_token_id, (int, np.integer)):
            eos_ids = [int(eos_token_id)]
        else:
            eos_ids = [int(e) for e in eos_token_id]

        # Padding rows are greedy with neutral penalties, so they cost nothing and change nothing.
        temperature = np.zeros(rows, np.float32)
        top_k = np.zeros(rows, np.int32)
        top_p = np.ones(rows, np.float32)
        min_p = np.zeros(rows, np.float32)
        rep = np.ones(rows, np.float32)
        presence = np.zeros(rows, np.float32)
        frequency = np.zeros(rows, np.float32)
        seed_lo = np.zeros(rows, np.uint32)
        seed_hi = np.zeros(rows, np.uint32)
        stream = np.zeros(rows, np.uint32)
        step = np.zeros(rows, np.uint32)
        banned: list[list[int]] = [[] for _ in range(rows)]
        bias: list[dict[int, float]] = [{} for _ in range(rows)]
        allowed: list[list[int]] = [[] for _ in range(rows)]
        restricted = np.zeros(rows, bool)

        for i, p in enumerate(params):
            # Greedy rows (incl. top_k == 1) get temperature 0, which is how the device tells them
            # apart; their filters are kept but never force the sort (argmax ignores them).
            temperature[i] = 0.0 if p.is_greedy else p.temperature
            top_k[i] = max(p.top_k, 0)
            top_p[i] = p.top_p
            min_p[i] = p.min_p
            rep[i] = p.repetition_penalty
            presence[i] = p.presence_penalty
            frequency[i] = p.frequency_penalty
            if p.seed is not None:
                seed, stream[i] = p.seed, STREAM_USER
            else:
                seed = fallback_seeds[i] if fallback_seeds is not None else None
                seed = next_engine_seed() if seed is None else seed
                stream[i] = STREAM_ENGINE
            seed = int(seed) % (1 << 64)  # any Python int (negative, > 2**32) maps onto two uint32 words
            seed_lo[i] = seed & 0xFFFFFFFF
            seed_hi[i] = seed >> 32
            step[i] = steps[i]
            if steps[i] < p.min_tokens:
                banned[i] = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_ids)
            if p.logit_bias:
                bias[i] = dict(p.logit_bias)
            if p.bad_words:
                history = [] if output_token_ids is None else output_token_ids[i]
                for token in bad_word_bans(p.bad_words_token_ids, history):
                    bias[i][token] = -np.inf
            if p.allowed_token_ids is not None:
                allowed[i], restricted[i] = p.allowed_token_ids, True

        banned_ids = _padded_ids(banned)
        bias_ids = bias_values = allowed_ids = None
        if any(bias):
            bias_ids = _padded_ids([list(b) for b in bias])
            bias_values = np.zeros(bias_ids.shape, np.float32)
            for i, b in enumerate(bias):
                bias_values[i, : len(b)] = list(b.values())
        if restricted.any():
            allowed_ids = _padded_ids(allowed)
        else:
            restricted = None

        host = cls(temperature, top_k, top_p, min_p, rep, presence, frequency, seed_lo, seed_hi, stream, step,
                   banned_ids, bias_ids, bias_values, allowed_ids, restricted, token_bitmask)
        return jax.device_put(host) if on_device else host


class SamplingRows:
    """Host copy of each running request's sampling values, one slot per request written once (at its
    first step), so that a step's SamplingTensors are a few numpy takes instead of a loop over
    SamplingParams. Covers rows whose values are the same at every step (`fits`): no logit_bias,
    bad_words or allowed_token_ids, and past min_tokens (no eos / stop-id ban); a step with any other
    row builds its tensors with `SamplingTensors.from_params`, which gives the same values for these."""

    _FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty", "seed_lo", "seed_hi", "stream")

    def __init__(self, capacity: int):
        self.capacity = capacity  # slot `capacity` is the padding row
        neutral = SamplingTensors.from_params([], pad_to=capacity + 1, on_device=False)
        self._columns = {f: getattr(neutral, f) for f in self._FIELDS}

    @staticmethod
    def fits(params: SamplingParams) -> bool:
        """Whether the request's rows come from the table once past min_tokens."""
        return not (params.logit_bias or params.bad_words or params.allowed_token_ids is not None)

    def write(self, slot: int, params: SamplingParams, fallback_seed: int) -> None:
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot={slot} out of range for a table of capacity={self.capacity}")
        row = SamplingTensors.from_params([params], fallback_seeds=[fallback_seed], on_device=False)
        for f in self._FIELDS:
            self._columns[f][slot] = getattr(row, f)[0]

    def gather(self, slots: Sequence[int], steps: Sequence[int], pad_to: int) -> SamplingTensors:
        """Host SamplingTensors of rows in `slots` at `steps` (tokens generated so far), padded to pad_to
        rows with inert greedy rows: what `from_params` builds for them."""
        n = len(slots)
        if pad_to < n:
            raise ValueError(f"pad_to={pad_to} is smaller than the batch ({n} rows)")
        index = np.full(pad_to, self.capacity, np.intp)
        index[:n] = slots
        step = np.zeros(pad_to, np.uint32)
        step[:n] = steps
        return SamplingTensors(*(self._columns[f][index] for f in self._FIELDS), step=step,
                               banned_ids=np.full((pad_to, 1), BAN_PAD, np.int32))


def _padded_ids(ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[rows, W] i32 of per-row id lists padded with BAN_PAD, W a power of two (rarely recompiles)."""
    width = max((len(row) for row in ids), default=0)
    width = 1 << max(width - 1, 0).bit_length()
    out = np.full((len(ids), width), BAN_PAD, np.int32)
    for i, row in enumerate(ids):
        out[i, : len(row)] = row
    return out


def bad_word_bans(bad_words_token_ids: Sequence[Sequence[int]], history: Sequence[int]) -> list[int]:
    """Tokens banned at the next step, as vLLM's bad-words processor: a word's last token whenever
    the output so far ends with the word's other tokens (single-token words are always banned)."""
    bans = []
    for word in bad_words_token_ids:
        prefix = len(word) - 1
        if prefix > len(history):
            continue
        if prefix == 0 or list(history[len(history) - prefix:]) == list(word[:-1]):
            bans.append(word[-1])
    return bans


class SamplerOutput(NamedTuple):
    tokens: jax.Array          # [B] i32 sampled token per row
    chosen_logprob: jax.Array  # [B] f32 raw logprob of the sampled token
    top_logprobs: jax.Array    # [B, k] f32 raw top-k logprobs, sorted descending (k = num_logprobs)
    top_ids: jax.Array         # [B, k] i32 their token ids


def request_key(seed: int, step: int, stream: int = STREAM_USER) -> jax.Array:
    """The PRNG key row `step` of a request with `seed` uses; host mirror of `row_keys` (for tests)."""
    seed %= 1 << 64
    key = jax.random.key(np.uint32(seed & 0xFFFFFFFF))
    for word in (seed >> 32, stream, step):
        key = jax.random.fold_in(key, np.uint32(word))
    return key


def row_keys(tensors: SamplingTensors) -> jax.Array:
    """[B] typed PRNG keys, derived on device from the uint32 seed words (no per-row host work)."""

    def one(lo, hi, stream, step):
        key = jax.random.key(lo)
        for word in (hi, stream, step):
            key = jax.random.fold_in(key, word)
        return key

    return jax.vmap(one)(tensors.seed_lo, tensors.seed_hi, tensors.stream, tensors.step)


def apply_penalties(logits: jax.Array, tensors: SamplingTensors,
                    token_counts: Optional[jax.Array], prompt_mask: Optional[jax.Array]) -> jax.Array:
    """vLLM penalties on [B, V] logits.

    repetition: tokens seen in the prompt OR the output have positive logits divided by the
        penalty and non-positive ones multiplied (both push the token down when penalty > 1).
    frequency / presence: output tokens only; logits -= frequency * count + presence * (count > 0).
    """
    if token_counts is None and prompt_mask is None:
        return logits
    counts = jnp.zeros(logits.shape, jnp.int32) if token_counts is None else token_counts
    in_output = counts > 0
    seen = in_output if prompt_mask is None else in_output | prompt_mask
    rep = tensors.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - tensors.frequency_penalty[:, None] * counts.astype(logits.dtype)
    logits = logits - tensors.presence_penalty[:, None] * in_output.astype(logits.dtype)
    return logits


# Top-k / top-p candidates: the largest values of this width settle the cut-off of every row whose
# k-th value and nucleus lie inside it (at [64, 49152] on XLA:CPU a top-64 `lax.top_k` takes ~5 ms,
# a full sort ~470 ms, the CPU kernel ~0.7 ms).
TOP_CANDIDATES = 64
# Rows the candidates cannot settle are bisected exactly, this many rows at a time (on CPU the
# quickselect kernel takes them all in one call).
FALLBACK_ROWS = 4
# Block width of the two-level inverse-CDF draw in `categorical`.
DRAW_BLOCK = 256


def _to_ordered(x: jax.Array) -> jax.Array:
    """f32 -> u32 codes in the same order (negative floats flipped), so bisection can run on bits."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_ordered(code: jax.Array) -> jax.Array:
    """Inverse of `_to_ordered`; codes below -inf's (NaN patterns) map to -inf, keeping it monotone."""
    code = jnp.maximum(code, _to_ordered(jnp.float32(-jnp.inf)))
    bits = jnp.where(code >> 31 == 1, code & jnp.uint32(0x7FFFFFFF), ~code)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _largest_value_where(pred, rows: int) -> jax.Array:
    """[R] f32: per row the largest float t with pred(t [R, 1]) -> [R] bool true, for a pred that is
    true at -inf and monotone (true below some value). Sets the answer's 32 order bits from the top,
    one O(V) pass of pred per bit."""

    def set_bit(i, code):
        trial = code | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(pred(_from_ordered(trial)[:, None]), trial, code)

    return _from_ordered(jax.lax.fori_loop(0, 32, set_bit, jnp.zeros(rows, jnp.uint32)))


def _bisect_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, floor: jax.Array,
                      kth: jax.Array, kth_known: jax.Array) -> jax.Array:
    """[R] min-p-then-top-k-then-top-p cut-off by bisection on values: exact, no sort, 32 O(V)
    passes per bisection (one for the k-th value where unknown, one for the nucleus where top-p is on).

    scaled [R, V]; top_k [R] in 1..V (V = off); top_p [R]; floor [R] the min-p cut-off; kth [R]
    max(k-th largest value, floor) where kth_known [R]. The rule of `_candidate_threshold`.
    """
    rows = scaled.shape[0]
    # Each row's result is the same whichever branch its chunk takes.
    kth = jax.lax.cond(
        jnp.all(kth_known), lambda: kth,
        lambda: jnp.where(kth_known, kth, jnp.maximum(floor, _largest_value_where(
            lambda t: jnp.sum(scaled >= t, axis=-1) >= top_k, rows))))

    def nucleus_cutoff():
        weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
        weights = jnp.where(scaled >= kth[:, None], weights, 0.0)
        mass = top_p * jnp.sum(weights, axis=-1)
        # The largest t whose strictly-larger mass still reaches p; the cut-off is the next value up.
        below = _largest_value_where(
            lambda t: jnp.sum(jnp.where(scaled > t, weights, 0.0), axis=-1) >= mass, rows)
        cutoff = jnp.min(jnp.where(scaled > below[:, None], scaled, jnp.inf), axis=-1)
        return jnp.where(top_p >= 1.0, kth, cutoff)

    return jax.lax.cond(jnp.all(top_p >= 1.0), lambda: kth, nucleus_cutoff)


def _selection_kernels() -> bool:
    """Whether the CPU kernels (pallas_kernels/cpu_top_k.py) pick the candidates and the exact cut-offs
    and make `sample`'s draw (read at trace time; elsewhere lax.top_k, the bisection and `_draw` do)."""
    return cpu_top_k.kernel_available()


def _candidate_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, floor: jax.Array,
                         width: int):
    """[B] (cut-off, settled, kth, kth_known) of min-p, top-k then top-p from the top `width` values.

    floor [B] is the min-p cut-off (-inf without min-p). Follows a descending sort of the min-p
    survivors: the k-th largest value is the top-k cut-off (ties with it kept, as in vLLM); a token
    stays in the nucleus while the surviving mass strictly before it is < p, and the value at the
    nucleus' last position is the cut-off. A row is settled when that position is provably among
    the candidates; otherwise its cut-off here is meaningless. kth is max(k-th largest value, floor)
    (floor with top-k off) where kth_known, i.e. where it is among the candidates or below floor.
    """
    vocab = scaled.shape[-1]
    width = min(width, vocab)
    if _selection_kernels():  # the candidates and the survivors' mass (mass_hi below) in one pass
        cand, kernel_mass = cpu_top_k.cpu_candidates(scaled, width, top_k, floor)  # [B, width] descending, [B]
    else:
        # The barrier keeps XLA from folding later slices into top_k's sort + slice, which would stop
        # XLA:CPU from rewriting it into its partial-selection TopK (a full sort instead).
        cand, kernel_mass = jax.lax.optimization_barrier(jax.lax.top_k(scaled, width)[0]), None
    k_known = (top_k <= width) | (top_k >= vocab)
    kth = jnp.take_along_axis(cand, (jnp.minimum(top_k, width) - 1)[:, None], axis=-1)[:, 0]
    kth = jnp.where((top_k >= vocab) | ~k_known, -jnp.inf, kth)          # [B]
    # min-p survivors first: a k-th value past the candidates lies below the last one, so a floor at
    # or above that settles it; elsewhere the floor only bounds the survivors' mass from above.
    k_known = k_known | (floor >= cand[:, -1])
    kth = jnp.maximum(kth, floor)
    in_top_k = cand >= kth[:, None]
    cand_w = jnp.where(in_top_k, jnp.exp(cand - cand[:, :1]), 0.0)      # [B, width]
    # The survivors' mass needs the whole row (ties past the candidates, or top-k off): one masked sum.
    # When the k-th value lies past the candidates that mass is only bounded, by the candidates'
    # mass below and that of every token >= floor above; the row is settled if both bounds give one
    # nucleus.
    mass_hi = kernel_mass if kernel_mass is not None else jnp.sum(
        jnp.where(scaled >= kth[:, None], jnp.exp(scaled - cand[:, :1]), 0.0), axis=-1)
    mass_lo = jnp.where(k_known, mass_hi, jnp.sum(cand_w, axis=-1))
    mass_before = jnp.cumsum(cand_w, axis=-1) - cand_w
    n_keep = jnp.sum(in_top_k & (mass_before < (top_p * mass_hi)[:, None]), axis=-1)
    n_keep_lo = jnp.sum(in_top_k & (mass_before < (top_p * mass_lo)[:, None]), axis=-1)
    cutoff = jnp.take_along_axis(cand, (jnp.maximum(n_keep, 1) - 1)[:, None], axis=-1)[:, 0]
    p_off = top_p >= 1.0
    nucleus_inside = (n_keep == n_keep_lo) & ((n_keep < width) | (width == vocab))
    settled = jnp.where(p_off, k_known, nucleus_inside)
    return jnp.where(p_off, kth, cutoff), settled, kth, k_known


def _top_k_top_p_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, floor: jax.Array,
                           active: jax.Array, *, width: int, chunk_rows: int) -> jax.Array:
    """[B] logit cut-off of top-k then top-p over the tokens >= floor [B] (min-p's cut-off); -inf
    for rows that are not `active` [B]."""
    rows = scaled.shape[0]
    threshold, settled, kth, kth_known = _candidate_threshold(scaled, top_k, top_p, floor, width)
    unsettled = active & ~settled
    if _selection_kernels():  # the same rule, one quickselect per unsettled row
        exact = cpu_top_k.cpu_filter_cutoff(scaled, top_k, top_p, floor, kth, kth_known, unsettled)
        return jnp.where(active, jnp.where(unsettled, exact, threshold), -jnp.inf)
    # Unsettled rows first, bisected in chunks of `chunk_rows`: the cost follows their number, and
    # a row's cut-off depends only on its own logits (never on the batch or its chunk).
    order = jnp.pad(jnp.argsort(~unsettled, stable=True), (0, chunk_rows), constant_values=rows)
    n_chunks = (jnp.sum(unsettled) + chunk_rows - 1) // chunk_rows

    def bisect_chunk(i, threshold):
        chunk = jax.lax.dynamic_slice(order, (i * chunk_rows,), (chunk_rows,))
        safe = jnp.minimum(chunk, rows - 1)
        cut = _bisect_threshold(scaled[safe], top_k[safe], top_p[safe], floor[safe], kth[safe],
                                kth_known[safe])
        target = jnp.where((chunk < rows) & unsettled[safe], chunk, rows)  # rows = dropped
        return threshold.at[target].set(cut, mode="drop")

    threshold = jax.lax.fori_loop(0, n_chunks, bisect_chunk, threshold)
    return jnp.where(active, threshold, -jnp.inf)


def filter_cutoff(scaled: jax.Array, tensors: SamplingTensors,
                  skip_rows: Optional[jax.Array] = None) -> jax.Array:
    """[B] f32: per row, the smallest temperature-scaled logit that min-p, top-k and top-p (in that
    order) allow; a token is kept iff scaled >= cutoff (every filter is a cut-off on values). The
    row maximum always passes.

    skip_rows [B] bool marks rows whose cut-off is irrelevant (greedy); they never cost a selection.
    """
    vocab = scaled.shape[-1]
    top_k = jnp.where((tensors.top_k <= 0) | (tensors.top_k > vocab), vocab, tensors.top_k)
    active = (top_k < vocab) | (tensors.top_p < 1.0)
    if skip_rows is not None:
        active &= ~skip_rows
    # min-p: p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p), over the whole distribution
    # (no softmax needed). min_p = 0 gives log(0) = -inf.
    min_p_cutoff = jnp.max(scaled, axis=-1) + jnp.log(tensors.min_p)
    # Skip the candidate selection entirely when no row in the batch uses top-k or top-p. (The
    # sizes are bound here, at trace time, rather than read inside the traced branch.)
    threshold = jax.lax.cond(jnp.any(active),
                             partial(_top_k_top_p_threshold, width=TOP_CANDIDATES,
                                     chunk_rows=FALLBACK_ROWS),
                             lambda s, k, p, f, a: jnp.full(s.shape[:1], -jnp.inf, s.dtype),
                             scaled, top_k, tensors.top_p, min_p_cutoff, active)
    return jnp.maximum(threshold, min_p_cutoff)


def filter_mask(scaled: jax.Array, tensors: SamplingTensors,
                skip_rows: Optional[jax.Array] = None) -> jax.Array:
    """[B, V] bool: tokens allowed after min-p, top-k and top-p on temperature-scaled logits."""
    return scaled >= filter_cutoff(scaled, tensors, skip_rows)[:, None]


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """[B] index i with cum[i-1] <= u * total < cum[i] (so weights[i] > 0) for weights [B, N] >= 0
    and u [B] in [0, 1)."""
    cum = jnp.cumsum(weights, axis=-1)
    index = jnp.sum(cum <= u[:, None] * cum[:, -1:], axis=-1)
    # u * total can round up to the total itself: then take the last entry with weight.
    last = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.minimum(index, last)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """[B] i32: one draw per row from softmax(logits) (logits [B, V], -inf = excluded; keys [B])."""
    return _draw(keys, logits, jnp.max(logits, axis=-1))


def draw_uniforms(keys: jax.Array) -> jax.Array:
    """[B, 2] f32 in [0, 1): the two uniforms of each row's draw (keys [B])."""
    return jax.vmap(lambda key: jax.random.uniform(key, (2,), jnp.float32))(keys)


def _draw(keys: jax.Array, logits: jax.Array, row_max: jax.Array) -> jax.Array:
    """`categorical` given row_max [B] = the rows' maxima (saves a pass when the caller knows it).

    Inverse CDF in two levels with two uniforms per row: a block of DRAW_BLOCK tokens by block
    mass, then a token inside that block. Exact like Gumbel-max, but O(V) cheap elementwise work
    plus cumsums over V / DRAW_BLOCK and DRAW_BLOCK entries, instead of V random numbers per row.
    """
    rows, vocab = logits.shape
    block = min(DRAW_BLOCK, vocab)
    n_blocks = -(-vocab // block)
    weights = jnp.exp(logits - row_max[:, None])
    weights = jnp.pad(weights, ((0, 0), (0, n_blocks * block - vocab)))
    weights = weights.reshape(rows, n_blocks, block)                      # [B, n_blocks, block]
    u = draw_uniforms(keys)  # [B, 2]
    block_index = _inverse_cdf(jnp.sum(weights, axis=-1), u[:, 0])
    in_block = jnp.take_along_axis(weights, block_index[:, None, None], axis=1)[:, 0]
    return (block_index * block + _inverse_cdf(in_block, u[:, 1])).astype(jnp.int32)


def first_argmax(x: jax.Array) -> jax.Array:
    """[B] i32 = jnp.argmax(x [B, V], axis=-1): the first maximum (the first NaN if there is one).

    Two levels over blocks of DRAW_BLOCK: the first block holding the row maximum, then the first
    maximum inside it. XLA:CPU's argmax reduction and a one-pass "first index equal to the max"
    both materialise [B, V] temporaries (~20 ms at [64, 49152]); this reads the row 3 times, ~1 ms.
    """
    rows, vocab = x.shape
    block = min(DRAW_BLOCK, vocab)
    n_blocks = -(-vocab // block)
    blocks = jnp.pad(x, ((0, 0), (0, n_blocks * block - vocab)), constant_values=-jnp.inf)
    blocks = blocks.reshape(rows, n_blocks, block)                        # [B, n_blocks, block]
    block_max = jnp.max(blocks, axis=-1)                                  # [B, n_blocks]
    row_max = jnp.max(block_max, axis=-1, keepdims=True)
    # NaN handled apart: XLA:CPU's max reduction may skip NaNs, while argmax picks the first NaN.
    block_nan = jnp.any(jnp.isnan(blocks), axis=-1)                      # [B, n_blocks]
    row_nan = jnp.any(block_nan, axis=-1, keepdims=True)
    first_block = jnp.argmax(jnp.where(row_nan, block_nan, block_max == row_max), axis=-1)
    in_block = jnp.take_along_axis(blocks, first_block[:, None, None], axis=1)[:, 0]  # [B, block]
    offset = jnp.argmax(jnp.where(row_nan, jnp.isnan(in_block), in_block == row_max), axis=-1)
    return (first_block * block + offset).astype(jnp.int32)


def _ban(logits: jax.Array, banned_ids: jax.Array) -> jax.Array:
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, banned_ids].set(-jnp.inf, mode="drop")


def unpack_bitmask(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """[B, W] i32 packed bits -> [B, vocab_size] bool: token t allowed iff bit t % 32 of word t // 32 is set."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = (jax.lax.bitcast_convert_type(bitmask, jnp.uint32)[:, :, None] >> shifts) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].astype(bool)


def apply_logits_processors(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """vLLM V1's processors before the penalties on [B, V] f32 logits: the structured-output token mask
    (applied first, as vLLM's grammar bitmask), the allowed_token_ids mask, the bad-word and min_tokens
    bans, logit_bias (bans are -inf, which a bias cannot lift)."""
    rows = jnp.arange(logits.shape[0])[:, None]
    if tensors.token_bitmask is not None:
        logits = jnp.where(unpack_bitmask(tensors.token_bitmask, logits.shape[-1]), logits, -jnp.inf)
    if tensors.allowed_ids is not None:
        allowed = jnp.zeros(logits.shape, bool).at[rows, tensors.allowed_ids].set(True, mode="drop")
        logits = jnp.where(tensors.restricted[:, None] & ~allowed, -jnp.inf, logits)
    logits = _ban(logits, tensors.banned_ids)
    if tensors.bias_ids is not None:
        logits = logits.at[rows, tensors.bias_ids].add(tensors.bias_values, mode="drop")
    return logits


def raw_logprobs(logits: jax.Array, tokens: jax.Array, num_logprobs: Optional[int]):
    """(chosen [N], top values [N, k], top ids [N, k] i32): the raw (unprocessed) log-softmax of logits
    [N, V] f32 at tokens [N] and its top k = num_logprobs entries.

    num_logprobs None (no request asked for logprobs) skips the vocab-wide exp pass: zeros, [N, 0].
    The [N, V] log-softmax is never materialised: one reduction gives the normaliser, values are
    gathered (jax.nn.log_softmax's formula, so the same values)."""
    rows = logits.shape[0]
    if num_logprobs is None:
        return jnp.zeros(rows, jnp.float32), jnp.zeros((rows, 0), jnp.float32), jnp.zeros((rows, 0), jnp.int32)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_norm = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))

    def at(ids):  # [N, m] -> log-softmax values there
        return jnp.take_along_axis(logits, ids, axis=-1) - row_max - log_norm

    chosen = at(tokens[:, None])[:, 0]
    if num_logprobs == 0:
        return chosen, jnp.zeros((rows, 0), jnp.float32), jnp.zeros((rows, 0), jnp.int32)
    top_ids = jax.lax.top_k(logits, num_logprobs)[1]  # log-softmax is monotone in the logits
    return chosen, at(top_ids), top_ids.astype(jnp.int32)


@partial(jax.jit, static_argnames=("num_logprobs",))
def sample(logits: jax.Array, tensors: SamplingTensors,
           token_counts: Optional[jax.Array] = None, prompt_mask: Optional[jax.Array] = None,
           num_logprobs: Optional[int] = 0) -> SamplerOutput:
    """Samples one token per row.

    logits [B, V] (cast to f32); token_counts [B, V] i32 counts of each token in the row's output so
    far; prompt_mask [B, V] bool tokens present in the prompt. Pass None for both to skip penalties.
    num_logprobs (static): k of the returned top-k raw logprobs (0 gives [B, 0] arrays; None also
    skips the chosen tokens' logprobs, returned as zeros).
    """
    logits = logits.astype(jnp.float32)

    x = apply_logits_processors(logits, tensors)
    x = apply_penalties(x, tensors, token_counts, prompt_mask)
    greedy = tensors.temperature < SAMPLING_EPS

    def sample_rows():
        # Greedy rows divide by 1 to stay finite; their result is replaced by argmax below.
        scaled = x / jnp.where(greedy, 1.0, tensors.temperature)[:, None]
        cutoff = filter_cutoff(scaled, tensors, skip_rows=greedy)
        row_max = jnp.max(scaled, axis=-1)  # never filtered out
        if _selection_kernels():  # the same draw, fused: no [B, V] masked logits or weights
            sampled = cpu_top_k.cpu_draw(scaled, cutoff, row_max, draw_uniforms(row_keys(tensors)))
        else:  # categorical(keys, masked)
            masked = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)
            sampled = _draw(row_keys(tensors), masked, row_max)
        greedy_tokens = jax.lax.cond(jnp.any(greedy), first_argmax, lambda _: jnp.zeros_like(sampled), x)
        return jnp.where(greedy, greedy_tokens, sampled)

    # All-greedy batches (common in evals/benchmarks) skip the filtering and the draw entirely, and
    # batches without greedy rows the argmax.
    tokens = jax.lax.cond(jnp.all(greedy), first_argmax, lambda _: sample_rows(), x)

    return SamplerOutput(tokens, *raw_logprobs(logits, tokens, num_logprobs))
