"""Roofline report: what one model step *should* cost on this machine, and what it does cost.

Three parts, each usable alone:

1. `step_cost`: an analytic count of the FLOPs and bytes of one model step (prefill or decode) from the
   config alone. Ideal-implementation numbers: every weight is streamed once per step, K/V is read once
   per layer, activations cross memory once per matmul. It is the yardstick, not a model of XLA's program.
2. `measure_machine`: the machine's attainable peaks measured in this process (streaming reductions for
   bandwidth, a large matmul for FLOP/s), so prediction and measurement share the same device and runtime.
3. `predict_time` (roofline: max of the compute time and the memory time) vs `measure_step_time` (the real
   jitted step from `model.llama.make_step_fn`), gathered by `roofline_report` into rows that
   `format_table`, `to_json` and `plot_roofline` render.

Conventions: `context_len` of a decode step is the number of tokens already cached per sequence (the
step adds one more); for a prefill step the "context" column is the prompt length (nothing cached).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from typing import Optional, Sequence

import numpy as np

from model.config import LlamaConfig

PHASES = ("decode", "prefill")

# Layer projections (params["layers"]); see docs/DESIGN.md. Kept here to avoid importing model code
# (and hence JAX kernels) for the pure cost model.
_PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


# ----------------------------------------------------------------------------------------------------
# 1. Analytic cost model
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one model step. The first seven fields are the roofline inputs; the rest is
    the breakdown they are made of (all counts are totals over the whole step, all layers)."""

    flops: float
    weight_bytes: float  # every weight the step reads, incl. the gathered embedding rows
    kv_read_bytes: float
    kv_write_bytes: float
    activation_bytes: float
    total_bytes: float
    arithmetic_intensity: float  # flops / total_bytes
    # breakdown
    tokens: int = 0  # new tokens in the step (batch * new_tokens_per_seq)
    logits_rows: int = 0
    projection_flops: float = 0.0  # q, k, v, o, gate, up, down
    attention_flops: float = 0.0  # QK^T and PV
    lm_head_flops: float = 0.0
    embed_gather_bytes: float = 0.0  # part of weight_bytes: only the rows of this step's tokens
    head_weight_bytes: float = 0.0  # part of weight_bytes: lm_head, or the embedding table when tied

    @property
    def kv_bytes(self) -> float:
        return self.kv_read_bytes + self.kv_write_bytes


def quantized_bytes_per_param(bits: int, group_size: Optional[int] = None, scale_bytes: float = 4.0,
                              has_zeros: Optional[bool] = None, in_features: int = 1) -> float:
    """Stored bytes per weight of a `model.quantize.QuantizedWeight`: packed values plus scales (and zeros).

    int8 with group_size None has one scale per output channel (amortised over `in_features` rows);
    int4 is asymmetric (scales and zeros per group) unless has_zeros=False.
    """
    if has_zeros is None:
        has_zeros = bits == 4
    per_group = group_size if group_size else in_features
    return bits / 8 + scale_bytes * (2 if has_zeros else 1) / per_group


# Bytes per matmul weight for the usual formats (int8: per-channel, int4: G=64 with f32 scales and zeros).
WEIGHT_BYTES = {"f32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": quantized_bytes_per_param(4, 64)}


def step_cost(cfg: LlamaConfig, *, batch: int, context_len: int, new_tokens_per_seq: int,
              weight_bytes_per_param: float = 4.0, float_bytes_per_param: Optional[float] = None,
              head_bytes_per_param: Optional[float] = None, kv_bytes_per_elem: float = 4.0,
              act_bytes_per_elem: float = 4.0, logits_rows: Optional[int] = None) -> StepCost:
    """Cost of one step: `batch` sequences, each with `context_len` tokens already in the KV cache and
    `new_tokens_per_seq` new tokens (decode: 1; prefill: the prompt length with context_len 0; chunked
    prefill: both non-zero).

    Bytes per element:
      weight_bytes_per_param: layer projections (4 f32, 2 bf16, ~1 int8, ~0.5 + scales int4; see WEIGHT_BYTES).
      float_bytes_per_param:  parameters never quantized: embedding table, norms, biases
                              (default: weight_bytes_per_param, i.e. an unquantized model).
      head_bytes_per_param:   the lm_head matrix (default: float_bytes_per_param; with tied embeddings the
                              head *is* the embedding table).
      kv_bytes_per_elem, act_bytes_per_elem: KV cache and activation dtypes.
    logits_rows: rows whose logits are computed (default: the last token of every sequence = batch).

    FLOPs (a multiply-add = 2):
      projections  2 * tokens * K * N for q, k, v, o, gate, up, down in every layer;
      lm_head      2 * logits_rows * d * vocab (only the rows whose logits are returned);
      attention    4 * heads * head_dim per (query, key) pair (QK^T and PV); causal: new token i of a
                   sequence sees context_len + i + 1 keys, so a prefill counts P(P+1)/2 pairs (about half
                   of P^2) and a decode counts context_len + 1.
      Norms, RoPE, softmax and SiLU are O(tokens * d) and left out (they are < 1% here).
    Bytes (each crosses memory once: the ideal, fused implementation):
      weights      every layer's projections, norms (and biases) read once per step, whatever the batch;
                   the head matrix read once if any logits are computed; the embedding table is *gathered*:
                   only `tokens` rows are read (embed_gather_bytes), never the whole table.
      KV read      every cached K and V (context_len tokens per sequence) of every layer; the new tokens'
                   K/V is consumed on chip by the fused kernel, so it is only counted as written.
      KV written   the new tokens' K and V for every layer.
      activations  every projection reads its input and writes its output, attention reads q and writes its
                   output, the gathered embeddings are written and the f32 logits rows are written. A lower
                   bound (no spills, norms and residuals fused); negligible for decode.
    """
    if batch < 1 or new_tokens_per_seq < 1 or context_len < 0:
        raise ValueError(f"need batch >= 1, new_tokens_per_seq >= 1, context_len >= 0; got "
                         f"{batch=}, {new_tokens_per_seq=}, {context_len=}")
    fb = weight_bytes_per_param if float_bytes_per_param is None else float_bytes_per_param
    hb = fb if head_bytes_per_param is None else head_bytes_per_param
    d, f, hd, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers, cfg.vocab_size
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    tokens = batch * new_tokens_per_seq
    rows = batch if logits_rows is None else logits_rows

    # Parameters of one layer: projections ([in, out] each) and the small float ones.
    proj_params = d * qd + 2 * d * kvd + qd * d + 3 * d * f
    small_params = 2 * d + ((qd + 2 * kvd) if cfg.attention_bias else 0)

    projection_flops = 2 * tokens * proj_params * L
    lm_head_flops = 2 * rows * d * V
    q = new_tokens_per_seq
    pairs_per_seq = q * context_len + q * (q + 1) // 2  # (query, key) pairs under the causal mask
    attention_flops = 4 * cfg.num_heads * hd * batch * pairs_per_seq * L
    flops = projection_flops + attention_flops + lm_head_flops

    embed_gather_bytes = tokens * d * fb
    head_weight_bytes = d * V * hb if rows > 0 else 0.0
    weight_bytes = (L * (proj_params * weight_bytes_per_param + small_params * fb) + d * fb  # + final norm
                    + head_weight_bytes + embed_gather_bytes)

    kv_per_token = 2 * L * kvd * kv_bytes_per_elem  # K and V, all layers
    kv_read_bytes = batch * context_len * kv_per_token
    kv_write_bytes = tokens * kv_per_token

    # Elements in + out of: q, k, v (each reads h), attention (q in, out), o, gate, up (each reads h), down.
    act_per_token_layer = (3 * d + (qd + 2 * kvd)) + 2 * qd + (qd + d) + (2 * d + 2 * f) + (f + d)
    activation_bytes = (tokens * (L * act_per_token_layer + d) * act_bytes_per_elem  # + embedding rows out
                        + rows * d * act_bytes_per_elem + rows * V * 4)  # head input, f32 logits out

    total_bytes = weight_bytes + kv_read_bytes + kv_write_bytes + activation_bytes
    return StepCost(
        flops=float(flops), weight_bytes=float(weight_bytes), kv_read_bytes=float(kv_read_bytes),
        kv_write_bytes=float(kv_write_bytes), activation_bytes=float(activation_bytes),
        total_bytes=float(total_bytes), arithmetic_intensity=float(flops / total_bytes),
        tokens=tokens, logits_rows=rows, projection_flops=float(projection_flops),
        attention_flops=float(attention_flops), lm_head_flops=float(lm_head_flops),
        embed_gather_bytes=float(embed_gather_bytes), head_weight_bytes=float(head_weight_bytes))


def phase_cost(cfg: LlamaConfig, phase: str, batch: int, context_len: int, **byte_kwargs) -> StepCost:
    """step_cost of a decode step (1 new token after context_len cached ones) or of a fresh prefill of
    context_len prompt tokens. byte_kwargs go to step_cost (weight_bytes_per_param, ...)."""
    if phase == "decode":
        return step_cost(cfg, batch=batch, context_len=context_len, new_tokens_per_seq=1, **byte_kwargs)
    if phase == "prefill":
        return step_cost(cfg, batch=batch, context_len=0, new_tokens_per_seq=context_len, **byte_kwargs)
    raise ValueError(f"phase={phase!r} is not one of {PHASES}")


def _nbytes_and_size(w) -> tuple[int, int]:
    """(stored bytes, logical weight count) of a float array or a QuantizedWeight (whose nbytes counts
    values + scales + zeros and whose shape is the logical float shape)."""
    return int(w.nbytes), int(np.prod(w.shape))


def byte_kwargs_from_params(params: dict, cfg: LlamaConfig, cache_dtype=None) -> dict:
    """step_cost's bytes-per-element arguments read off a real params pytree (float or quantized).

    The KV dtype defaults to the embedding's dtype (what measure_step_time allocates); an int8 pool counts
    its per-token scales too."""
    from model.llama import kv_bytes_per_token_elem

    layers = params["layers"]
    if isinstance(layers, (list, tuple)):  # unstacked (model.llama.unstack_layers): every layer alike
        layers = layers[0]
    proj = [_nbytes_and_size(layers[k]) for k in _PROJECTIONS]
    embed = params["embed"]
    float_bytes = np.dtype(embed.dtype).itemsize
    head = params.get("lm_head")
    head_bytes = float_bytes if head is None else np.divide(*_nbytes_and_size(head))
    kv_dtype = embed.dtype if cache_dtype is None else cache_dtype
    return dict(weight_bytes_per_param=sum(b for b, _ in proj) / sum(n for _, n in proj),
                float_bytes_per_param=float(float_bytes), head_bytes_per_param=float(head_bytes),
                kv_bytes_per_elem=kv_bytes_per_token_elem(cfg.head_dim, kv_dtype),
                act_bytes_per_elem=float(float_bytes))


# ----------------------------------------------------------------------------------------------------
# 2. Machine peaks
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MachinePeaks:
    """Attainable peaks measured in this process.

    bandwidth_bytes_per_s is the *read* bandwidth (streaming reductions): a model step is >95% reads
    (weights, KV), and on CPUs a read-only stream is often slower than what a copy moves in total
    (on this project's 2-core dev VM: ~38 GB/s read vs ~60 GB/s read + write), so a copy-based slope would
    promise a decode time no implementation can reach. The copy figure is kept for reference."""

    bandwidth_bytes_per_s: float
    flops_per_s: float
    device_kind: str
    platform: str = ""
    copy_bandwidth_bytes_per_s: float = 0.0
    read_bandwidth_bytes_per_s: float = 0.0
    matmul_dtype: str = ""
    matmul_size: int = 0
    bandwidth_array_bytes: int = 0
    # Bytes/s a stream of matrix-vector products reaches through XLA's own dot (the operation a decode
    # step is made of). Below the read bandwidth when the backend's GEMV can't saturate memory (XLA:CPU
    # reaches ~2/3 of it); 0 when not measured.
    matvec_bandwidth_bytes_per_s: float = 0.0

    @property
    def attainable_bandwidth_bytes_per_s(self) -> float:
        """The slope predictions use: the matvec stream if measured (what weights can actually be streamed
        at), else the read bandwidth. '% of peak' columns stay relative to the read bandwidth."""
        if self.matvec_bandwidth_bytes_per_s > 0:
            return min(self.matvec_bandwidth_bytes_per_s, self.bandwidth_bytes_per_s)
        return self.bandwidth_bytes_per_s

    @property
    def ridge_intensity(self) -> float:
        """FLOP/byte where the compute ceiling meets the bandwidth slope."""
        return self.flops_per_s / self.bandwidth_bytes_per_s


def _best_time(fn, budget_s: float, min_reps: int = 3, max_reps: int = 50) -> float:
    """Best wall time of fn() (which must block) over repetitions filling budget_s, after one warm-up."""
    fn()  # compile + first touch of the buffers
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_machine(device=None, seconds: float = 3.0, *, bandwidth_mib: int = 256,
                    matmul_size: Optional[int] = None) -> MachinePeaks:
    """Measures peak memory bandwidth and matmul FLOP/s on `device` (default: jax.devices()[0]).

    Bandwidth (a bandwidth_mib f32 array, far larger than any cache): the read bandwidth is the best of
    two reductions, `sum(x)` and row sums of x viewed as [1024, -1] (bytes = read); it is the roofline slope
    (see MachinePeaks). The copy bandwidth is `x + 1` with x *donated* so it runs in place (bytes = read +
    write; without donation each call faults in a fresh output buffer, which on CPU measures page faults).
    Compute: an N x N x N matmul, f32 on CPU (what the f32 model runs) and bf16 on accelerators.
    Each figure is the best of several repetitions after a warm-up, within about `seconds` in total.
    """
    import jax
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    on_cpu = device.platform == "cpu"
    budget = seconds / 4

    n_elems = bandwidth_mib * 2**20 // 4 // 1024 * 1024
    x_bytes = n_elems * 4
    state = {"x": jax.device_put(jnp.zeros((n_elems,), jnp.float32), device)}
    add_one = jax.jit(lambda x: x + 1.0, donate_argnums=0)

    def copy_step():
        state["x"] = jax.block_until_ready(add_one(state["x"]))

    copy_bw = 2 * x_bytes / _best_time(copy_step, budget)

    def read_time(reduce):
        reduce = jax.jit(reduce)
        return _best_time(lambda: jax.block_until_ready(reduce(state["x"])), budget)

    read_bw = x_bytes / min(read_time(jnp.sum), read_time(lambda x: jnp.sum(x.reshape(1024, -1), axis=1)))
    del state["x"]

    # Matrix-vector stream: [1, 1024] @ [1024, 1024] over bandwidth_mib of separate weight matrices.
    mv_dtype = jnp.float32 if on_cpu else jnp.bfloat16
    num_mats = max(1, bandwidth_mib * 2**20 // (1024 * 1024 * jnp.dtype(mv_dtype).itemsize))
    mats = [jax.device_put(jnp.full((1024, 1024), 0.001 * i, mv_dtype), device) for i in range(num_mats)]
    vec = jax.device_put(jnp.ones((1, 1024), mv_dtype), device)
    matvecs = jax.jit(lambda v, ms: sum(jnp.sum(v @ m, dtype=jnp.float32) for m in ms))
    matvec_bw = sum(m.nbytes for m in mats) / _best_time(lambda: jax.block_until_ready(matvecs(vec, mats)), budget)
    del mats

    n = matmul_size or (2048 if on_cpu else 8192)
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (n, n), dtype), device)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=dtype))
    flops_per_s = 2 * n**3 / _best_time(lambda: jax.block_until_ready(matmul(a, b)), budget)

    return MachinePeaks(bandwidth_bytes_per_s=read_bw, flops_per_s=flops_per_s,
                        device_kind=device.device_kind, platform=device.platform,
                        copy_bandwidth_bytes_per_s=copy_bw, read_bandwidth_bytes_per_s=read_bw,
                        matmul_dtype=jnp.dtype(dtype).name, matmul_size=n, bandwidth_array_bytes=x_bytes,
                        matvec_bandwidth_bytes_per_s=matvec_bw)


# ----------------------------------------------------------------------------------------------------
# 3. Prediction and measurement
# ----------------------------------------------------------------------------------------------------


def predict_time(cost: StepCost, peaks: MachinePeaks) -> float:
    """Roofline time: the step cannot beat its compute time nor its memory time (bytes over the attainable
    streaming bandwidth, see MachinePeaks.attainable_bandwidth_bytes_per_s)."""
    return max(cost.flops / peaks.flops_per_s, cost.total_bytes / peaks.attainable_bandwidth_bytes_per_s)


def bound(cost: StepCost, peaks: MachinePeaks) -> str:
    """"compute" if the compute time bounds the step (intensity at or past the ridge point of the slope
    predictions use), else "memory"."""
    compute_s = cost.flops / peaks.flops_per_s
    return "compute" if compute_s >= cost.total_bytes / peaks.attainable_bandwidth_bytes_per_s else "memory"


def _pages(batch: int, kv_len: int, page_size: int, contiguous: bool, rng: np.random.Generator):
    """Block table [batch, pages_per_seq]: sequence s owns pages s*P..s*P+P-1, or a random permutation of
    all pages (arbitrary placement: the attention kernel must not care)."""
    per_seq = -(-kv_len // page_size)
    ids = np.arange(batch * per_seq, dtype=np.int32)
    if not contiguous:
        ids = rng.permutation(ids).astype(np.int32)
    return ids.reshape(batch, per_seq)


def benchmark_step_inputs(cfg: LlamaConfig, batch: int, context_len: int, phase: str, *, page_size: int = 16,
                          contiguous: bool = True, seed: int = 0):
    """(StepInputs, num_pages) of a decode step (batch sequences x 1 new token after context_len cached
    ones) or a prefill step (batch fresh prompts of context_len tokens), random token ids."""
    from model.llama import StepInputs
    import jax.numpy as jnp

    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not one of {PHASES}")
    rng = np.random.default_rng(seed)
    q_len, start = (1, context_len) if phase == "decode" else (context_len, 0)
    kv_len = start + q_len
    tables = _pages(batch, kv_len, page_size, contiguous, rng)
    positions = np.tile(np.arange(start, kv_len, dtype=np.int32), batch)
    seq = np.repeat(np.arange(batch), q_len)
    slots = tables[seq, positions // page_size] * page_size + positions % page_size
    cu_q_lens = np.arange(batch + 1, dtype=np.int32) * q_len
    inputs = StepInputs(
        tokens=jnp.asarray(rng.integers(0, cfg.vocab_size, batch * q_len, dtype=np.int32)),
        positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(slots.astype(np.int32)),
        cu_q_lens=jnp.asarray(cu_q_lens),
        kv_lens=jnp.asarray(np.full(batch, kv_len, np.int32)),
        block_tables=jnp.asarray(tables),
        num_seqs=jnp.asarray(np.array([batch], np.int32)),
        logits_indices=jnp.asarray(cu_q_lens[1:] - 1),  # last token of each sequence
    )
    return inputs, tables.size


def measure_step_time(cfg: LlamaConfig, params, batch: int, context_len: int, phase: str, *, runs: int = 5,
                      warmup: int = 2, page_size: int = 16, cache_dtype=None, contiguous: bool = True,
                      dense_prefill: bool = True, attn_impl: str = "auto",
                      pool_pages: Optional[int] = None, statistic: str = "median") -> float:
    """Median wall time (s) of the real jitted model step, after compiling and `warmup` extra calls.
    statistic="min" gives the best run instead (like the machine peaks; steadier on a shared machine).

    The cache is zeros (content does not change the work); it is donated and threaded through the calls
    exactly like the engine does. Prefill of fresh prompts uses the dense flash-attention path
    (dense_prefill_len = prompt length) unless dense_prefill=False (then the ragged paged path).
    pool_pages: pages per layer in the KV pool (default: just the pages the batch uses); an engine-sized
    pool shows whether the step's cost depends on the pool size (it should not).
    """
    import jax
    from model.llama import init_cache, make_step_fn

    inputs, num_pages = benchmark_step_inputs(cfg, batch, context_len, phase, page_size=page_size,
                                              contiguous=contiguous)
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic={statistic!r} must be 'median' or 'min'")
    if pool_pages is not None and pool_pages < num_pages:
        raise ValueError(f"pool_pages={pool_pages} < {num_pages} pages needed by the batch")
    cache = init_cache(cfg, pool_pages or num_pages, page_size, cache_dtype or params["embed"].dtype)
    step = make_step_fn(cfg, attn_impl, context_len if (phase == "prefill" and dense_prefill) else None)
    times = []
    for i in range(1 + warmup + runs):  # the first call compiles
        t0 = time.perf_counter()
        logits, cache = step(params, cache, inputs)
        jax.block_until_ready((logits, cache))
        if i > warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) if statistic == "median" else min(times)


# ----------------------------------------------------------------------------------------------------
# 4. Report
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One (phase, batch, context) point of the report. Measured fields are None when not measured."""

    phase: str
    batch: int
    context_len: int  # decode: cached tokens per sequence; prefill: prompt length
    tokens: int
    flops: float
    weight_bytes: float
    kv_bytes: float  # read + written
    activation_bytes: float
    total_bytes: float
    intensity: float  # FLOP / byte
    bound: str  # "memory" or "compute"
    predicted_s: float
    measured_s: Optional[float] = None
    achieved_flops_per_s: Optional[float] = None
    achieved_bytes_per_s: Optional[float] = None
    flops_fraction: Optional[float] = None  # of peaks.flops_per_s
    bandwidth_fraction: Optional[float] = None  # of peaks.bandwidth_bytes_per_s
    measured_over_predicted: Optional[float] = None

    @property
    def label(self) -> str:
        return f"{self.phase} b{self.batch} c{self.context_len}"


def make_row(phase: str, batch: int, context_len: int, cost: StepCost, peaks: MachinePeaks,
             measured_s: Optional[float] = None) -> Row:
    row = Row(phase=phase, batch=batch, context_len=context_len, tokens=cost.tokens, flops=cost.flops,
              weight_bytes=cost.weight_bytes, kv_bytes=cost.kv_bytes, activation_bytes=cost.activation_bytes,
              total_bytes=cost.total_bytes, intensity=cost.arithmetic_intensity, bound=bound(cost, peaks),
              predicted_s=predict_time(cost, peaks))
    if measured_s is None:
        return row
    flops_rate, bytes_rate = cost.flops / measured_s, cost.total_bytes / measured_s
    return dataclasses.replace(
        row, measured_s=measured_s, achieved_flops_per_s=flops_rate, achieved_bytes_per_s=bytes_rate,
        flops_fraction=flops_rate / peaks.flops_per_s, bandwidth_fraction=bytes_rate / peaks.bandwidth_bytes_per_s,
        measured_over_predicted=measured_s / row.predicted_s)


def roofline_report(cfg: LlamaConfig, params, batches: Sequence[int], context_lens: Sequence[int],
                    peaks: MachinePeaks, *, phases: Sequence[str] = PHASES, measure: bool = True, runs: int = 5,
                    page_size: int = 16, dense_prefill: bool = True, statistic: str = "median",
                    cache_dtype=None) -> list[Row]:
    """One Row per (phase, batch, context_len). Byte sizes come from `params` (f32, bf16 or quantized);
    params=None gives f32 predictions only. measure=False skips running the model. statistic: see
    measure_step_time. cache_dtype: the KV pool's dtype (default: the embedding's; int8 is quantized)."""
    byte_kwargs = byte_kwargs_from_params(params, cfg, cache_dtype) if params is not None else {}
    rows = []
    for phase in phases:
        for batch in batches:
            for context_len in context_lens:
                cost = phase_cost(cfg, phase, batch, context_len, **byte_kwargs)
                measured = None
                if measure and params is not None:
                    measured = measure_step_time(cfg, params, batch, context_len, phase, runs=runs,
                                                 page_size=page_size, dense_prefill=dense_prefill,
                                                 statistic=statistic, cache_dtype=cache_dtype)
                rows.append(make_row(phase, batch, context_len, cost, peaks, measured))
    return rows


def _fmt(value: Optional[float], scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table, one line per row."""
    header = ["phase", "batch", "context", "GFLOP", "weights MB", "KV MB", "act MB", "FLOP/B", "bound",
              "pred ms", "meas ms", "meas/pred", "GFLOP/s", "% peak FLOP/s", "GB/s", "% peak BW"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.phase, str(r.batch), str(r.context_len), _fmt(r.flops, 1e9, 3), _fmt(r.weight_bytes, 1e6, 1),
                 _fmt(r.kv_bytes, 1e6, 1), _fmt(r.activation_bytes, 1e6, 1), _fmt(r.intensity, 1, 1), r.bound,
                 _fmt(r.predicted_s, 1e-3, 3), _fmt(r.measured_s, 1e-3, 3), _fmt(r.measured_over_predicted),
                 _fmt(r.achieved_flops_per_s, 1e9, 1), _fmt(r.flops_fraction, 0.01, 1),
                 _fmt(r.achieved_bytes_per_s, 1e9, 1), _fmt(r.bandwidth_fraction, 0.01, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(rows: Sequence[Row], peaks: MachinePeaks) -> str:
    """{"machine": peaks (+ ridge_intensity), "rows": [...]} as a JSON string."""
    machine = dataclasses.asdict(peaks) | {"ridge_intensity": peaks.ridge_intensity}
    return json.dumps({"machine": machine, "rows": [dataclasses.asdict(r) | {"label": r.label} for r in rows]},
                      indent=2)


def plot_roofline(rows: Sequence[Row], peaks: MachinePeaks, path_png: str) -> str:
    """Log-log roofline (bandwidth slope, compute ceiling, ridge point) with the rows: filled markers at the
    measured FLOP/s, hollow ones at the predicted FLOP/s (on the roof). Returns path_png."""
    import matplotlib

    matplotlib.use("Agg")  # headless; no display needed
    import matplotlib.pyplot as plt

    ridge = peaks.ridge_intensity
    intensities = [r.intensity for r in rows] + [ridge]
    lo = 10 ** math.floor(math.log10(min(intensities) / 2))
    hi = 10 ** math.ceil(math.log10(max(intensities) * 2))
    x = np.logspace(math.log10(lo), math.log10(hi), 256)
    roof = np.minimum(peaks.flops_per_s, x * peaks.bandwidth_bytes_per_s)

    fig, ax = plt.subplots(figsize=(9, 6))
    ax.loglog(x, roof, color="black", lw=2, label="roofline (read bandwidth)")
    if peaks.attainable_bandwidth_bytes_per_s < peaks.bandwidth_bytes_per_s:
        ax.loglog(x, np.minimum(peaks.flops_per_s, x * peaks.attainable_bandwidth_bytes_per_s), color="black",
                  lw=1, ls="--", label=f"matvec stream {peaks.attainable_bandwidth_bytes_per_s / 1e9:.1f} GB/s "
                                       "(predictions)")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.1f} FLOP/B\n{peaks.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
                f"{peaks.flops_per_s / 1e9:.1f} GFLOP/s", xy=(ridge, peaks.flops_per_s),
                xytext=(8, -32), textcoords="offset points", fontsize=8)
    colors = {"decode": "tab:blue", "prefill": "tab:orange"}
    for phase in sorted({r.phase for r in rows}):
        pts = [r for r in rows if r.phase == phase]
        c = colors.get(phase, "tab:green")
        ax.scatter([r.intensity for r in pts], [r.flops / r.predicted_s for r in pts], facecolors="none",
                   edgecolors=c, marker="o", label=f"{phase} predicted")
        measured = [r for r in pts if r.measured_s]
        if measured:
            ax.scatter([r.intensity for r in measured], [r.achieved_flops_per_s for r in measured], color=c,
                       marker="x" if phase == "prefill" else "o", label=f"{phase} measured")
        for r in pts:
            y = r.achieved_flops_per_s if r.measured_s else r.flops / r.predicted_s
            ax.annotate(f"b{r.batch} c{r.context_len}", (r.intensity, y), xytext=(4, 4),
                        textcoords="offset points", fontsize=7, color=c)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(f"roofline on {peaks.device_kind}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
    return path_png


# ----------------------------------------------------------------------------------------------------
# Command line (scripts/bench_roofline.py; the `ridgeline roofline` subcommand can call main(argv))
# ----------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def for_engine(params):
    """The layer layout the engine runs with on this backend (LLM(unroll_layers=None)): unstacked on CPU
    for float weights; quantized weights keep the stacked scan."""
    import jax

    from model.llama import unstack_layers
    from model.quantize import QuantizedWeight

    quantized = any(isinstance(w, QuantizedWeight) for w in params["layers"].values())
    return unstack_layers(params) if jax.default_backend() == "cpu" and not quantized else params


def main(argv: Optional[Sequence[str]] = None) -> list[Row]:
    """Random weights at a preset's shapes: measure the machine, run the grid, print the table, write files."""
    import argparse

    import jax
    import jax.numpy as jnp

    from model.config import PRESETS
    from model.llama import init_params

    parser = argparse.ArgumentParser(description="Roofline report: predicted vs measured step times.")
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS),
                        help="random weights at these shapes (ignored with --model)")
    parser.add_argument("--model", default=None,
                        help="real weights: a .gguf / HF dir / checkpoint, or 'default' for SmolLM2-135M")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", default=None, choices=["int8", "int4"],
                        help="weight-only quantization of the projections (bytes per step shrink accordingly)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--phases", default="decode,prefill")
    parser.add_argument("--batches", type=_int_list, default=[1, 4, 16])
    parser.add_argument("--contexts", type=_int_list, default=[128, 512])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--statistic", default="median", choices=["median", "min"],
                        help="step time over the runs (min is steadier on a shared machine)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--machine-seconds", type=float, default=3.0)
    parser.add_argument("--no-measure", action="store_true", help="predictions only (no model runs)")
    parser.add_argument("--png", default=None, help="write the roofline plot here")
    parser.add_argument("--json", default=None, help="write rows + machine peaks here")
    args = parser.parse_args(argv)

    peaks = measure_machine(seconds=args.machine_seconds)
    if args.model is not None:
        from model.checkpoint import load_model

        cfg, params, _ = load_model(None if args.model == "default" else args.model, dtype=jnp.dtype(args.dtype))
        params = jax.device_put(params)
    else:
        cfg = PRESETS[args.preset]
        params = init_params(cfg, jax.random.key(0), dtype=jnp.dtype(args.dtype))
    if args.quantization is not None:
        from model.quantize import quantize_params

        params = quantize_params(params, args.quantization, 64)  # group size used by int4 only
    params = for_engine(params)
    cache_dtype = None if args.kv_cache_dtype is None else jnp.dtype(args.kv_cache_dtype)
    rows = roofline_report(cfg, params, args.batches, args.contexts, peaks, phases=args.phases.split(","),
                           measure=not args.no_measure, runs=args.runs, page_size=args.page_size,
                           statistic=args.statistic, cache_dtype=cache_dtype)
    print(f"{cfg.name} ({args.dtype}) on {peaks.device_kind}: read {peaks.read_bandwidth_bytes_per_s / 1e9:.1f} GB/s "
          f"(matvec stream {peaks.matvec_bandwidth_bytes_per_s / 1e9:.1f}, used for predictions) "
          f"(copy {peaks.copy_bandwidth_bytes_per_s / 1e9:.1f}), {peaks.flops_per_s / 1e9:.1f} GFLOP/s "
          f"{peaks.matmul_dtype}, ridge {peaks.ridge_intensity:.1f} FLOP/B")
    print(format_table(rows))
    if args.png:
        print("wrote", plot_roofline(rows, peaks, args.png))
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(rows, peaks))
        print("wrote", args.json)
    return rows
