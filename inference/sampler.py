"""Device-side batched sampler: one jitted program for a batch that mixes greedy and sampled rows.

Pipeline per row (vLLM semantics):
    raw logits --(min_tokens ban)--> --(repetition, frequency, presence penalties)-->
    --(greedy? argmax)-- else /temperature --> top-k --> top-p --> min-p --> Gumbel-max sample.

Returned logprobs are vLLM's default "raw" logprobs: log_softmax of the logits the model produced,
before penalties, temperature and filtering. That keeps them a property of the model (comparable
across requests and with other engines) rather than of the sampling settings.

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

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        *,
        steps: Optional[Sequence[int]] = None,
        fallback_seeds: Optional[Sequence[Optional[int]]] = None,
        eos_token_id: Union[int, Sequence[int], None] = None,
        pad_to: Optional[int] = None,
    ) -> "SamplingTensors":
        """Builds the batch on the host with numpy and transfers it in one `device_put`.

        steps: tokens generated so far per row (default 0); folded into the row key and used for
            the min_tokens ban.
        fallback_seeds: per-row seeds for requests whose `seed` is None (entries for seeded rows are
            ignored). Rows left without one draw `next_engine_seed()`, i.e. fresh randomness.
        eos_token_id: eos id(s), banned together with `stop_token_ids` while step < min_tokens
            (unless ignore_eos), like vLLM's min_tokens logits processor.
        pad_to: pad the batch to this many rows with inert greedy rows (keeps shapes bucketed).
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

        # Round the ban width up to a power of two so that it rarely triggers a recompile.
        width = max(len(b) for b in banned) if rows else 0
        width = 1 << max(width - 1, 0).bit_length()
        banned_ids = np.full((rows, width), BAN_PAD, np.int32)
        for i, b in enumerate(banned):
            banned_ids[i, : len(b)] = b

        return jax.device_put(cls(temperature, top_k, top_p, min_p, rep, presence, frequency,
                                  seed_lo, seed_hi, stream, step, banned_ids))


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


def _top_k_top_p_keep(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] keep-mask of top-k then top-p (needs one descending sort over the vocab)."""
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    # top-k by value: the k-th largest logit is the cut-off (ties with it are kept, as in vLLM).
    kth = jnp.take_along_axis(sorted_desc, (top_k - 1)[:, None], axis=-1)
    in_top_k = sorted_desc >= kth
    # top-p on the renormalised top-k distribution: keep a token while the mass strictly before
    # it is < p. Rows with p = 1 keep everything (cumsum rounding could otherwise drop the tail).
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    # Both masks are prefixes of the sorted order; turn the prefix length into a logit threshold,
    # which avoids scattering the mask back to vocab order.
    n_keep = jnp.maximum(jnp.sum(in_top_k & in_top_p, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    return scaled >= threshold


def filter_mask(scaled: jax.Array, tensors: SamplingTensors,
                skip_rows: Optional[jax.Array] = None) -> jax.Array:
    """[B, V] bool: tokens allowed after top-k, top-p and min-p on temperature-scaled logits.

    skip_rows [B] bool marks rows whose mask is irrelevant (greedy); they never force the sort.
    """
    vocab = scaled.shape[-1]
    top_k = jnp.where((tensors.top_k <= 0) | (tensors.top_k > vocab), vocab, tensors.top_k)
    needs_sort = (top_k < vocab) | (tensors.top_p < 1.0)
    if skip_rows is not None:
        needs_sort &= ~skip_rows
    # Skip the O(V log V) sort entirely when no row in the batch uses top-k or top-p.
    keep = jax.lax.cond(jnp.any(needs_sort),
                        _top_k_top_p_keep,
                        lambda s, k, p: jnp.ones(s.shape, jnp.bool_),
                        scaled, top_k, tensors.top_p)
    # min-p: p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p). The ratio needs no softmax and
    # is unchanged by top-k/top-p (the max always survives), so it composes as a plain AND.
    # min_p = 0 gives log(0) = -inf: keeps everything.
    l_max = jnp.max(scaled, axis=-1, keepdims=True)
    keep &= scaled >= l_max + jnp.log(tensors.min_p)[:, None]
    return keep


def _ban(logits: jax.Array, banned_ids: jax.Array) -> jax.Array:
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, banned_ids].set(-jnp.inf, mode="drop")


@partial(jax.jit, static_argnames=("num_logprobs",))
def sample(logits: jax.Array, tensors: SamplingTensors,
           token_counts: Optional[jax.Array] = None, prompt_mask: Optional[jax.Array] = None,
           num_logprobs: int = 0) -> SamplerOutput:
    """Samples one token per row.

    logits [B, V] (cast to f32); token_counts [B, V] i32 counts of each token in the row's output so
    far; prompt_mask [B, V] bool tokens present in the prompt. Pass None for both to skip penalties.
    num_logprobs (static): k of the returned top-k raw logprobs (0 gives [B, 0] arrays).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)

    x = _ban(logits, tensors.banned_ids)
    x = apply_penalties(x, tensors, token_counts, prompt_mask)
    greedy = tensors.temperature < SAMPLING_EPS
    greedy_tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def sample_rows():
        # Greedy rows divide by 1 to stay finite; their result is replaced by argmax below.
        scaled = x / jnp.where(greedy, 1.0, tensors.temperature)[:, None]
        keep = filter_mask(scaled, tensors, skip_rows=greedy)
        # Gumbel-max: argmax(l + G) with G ~ Gumbel(0, 1) i.i.d. is a draw from softmax(l).
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(row_keys(tensors))
        sampled = jnp.argmax(jnp.where(keep, scaled, -jnp.inf) + gumbel, axis=-1).astype(jnp.int32)
        return jnp.where(greedy, greedy_tokens, sampled)

    # All-greedy batches (common in evals/benchmarks) skip the noise and filtering entirely.
    tokens = jax.lax.cond(jnp.all(greedy), lambda: greedy_tokens, sample_rows)

    chosen = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    if num_logprobs > 0:
        top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, num_logprobs)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return SamplerOutput(tokens, chosen, top_logprobs, top_ids.astype(jnp.int32))
