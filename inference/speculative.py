"""Speculative decoding core: proposers, exact rejection-sampling verification, adaptive k, metrics.

One speculative step of a request (the engine drives it):
    1. a proposer guesses up to k next tokens (`NgramProposer` on the host, or a draft model on the
       device, each guess drawn from q = `draft_probs_to_proposal` of the draft's logits;
       inference/spec_runner.py);
    2. the target model scores the last accepted token plus the k guesses in ONE forward, giving
       logits [k+1, V] (position i is the distribution of the token after guess i-1);
    3. `verify` accepts a prefix of the guesses and appends one target-sampled token, so every step
       emits between 1 and k+1 tokens.

Exactness (Leviathan et al. 2023, Chen et al. 2023): guess x_i drawn from q is accepted with
probability min(1, p(x_i) / q(x_i)); on the first rejection a token is drawn from
norm(max(0, p - q)); if all guesses survive, a bonus token is drawn from p at position k. The
emitted tokens are then distributed exactly as if sampled one by one from p, the target's
distribution after the SAME processing `inference.sampler.sample` applies (min_tokens ban,
penalties, temperature, top-k, top-p, min-p). Deterministic proposals (n-gram) are the special case
q = one-hot. Greedy rows accept while guess == argmax and then emit the argmax, so greedy output is
token-for-token identical with and without speculation.

Randomness: position i of a row uses the sampler's key for step `tensors.step + i` (`row_keys`):
its `categorical` draw for the replacement/bonus token, a `fold_in(ACCEPT_TAG)` of it for the accept
coin, and a `fold_in(DRAFT_TAG)` of it for a sampled draft guess. Hence
  * a step with no guesses (num_draft = 0) reproduces `sampler.sample` bit for bit;
  * the three uses are independent (the exactness proof needs the draft, the coin and the
    replacement noise to be independent);
  * no noise that influenced an emitted token is ever reused: the next step starts at
    step + num_output, and draws at positions after the first rejection were never looked at.
The engine must therefore advance `step` by `num_output` after each verify.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from inference.sampler import (BAN_PAD, SamplingTensors, apply_logits_processors, apply_penalties,
                               categorical, filter_mask, raw_logprobs, row_keys)
from inference.sampling_params import SAMPLING_EPS

# Padding value of `VerifyOutput.output_tokens` beyond `num_output`.
PAD_TOKEN = -1
# fold_in tags that split a position's key into independent streams (see module docstring).
ACCEPT_TAG = 0x5EC0_0001
DRAFT_TAG = 0x5EC0_0002


# ============================================================================ proposers (host)


class NgramProposer:
    """Prompt-lookup decoding: copy what followed the latest earlier occurrence of the history's suffix.

    For n from max_n down to min_n, take the last n tokens of the history, find their most recent
    earlier occurrence, and propose the (up to) k tokens that followed it. Longer matches win; among
    equally long ones the most recent wins. Proposals are deterministic, so verify with
    draft_probs=None (one-hot q).
    """

    def __init__(self, k: int, min_n: int = 1, max_n: int = 4):
        if k < 0 or not 1 <= min_n <= max_n:
            raise ValueError(f"need k >= 0 and 1 <= min_n <= max_n, got {k=}, {min_n=}, {max_n=}")
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, history: Sequence[int], k: Optional[int] = None) -> np.ndarray:
        """Up to k (default self.k) proposed tokens, int32 [<= k]; empty when nothing matches."""
        k = self.k if k is None else k
        h = np.asarray(history, dtype=np.int64)
        L = h.shape[0]
        if k <= 0 or L < 2:
            return np.zeros(0, np.int32)
        # Candidate match ends e < L-1 (something must follow them) whose token equals the last one.
        # Grow every candidate's match length backwards in lock-step: O(#candidates * max_n) numpy
        # work instead of scanning every window for every n.
        ends = np.flatnonzero(h[:-1] == h[-1])
        if ends.size == 0:
            return np.zeros(0, np.int32)
        length = np.ones(ends.shape, np.int64)
        alive = np.ones(ends.shape, bool)
        for t in range(1, min(self.max_n, L - 1)):
            idx = ends - t
            alive &= (idx >= 0) & (h[np.maximum(idx, 0)] == h[L - 1 - t])
            length += alive
        best = length.max()
        if best < self.min_n:
            return np.zeros(0, np.int32)
        end = ends[np.flatnonzero(length == best)[-1]]  # most recent among the longest
        return h[end + 1: end + 1 + k].astype(np.int32)


def draft_keys(tensors: SamplingTensors, offset) -> jax.Array:
    """[B] keys for sampling draft guess `offset` (scalar or [B]) of each row; independent of verify's."""
    step = tensors.step + jnp.asarray(offset, jnp.uint32)
    return jax.vmap(lambda k: jax.random.fold_in(k, DRAFT_TAG))(row_keys(tensors._replace(step=step)))


@partial(jax.jit, static_argnames=("greedy",))
def draft_probs_to_proposal(draft_logits: jax.Array, tensors: SamplingTensors, offset,
                            greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """Turns one draft-model step's logits [B, V] into (guess [B] i32, q [B, V] f32).

    q is the distribution the guess was ACTUALLY drawn from, which is what `verify` needs: the
    row's temperature and top-k/top-p/min-p applied to the draft logits (a q close to the target's
    p means high acceptance). Penalties are not applied to the draft: any q keeps verify exact, it
    only costs acceptance. Greedy rows (temperature 0), or all rows when `greedy` (static) is set,
    propose the argmax with a one-hot q. offset: index of this guess within the step (0..k-1),
    scalar or [B]; it selects the row's key (`draft_keys`).
    """
    logits = draft_logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax, jax.nn.one_hot(argmax, vocab, dtype=jnp.float32)
    is_greedy = tensors.temperature < SAMPLING_EPS
    scaled = logits / jnp.where(is_greedy, 1.0, tensors.temperature)[:, None]
    masked = jnp.where(filter_mask(scaled, tensors, skip_rows=is_greedy), scaled, -jnp.inf)
    sampled = categorical(draft_keys(tensors, offset), masked)
    token = jnp.where(is_greedy, argmax, sampled)
    q = jnp.where(is_greedy[:, None], jax.nn.one_hot(argmax, vocab, dtype=jnp.float32),
                  jax.nn.softmax(masked, axis=-1))
    return token, q


# ============================================================================ verification (device)


class VerifyOutput(NamedTuple):
    accepted_counts: jax.Array  # [B] i32 guesses accepted (<= num_draft)
    output_tokens: jax.Array    # [B, K+1] i32 accepted guesses then the target's token; PAD_TOKEN after
    num_output: jax.Array       # [B] i32 = accepted_counts + 1
    chosen_logprob: jax.Array   # [B, K+1] f32 raw logprob of each output token (0 on padding)
    top_logprobs: jax.Array     # [B, K+1, n] f32 raw top-n logprobs per position (n = num_logprobs)
    top_ids: jax.Array          # [B, K+1, n] i32


def _expand_rows(tensors: SamplingTensors, positions: int, ban_len: Optional[jax.Array]) -> SamplingTensors:
    """Repeats every row's tensors for its K+1 positions (row-major), with step + i at position i.

    The min_tokens ban applies at position i only while i < ban_len (it lifts once the request has
    generated min_tokens tokens, possibly in the middle of the speculated block).
    """
    rep = lambda a: jnp.repeat(a, positions, axis=0)
    flat = jax.tree.map(rep, tensors)
    pos = jnp.tile(jnp.arange(positions, dtype=jnp.uint32), tensors.step.shape[0])
    banned = flat.banned_ids
    if ban_len is not None:
        active = pos < rep(jnp.asarray(ban_len, jnp.int32)).astype(jnp.uint32)
        banned = jnp.where(active[:, None], banned, BAN_PAD)
    return flat._replace(step=flat.step + pos, banned_ids=banned)


@partial(jax.jit, static_argnames=("num_logprobs",))
def verify(target_logits: jax.Array, draft_tokens: jax.Array, draft_probs: Optional[jax.Array],
           num_draft: jax.Array, tensors: SamplingTensors, keys: Optional[jax.Array] = None, *,
           token_counts: Optional[jax.Array] = None, prompt_mask: Optional[jax.Array] = None,
           ban_len: Optional[jax.Array] = None, num_logprobs: Optional[int] = 0) -> VerifyOutput:
    """Exact speculative verification of a batch whose rows have different numbers of guesses.

    target_logits [B, K+1, V]: row b's position i is the target's distribution after guess i-1
        (position 0 = after the last accepted token). Positions past num_draft[b] are ignored.
    draft_tokens [B, K] i32: guesses; entries at i >= num_draft[b] are padding (any value).
    draft_probs [B, K, V] or None: the draft distribution q each guess was drawn from; None means
        deterministic guesses (n-gram, greedy draft): q = one-hot.
    num_draft [B] i32: guesses per row, 0..K (0 = plain sampling step, same result as `sample`).
    tensors: the rows' `SamplingTensors` for the FIRST position (step = tokens generated so far).
    keys: optional [B] typed PRNG keys replacing the (seed, stream, step) derivation; position i
        then uses fold_in(keys[b], i). Default None: the sampler's keys (see module docstring).
    token_counts [B, V] i32 / prompt_mask [B, V] bool: penalty state before this step, as for
        `sample` (None/None: no penalties). Guesses are added to the counts of later positions.
    ban_len [B] i32: number of leading positions the min_tokens ban (`tensors.banned_ids`)
        applies to, i.e. max(min_tokens - step, 0); None: all positions.
    num_logprobs (static): n of the returned raw top-n logprobs (None: no logprobs at all, as `sample`).
    """
    B, K1, V = target_logits.shape
    K = K1 - 1
    logits = target_logits.astype(jnp.float32).reshape(B * K1, V)
    num_draft = jnp.clip(jnp.asarray(num_draft, jnp.int32), 0, K)
    valid = jnp.arange(K)[None, :] < num_draft[:, None]            # [B, K] real guesses
    guesses = jnp.clip(draft_tokens.astype(jnp.int32), 0, V - 1)   # safe gather index for padding
    flat = _expand_rows(tensors, K1, ban_len)

    # The target's processed logits at every position, exactly as `sample` would see them if the
    # guesses before that position had been emitted one by one.
    x = apply_logits_processors(logits, flat)
    if token_counts is not None or prompt_mask is not None:
        base = jnp.zeros((B, V), jnp.int32) if token_counts is None else token_counts.astype(jnp.int32)
        added = jax.nn.one_hot(jnp.where(valid, guesses, -1), V, dtype=jnp.int32)  # -1 -> zeros
        before = jnp.cumsum(jnp.concatenate([jnp.zeros((B, 1, V), jnp.int32), added], 1), axis=1)
        counts = (base[:, None] + before).reshape(B * K1, V)
        mask = None if prompt_mask is None else jnp.repeat(prompt_mask, K1, axis=0)
        x = apply_penalties(x, flat, counts, mask)
    greedy = tensors.temperature < SAMPLING_EPS                      # [B]
    argmax = jnp.argmax(x, axis=-1).astype(jnp.int32).reshape(B, K1)

    def accepted_prefix(accept):  # [B, K] bool -> [B] i32 length of the all-accepted prefix
        return jnp.sum(jnp.cumprod((accept & valid).astype(jnp.int32), axis=1), axis=1)

    # [B, K+1] keys, one per position: the sampler's key at step + i, or fold_in(keys[b], i).
    if keys is None:
        pos_keys = row_keys(flat)
    else:
        offsets = jnp.tile(jnp.arange(K1, dtype=jnp.uint32), B)
        pos_keys = jax.vmap(jax.random.fold_in)(jnp.repeat(keys, K1), offsets)
    pos_keys = pos_keys.reshape(B, K1)
    rows = jnp.arange(B)

    def greedy_rows():
        n_acc = accepted_prefix(guesses == argmax[:, :K])
        return n_acc, argmax[rows, n_acc]

    def sampled_rows():
        flat_greedy = jnp.repeat(greedy, K1)
        scaled = x / jnp.where(flat_greedy, 1.0, flat.temperature)[:, None]
        masked = jnp.where(filter_mask(scaled, flat, skip_rows=flat_greedy), scaled, -jnp.inf)
        masked = masked.reshape(B, K1, V)
        log_p = jax.nn.log_softmax(masked, axis=-1)
        p_x = jnp.exp(jnp.take_along_axis(log_p[:, :K], guesses[..., None], axis=-1)[..., 0])
        if draft_probs is None:
            q_x = jnp.ones((B, K), jnp.float32)
        else:
            q_x = jnp.take_along_axis(draft_probs.astype(jnp.float32), guesses[..., None], axis=-1)[..., 0]
        # Accept coin per position: u < p/q, written as u*q < p (no division; q = 0 with p > 0
        # accepts, p = 0 always rejects).
        coin = lambda k: jax.random.uniform(jax.random.fold_in(k, ACCEPT_TAG))
        u = jax.vmap(coin)(pos_keys[:, :K].reshape(-1)).reshape(B, K)
        n_acc = accepted_prefix(u * q_x < p_x)
        n_acc = jnp.where(greedy, accepted_prefix(guesses == argmax[:, :K]), n_acc)

        # One target draw per row, at the stopping position n_acc only: from the residual
        # max(0, p - q) after a rejection, or from p itself (bonus) when every guess survived.
        masked_j = masked[rows, n_acc]                                # [B, V]
        p_j = jnp.exp(log_p[rows, n_acc])
        # q at the stopping position; only read after a rejection, where n_acc < num_draft <= K.
        j = jnp.minimum(n_acc, K - 1)
        if K == 0:
            q_j = jnp.zeros((B, V), jnp.float32)
        elif draft_probs is None:
            q_j = jax.nn.one_hot(guesses[rows, j], V, dtype=jnp.float32)
        else:
            q_j = draft_probs[rows, j].astype(jnp.float32)
        residual = jnp.maximum(p_j - q_j, 0.0)
        # An all-zero residual only arises from rounding when p == q (rejection then has
        # probability ~0); fall back to p rather than sampling from nothing.
        rejected = (n_acc < num_draft) & jnp.any(residual > 0, axis=-1)
        dist = jnp.where(rejected[:, None], jnp.where(residual > 0, jnp.log(residual), -jnp.inf), masked_j)
        sampled = categorical(pos_keys[rows, n_acc], dist)
        return n_acc, jnp.where(greedy, argmax[rows, n_acc], sampled)

    # All-greedy batches skip the sort, the softmaxes and the noise, like `sample`.
    n_acc, final = jax.lax.cond(jnp.all(greedy), greedy_rows, sampled_rows)

    pos = jnp.arange(K1)[None, :]
    out = jnp.where(pos < n_acc[:, None], jnp.pad(guesses, ((0, 0), (0, 1))), PAD_TOKEN)
    out = jnp.where(pos == n_acc[:, None], final[:, None], out).astype(jnp.int32)
    emitted = pos <= n_acc[:, None]
    chosen, top_logprobs, top_ids = raw_logprobs(logits, jnp.maximum(out, 0).reshape(B * K1), num_logprobs)
    chosen = jnp.where(emitted, chosen.reshape(B, K1), 0.0)
    return VerifyOutput(n_acc.astype(jnp.int32), out, (n_acc + 1).astype(jnp.int32), chosen,
                        top_logprobs.reshape(B, K1, -1), top_ids.reshape(B, K1, -1))


# ============================================================================ adaptive k (host)


class AdaptiveK:
    """Per-request choice of how many tokens to speculate, from the observed acceptance.

    The estimate is the per-guess acceptance probability alpha, not accepted/proposed: a step
    stops at its first rejection, so it is a run of Bernoulli trials with `accepted` successes out
    of `accepted + (1 if a guess was rejected else 0)` trials. EMAs of successes and trials give an
    estimate that does not depend on k (accepted/proposed would penalise long proposals).

    Policy, once per verify step: alpha >= grow_above -> k + 1 (up to k_max); alpha < shrink_below
    -> k - 1 (down to k_min); alpha < disable_below for `patience` consecutive steps -> k = 0 (no
    speculation). While disabled, every `probe_every` steps one probe step with k_min guesses is
    made; it re-enables speculation at k_min if the updated alpha is back above disable_below.
    """

    def __init__(self, k_max: int, k_min: int = 1, k_init: Optional[int] = None, decay: float = 0.7,
                 grow_above: float = 0.75, shrink_below: float = 0.5, disable_below: float = 0.2,
                 patience: int = 4, probe_every: int = 32):
        if not 1 <= k_min <= k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {k_min=}, {k_max=}")
        if not 0.0 <= disable_below <= shrink_below <= grow_above <= 1.0:
            raise ValueError("need 0 <= disable_below <= shrink_below <= grow_above <= 1")
        self.k_max, self.k_min, self.decay = k_max, k_min, decay
        self.grow_above, self.shrink_below, self.disable_below = grow_above, shrink_below, disable_below
        self.patience, self.probe_every = patience, probe_every
        self._k = k_max if k_init is None else min(max(k_init, k_min), k_max)
        self._successes = self._trials = 0.0
        self._low_streak = 0
        self.disabled = False
        self._since_probe = 0

    @property
    def alpha(self) -> Optional[float]:
        """Estimated per-guess acceptance probability (None before any guess was verified)."""
        return self._successes / self._trials if self._trials > 0 else None

    def next_k(self) -> int:
        """Guesses to propose for the next step (0 = plain decoding step)."""
        if self.disabled:
            return self.k_min if self._since_probe >= self.probe_every else 0
        return self._k

    def update(self, num_draft: int, num_accepted: int) -> None:
        """Records one verify step of this request (call it for k = 0 steps too)."""
        if num_draft <= 0:  # nothing proposed (disabled, or the proposer found no match)
            self._since_probe += self.disabled
            return
        rejected = num_accepted < num_draft
        self._successes = self.decay * self._successes + num_accepted
        self._trials = self.decay * self._trials + num_accepted + rejected
        alpha = self.alpha
        if self.disabled:  # this was a probe
            self._since_probe = 0
            if alpha >= self.disable_below:
                self.disabled, self._k, self._low_streak = False, self.k_min, 0
            return
        self._low_streak = self._low_streak + 1 if alpha < self.disable_below else 0
        if self._low_streak >= self.patience:
            self.disabled, self._since_probe = True, 0
        elif alpha >= self.grow_above:
            self._k = min(self._k + 1, self.k_max)
        elif alpha < self.shrink_below:
            self._k = max(self._k - 1, self.k_min)


# ============================================================================ metrics (host)


def acceptance_rate(num_accepted, num_draft) -> float:
    """Accepted guesses / proposed guesses over all given steps (0 if nothing was proposed)."""
    total = int(np.sum(num_draft))
    return float(np.sum(num_accepted)) / total if total else 0.0


def mean_tokens_per_forward(num_output) -> float:
    """Mean tokens emitted per (row, target forward); 1.0 means speculation gained nothing."""
    n = np.asarray(num_output)
    return float(n.mean()) if n.size else 0.0


@dataclasses.dataclass
class SpecDecodeStats:
    """Running totals over verify steps (one entry per row per step)."""

    num_steps: int = 0            # (row, target forward) pairs, including k = 0 rows
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_output_tokens: int = 0
    accepted_at_position: list = dataclasses.field(default_factory=list)  # [i]: steps accepting guess i

    def update(self, num_draft, accepted_counts, num_output=None) -> None:
        num_draft = np.asarray(num_draft, np.int64).reshape(-1)
        acc = np.asarray(accepted_counts, np.int64).reshape(-1)
        out = acc + 1 if num_output is None else np.asarray(num_output, np.int64).reshape(-1)
        self.num_steps += num_draft.size
        self.num_draft_tokens += int(num_draft.sum())
        self.num_accepted_tokens += int(acc.sum())
        self.num_output_tokens += int(out.sum())
        k = int(num_draft.max(initial=0))
        if len(self.accepted_at_position) < k:
            self.accepted_at_position += [0] * (k - len(self.accepted_at_position))
        for i in range(k):
            self.accepted_at_position[i] += int((acc > i).sum())

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_tokens_per_forward(self) -> float:
        return self.num_output_tokens / self.num_steps if self.num_steps else 0.0
