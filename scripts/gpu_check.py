"""One prepared GPU run: every GPU figure ridgeline needs, inside a time budget, in one command.

    python3 scripts/gpu_check.py --out DIR --budget-s 420      # the GPU run (H100/H200)
    python3 scripts/gpu_check.py --out DIR --quick             # ~2 minute smoke run
    python3 scripts/gpu_check.py --out DIR --dry-run           # CPU, tiny shapes (tests/test_gpu_check.py)

Sections, in order: 1 machine (device, copy bandwidth, bf16 matmul: the ceilings), 2 correctness on the
device (each Pallas kernel vs its reference at a small and a production shape, per lowering; the engine's
greedy tokens with Pallas vs XLA attention), 3 kernel speed (% of the ceilings), 4 end to end with random
weights at Llama-3-8B shapes, 5 the roofline report of section 4's rows (PNG). results.json / results.md
in DIR are rewritten after every item, so a kill still leaves results. Needs no install: the repo root
goes on sys.path here, and only packages the GPU machine has are imported (gguf never is).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import shutil
import subprocess
import sys
from typing import Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from gpu_check_lib import FAIL_ENV_VAR, Recorder, Skip, compare, input_sets, time_per_call  # noqa: E402
from gpu_check_plans import DRY_PLAN, GPU_PLAN, QUICK_PLAN, SECTION_SHARES, TOLERANCES, Plan  # noqa: E402


# ---------------------------------------------------------------------------------------------- helpers
def _jnp_dtype(name):
    import jax.numpy as jnp

    return jnp.dtype(name)


def _normal(seed: int, shape, dtype):
    import jax

    return jax.random.normal(jax.random.key(seed), shape, _jnp_dtype(dtype))


def _lowering_kwargs(fn, lowering):
    """{"lowering": ...} if the wrapper takes one; Skip when a lowering is asked of a wrapper without it."""
    import inspect

    if lowering is None:
        return {}
    if "lowering" not in inspect.signature(fn).parameters:
        if lowering == "triton":
            return {}  # the wrapper's only lowering
        raise Skip(f"{fn.__name__} takes no lowering argument (no {lowering!r} variant yet)")
    return {"lowering": lowering}


def _variants(plan: Plan):
    """(impl, lowering, label suffix) of every Pallas variant to check."""
    return [(plan.pallas, lw, f" [{lw}]" if lw else " [interpret]") for lw in plan.lowerings]


def _paged_inputs(seed, q_lens, kv_lens, heads, kv_heads, head_dim, page_size, dtype, pad_tokens=0, pad_seqs=0):
    """Ragged batch with shuffled pages (and padded token rows / sequence slots like the engine's)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    needed = [-(-kv // page_size) for kv in kv_lens]
    num_pages, max_seqs = sum(needed) + 3, len(q_lens) + pad_seqs
    order = rng.permutation(num_pages).astype(np.int32)
    tables = np.zeros((max_seqs, max(needed) + 1), np.int32)
    used = 0
    for s, n in enumerate(needed):
        tables[s, :n] = order[used:used + n]
        used += n
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    kv = np.zeros(max_seqs, np.int32)
    kv[:len(kv_lens)] = kv_lens
    tokens = int(sum(q_lens)) + pad_tokens
    pages_shape = (kv_heads, num_pages, page_size, head_dim)
    return (_normal(3 * seed, (tokens, heads, head_dim), dtype), _normal(3 * seed + 1, pages_shape, dtype),
            _normal(3 * seed + 2, pages_shape, dtype), jnp.asarray(kv), jnp.asarray(tables), jnp.asarray(cu),
            jnp.asarray(np.array([len(q_lens)], np.int32)))


def _quantized_pages(batch):
    from pallas_kernels.kv_cache_update import quantize_kv

    (k_q, k_s), (v_q, v_s) = quantize_kv(batch[1]), quantize_kv(batch[2])
    return (batch[0], k_q, v_q, *batch[3:]), dict(k_scales=k_s, v_scales=v_s)


def _quantize(w, bits: int, group: int):
    from model.quantize import quantize_int4, quantize_int8

    return quantize_int8(w) if bits == 8 else quantize_int4(w, group)


def _default_repr(cls) -> str:
    try:
        return repr(cls())
    except Exception as e:  # noqa: BLE001 - a class without defaults is no reason to lose the device row
        return f"no defaults ({type(e).__name__})"


def _ceiling(ctx, kind: str) -> Optional[float]:
    peaks = ctx.get("peaks")
    if peaks is None:
        return None
    return peaks.copy_bandwidth_bytes_per_s if kind == "bw" else peaks.flops_per_s


def _pct(rate: float, ctx, kind: str) -> Optional[float]:
    ceiling = _ceiling(ctx, kind)
    return None if not ceiling else round(100 * rate / ceiling, 1)


# ---------------------------------------------------------------------------------------------- 1 machine
def section_machine(rec: Recorder, plan: Plan, ctx: dict):
    import jax

    def device():
        d = jax.devices()[0]
        from importlib import metadata

        figures = {"device": d.device_kind, "platform": d.platform, "count": jax.device_count(), "jax": jax.__version__}
        for package in ("jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "triton"):
            try:
                figures[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                pass
        import pallas_kernels

        # Default tiles of the kernels as they stand (they are tuned between GPU runs).
        figures["default_block_sizes"] = {name: _default_repr(getattr(pallas_kernels, name))
                                          for name in dir(pallas_kernels) if name.endswith("BlockSizes")}
        figures["env"] = {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "RIDGELINE_"))}
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            figures["memory_limit_GB"] = stats["bytes_limit"] / 1e9
        if shutil.which("nvidia-smi"):
            query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu"
            try:
                out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=15)
                figures["nvidia_smi"] = f"{query}: {out.stdout.strip()}"
            except (OSError, subprocess.SubprocessError) as e:
                figures["nvidia_smi"] = f"failed: {e}"
        return figures

    def ceilings():
        from inference.roofline import measure_machine

        on_gpu = jax.default_backend() == "gpu"
        peaks = measure_machine(seconds=6.0 if on_gpu else 1.0, bandwidth_mib=512 if on_gpu else 32,
                                matmul_size=8192 if on_gpu else 256)
        ctx["peaks"] = peaks
        return {"copy_GBps": peaks.copy_bandwidth_bytes_per_s / 1e9, "read_GBps": peaks.read_bandwidth_bytes_per_s / 1e9,
                "matmul_TFLOPs": peaks.flops_per_s / 1e12, "matmul_dtype": peaks.matmul_dtype,
                "matvec_GBps": peaks.matvec_bandwidth_bytes_per_s / 1e9, "matmul_size": peaks.matmul_size}

    rec.run("device", device)
    rec.run("ceilings: copy bandwidth, matmul", ceilings, redo=True)  # the ratios below need them


# ---------------------------------------------------------------------------------------------- 2 correctness
def section_correctness(rec: Recorder, plan: Plan, ctx: dict):
    import jax.numpy as jnp

    from pallas_kernels import (flash_attention, flash_attention_reference, ragged_paged_attention,
                                ragged_paged_attention_reference, update_kv_cache, update_kv_cache_reference)
    from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference

    tol = TOLERANCES[plan.dtype]

    def flash(shape, impl, lowering):
        b, t, h, kvh, hd = (shape[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim"))
        q, k, v = (_normal(i, (b, t, n, hd), plan.dtype) for i, n in enumerate((h, kvh, kvh)))
        q_lens = jnp.asarray(shape.get("q_lens", (t,) * b), jnp.int32)
        kv_lens = jnp.asarray(shape.get("kv_lens", (t,) * b), jnp.int32)
        out = flash_attention(q, k, v, q_lens, kv_lens, causal=True, impl=impl,
                              **_lowering_kwargs(flash_attention, lowering))
        ref = flash_attention_reference(q, k, v, q_lens, kv_lens, causal=True, sm_scale=1 / math.sqrt(hd))
        valid = np.arange(t)[None, :] < np.asarray(q_lens)[:, None]  # rows past q_lens are padding
        return compare(np.asarray(out, np.float32)[valid], np.asarray(ref, np.float32)[valid], **tol)

    def paged(shape, impl, lowering, int8):
        batch = _paged_inputs(7, dtype=plan.dtype, **shape)
        scales = {}
        if int8:
            batch, scales = _quantized_pages(batch)
        out = ragged_paged_attention(*batch, impl=impl, **scales, **_lowering_kwargs(ragged_paged_attention, lowering))
        ref = ragged_paged_attention_reference(*batch, **scales, sm_scale=1 / math.sqrt(shape["head_dim"]))
        return compare(out, ref, rows=int(sum(shape["q_lens"])), **tol)

    def kv_update(shape, impl, lowering, int8):
        t, kvh, hd, pages, ps = (shape[k] for k in ("tokens", "kv_heads", "head_dim", "num_pages", "page_size"))
        k_pages, v_pages = _normal(1, (kvh, pages, ps, hd), plan.dtype), _normal(2, (kvh, pages, ps, hd), plan.dtype)
        k_new, v_new = _normal(3, (t, kvh, hd), plan.dtype), _normal(4, (t, kvh, hd), plan.dtype)
        slots = np.random.default_rng(0).choice(pages * ps, t, replace=False).astype(np.int32)
        slots[::7] = -1  # dropped rows (padding) must leave the cache alone
        scales = {}
        if int8:
            (_, k_pages, v_pages), scales = _quantized_pages((None, k_pages, v_pages))
        args = (k_pages, v_pages, k_new, v_new, jnp.asarray(slots))
        out = update_kv_cache(*args, impl=impl, **scales, **_lowering_kwargs(update_kv_cache, lowering))
        ref = update_kv_cache_reference(*args, *scales.values())
        errors = [compare(o, r, atol=0.0, rel_l2=0.0) for o, r in zip(out, ref)]  # a scatter is exact
        return {"max_abs_err": max(e["max_abs_err"] for e in errors), "arrays": len(errors),
                "passed": all(e["passed"] for e in errors)}

    def qmm(shape, impl, lowering, bits):
        kwargs = _lowering_kwargs(quantized_matmul, lowering)
        qw = _quantize(_normal(1, (shape["k"], shape["n"]), plan.dtype), bits, plan.qmm_group)
        x = _normal(2, (shape["m"], shape["k"]), plan.dtype)
        return compare(quantized_matmul(x, qw, impl=impl, **kwargs), quantized_matmul_reference(x, qw), **tol)

    for label, shape in plan.flash_checks:
        for impl, lw, suffix in _variants(plan):
            rec.run(f"flash attention {label}{suffix}", functools.partial(flash, shape, impl, lw))
    for label, shape in plan.paged_checks:
        for kv in ("float", "int8"):
            for impl, lw, suffix in _variants(plan):
                rec.run(f"paged attention {kv} KV {label}{suffix}",
                        functools.partial(paged, shape, impl, lw, kv == "int8"))
    for label, shape in plan.kv_update_checks:
        for kv in ("float", "int8"):
            for impl, lw, suffix in _variants(plan):
                rec.run(f"KV update {kv} {label}{suffix}", functools.partial(kv_update, shape, impl, lw, kv == "int8"))
    for label, shape in plan.qmm_checks:
        for bits in (8, 4):
            for impl, lw, suffix in _variants(plan):
                rec.run(f"quantized matmul int{bits} {label}{suffix}", functools.partial(qmm, shape, impl, lw, bits))
    rec.run(f"engine greedy tokens {plan.engine_check_impl} vs xla", lambda: engine_greedy_check(plan), est_s=10)


def engine_greedy_check(plan: Plan) -> dict:
    """Greedy tokens of a small random-weight f32 model through the engine, Pallas attention vs XLA.
    A divergence counts as a near-tie (passes) only where the XLA run's top-2 logprobs are < 0.01 apart."""
    import jax

    from inference.engine import Engine, EngineConfig
    from inference.sampling_params import SamplingParams
    from model.config import LlamaConfig
    from model.llama import init_params

    cfg = LlamaConfig(**plan.engine_check_model)
    params = init_params(cfg, jax.random.key(0))
    params["lm_head"] = params["lm_head"] * 4.0  # sharper logits: fewer top-2 near-ties on random weights
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in plan.engine_check_prompts]
    sp = SamplingParams(temperature=0.0, max_tokens=plan.engine_check_tokens, ignore_eos=True, logprobs=2)
    runs = {}
    for impl in (plan.engine_check_impl, "xla"):
        engine = Engine(cfg, params, None, EngineConfig(page_size=16, num_pages=64, max_num_seqs=4,
                                                        max_num_batched_tokens=64, attn_impl=impl))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, sp)
        runs[impl] = {rid: out.outputs[0] for rid, out in engine.run().items()}
        engine.close()
    same, near_ties, first_diff = 0, 0, []
    for rid, ref in runs["xla"].items():
        got = runs[plan.engine_check_impl][rid]
        if got.token_ids == ref.token_ids:
            same += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(got.token_ids, ref.token_ids)) if a != b)
        top = sorted(ref.logprobs[i].values(), reverse=True)
        gap = top[0] - top[1] if len(top) > 1 else float("inf")
        near_ties += gap < 0.01
        first_diff.append({"request": rid, "token": i, "xla_top2_gap": gap})
    return {"identical_requests": same, "requests": len(prompts), "near_ties": near_ties,
            "tokens_per_request": plan.engine_check_tokens, "divergences": first_diff,
            "passed": same + near_ties == len(prompts)}


# ---------------------------------------------------------------------------------------------- 3 speed
def section_speed(rec: Recorder, plan: Plan, ctx: dict):
    import jax.numpy as jnp

    from pallas_kernels import flash_attention, ragged_paged_attention

    h, kvh, hd = plan.speed_heads
    impls = [plan.fast_impl] + (["xla"] if plan.baseline else [])
    itemsize = _jnp_dtype(plan.dtype).itemsize

    def flash(b, t, impl):
        def make(seed):
            q, k, v = (_normal(3 * seed + i, (b, t, n, hd), plan.dtype) for i, n in enumerate((h, kvh, kvh)))
            return q, k, v, jnp.full((b,), t, jnp.int32)

        sets = input_sets(make, b * t * (h + 2 * kvh) * hd * itemsize, target_bytes=plan.rotation_bytes)
        seconds = time_per_call(lambda q, k, v, n: flash_attention(q, k, v, n, n, causal=True, impl=impl), sets,
                                runs=plan.runs)
        flops = 4 * b * h * hd * t * (t + 1) / 2  # QK^T and PV over the causal (query, key) pairs
        return {"ms": seconds * 1e3, "TFLOPs": flops / seconds / 1e12, "pct_matmul_peak": _pct(flops / seconds, ctx, "flops")}

    def decode(b, c, kv_dtype, impl):
        int8 = kv_dtype == "int8"

        def make(seed):
            batch = _paged_inputs(seed, (1,) * b, (c,) * b, h, kvh, hd, plan.page_size, plan.dtype)
            if not int8:
                return batch
            batch, scales = _quantized_pages(batch)
            return (*batch, scales["k_scales"], scales["v_scales"])

        per_token = 2 * kvh * (hd * (1 if int8 else itemsize) + (4 if int8 else 0))  # K + V (+ scales)
        kv_bytes = b * c * per_token
        sets = input_sets(make, kv_bytes, target_bytes=plan.rotation_bytes, max_sets=16)
        fn = (lambda *a: ragged_paged_attention(*a[:7], k_scales=a[7], v_scales=a[8], impl=impl)) if int8 else \
            (lambda *a: ragged_paged_attention(*a, impl=impl))
        seconds = time_per_call(fn, sets, runs=plan.runs)
        return {"us": seconds * 1e6, "KV_GBps": kv_bytes / seconds / 1e9, "pct_copy_bw": _pct(kv_bytes / seconds, ctx, "bw"),
                "kv_MB": kv_bytes / 1e6, "sets": len(sets)}

    def qmm(m, k, n, bits, impl):
        from pallas_kernels.quantized_matmul import quantized_matmul

        def make(seed):
            return _normal(2 * seed, (m, k), plan.dtype), _quantize(_normal(2 * seed + 1, (k, n), plan.dtype), bits,
                                                                     plan.qmm_group)

        sets = input_sets(make, k * n * bits // 8, target_bytes=plan.rotation_bytes)
        seconds = time_per_call(lambda x, qw: quantized_matmul(x, qw, impl=impl), sets, runs=plan.runs)
        nbytes = sets[0][1].nbytes
        return {"us": seconds * 1e6, "weight_GBps": nbytes / seconds / 1e9, "pct_copy_bw": _pct(nbytes / seconds, ctx, "bw")}

    def dense(m, k, n):
        sets = input_sets(lambda s: (_normal(2 * s, (m, k), plan.dtype), _normal(2 * s + 1, (k, n), plan.dtype)),
                          k * n * itemsize, target_bytes=plan.rotation_bytes)
        seconds = time_per_call(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), sets, runs=plan.runs)
        return {"us": seconds * 1e6, "weight_GBps": k * n * itemsize / seconds / 1e9,
                "pct_copy_bw": _pct(k * n * itemsize / seconds, ctx, "bw")}

    for b, t in plan.flash_speed:
        for impl in impls:
            rec.run(f"flash prefill b{b} {t} causal [{impl}]", functools.partial(flash, b, t, impl), est_s=5)
    for b, c, kv_dtype in plan.decode_speed:
        for impl in impls:
            rec.run(f"paged decode b{b} ctx{c} {kv_dtype} KV [{impl}]", functools.partial(decode, b, c, kv_dtype, impl),
                    est_s=5)
    for m, k, n, bits in plan.qmm_speed:
        rec.run(f"quantized matmul int{bits} m{m} {k}x{n} [{plan.fast_impl}]",
                functools.partial(qmm, m, k, n, bits, plan.fast_impl), est_s=3)
    m, k, n, _ = plan.qmm_speed[0]
    rec.run(f"dense {plan.dtype} matmul m{m} {k}x{n} [xla] (baseline)", functools.partial(dense, m, k, n))


# ---------------------------------------------------------------------------------------------- 4 end to end
def section_e2e(rec: Recorder, plan: Plan, ctx: dict):
    import jax
    import jax.numpy as jnp

    from inference import roofline
    from model.config import PRESETS
    from model.llama import init_params

    cfg = PRESETS[plan.e2e_preset]
    on_gpu = jax.default_backend() == "gpu"
    est = 25 if on_gpu else 0
    state = {}
    ctx["rows"] = rows = []  # (label, phase, batch, context, seconds, byte kwargs) for the roofline section
    c = plan.e2e_context

    def init():
        # Jitted: the normal draws are cast to the dtype inside one program, never a float32 copy of 16 GB.
        params = jax.jit(functools.partial(init_params, cfg, dtype=_jnp_dtype(plan.dtype)))(jax.random.key(0))
        state["stacked"] = jax.block_until_ready(params)  # quantize_params wants stacked layers
        state["params"] = roofline.for_engine(params)  # the engine's layout (unstacked on CPU only)
        state["bytes"] = roofline.byte_kwargs_from_params(state["params"], cfg)
        return {"model": cfg.name, "dtype": plan.dtype, "params_B": cfg.num_params() / 1e9,
                "weights_GB": sum(a.nbytes for a in jax.tree.leaves(state["params"])) / 1e9}

    def step(phase, batch, length, params_key="params", bytes_key="bytes", cache_dtype=None):
        seconds = roofline.measure_step_time(cfg, state[params_key], batch, length, phase, runs=plan.runs,
                                             warmup=2, attn_impl=plan.fast_impl, cache_dtype=cache_dtype)
        cost = roofline.phase_cost(cfg, phase, batch, length, **state[bytes_key])
        figures = {"step_ms": seconds * 1e3, "tok_s": (batch if phase == "decode" else batch * length) / seconds,
                   "GB_per_step": cost.total_bytes / 1e9,
                   "pct_hbm_roofline": _pct(cost.total_bytes / seconds, ctx, "bw"),
                   "TFLOPs": cost.flops / seconds / 1e12}
        if phase == "prefill":
            figures["pct_matmul_peak"] = _pct(cost.flops / seconds, ctx, "flops")
        return figures

    def run_step(name, label, phase, batch, length, fn=None, bytes_key="bytes"):
        """Runs a step item; its time (fresh, or recorded before a resume) feeds the roofline rows."""
        figures = rec.run(name, fn or functools.partial(step, phase, batch, length), est_s=est)
        if figures and "step_ms" in figures and bytes_key in state:
            state[label] = figures["step_ms"] / 1e3
            rows.append((label, phase, batch, length, state[label], state[bytes_key]))

    if rec.run(f"init {cfg.name} random {plan.dtype} on device", init, est_s=est, redo=True) is None:
        rec.skip("the rest of section 4", "no model: its init did not complete")
        return
    for b in plan.e2e_batches:
        run_step(f"decode b{b} ctx{c}", f"decode b{b}", "decode", b, c)
    run_step(f"prefill b1 {plan.prefill_len} (TTFT)", "prefill", "prefill", 1, plan.prefill_len)
    if plan.engine_tokens:
        rec.run(f"engine host time per step b{plan.e2e_batches[1]}", lambda: engine_host_time(plan, cfg, state),
                est_s=2 * est)
    if plan.int8_items:
        def int8_weights():
            from model.quantize import quantize_params

            state["params_int8"] = roofline.for_engine(quantize_params(state["stacked"], "int8"))
            state["bytes_int8"] = roofline.byte_kwargs_from_params(state["params_int8"], cfg)
            figures = step("decode", 1, c, "params_int8", "bytes_int8")
            del state["params_int8"]
            return {**figures, "speedup_vs_float": state.get("decode b1", float("nan")) / figures["step_ms"] * 1e3}

        b = plan.e2e_batches[-1]
        state["bytes_kv8"] = roofline.byte_kwargs_from_params(state["params"], cfg, jnp.int8)

        def int8_kv():
            figures = step("decode", b, c, bytes_key="bytes_kv8", cache_dtype=jnp.int8)
            return {**figures, "speedup_vs_float_kv": state.get(f"decode b{b}", float("nan")) / figures["step_ms"] * 1e3}

        run_step(f"int8 weights decode b1 ctx{c} (vs float)", "decode b1 int8 weights", "decode", 1, c, int8_weights,
                 "bytes_int8")
        run_step(f"int8 KV decode b{b} ctx{c} (vs float KV)", f"decode b{b} int8 KV", "decode", b, c, int8_kv,
                 "bytes_kv8")
    if plan.spec_tokens:
        rec.run("speculative n-gram, repetitive prompt (on vs off)", lambda: speculative_check(plan, cfg, state),
                est_s=3 * est)
    if plan.spec_tokens and plan.draft_preset:
        rec.run(f"speculative draft model {plan.draft_preset} for {cfg.name}: draft vs verify cost",
                lambda: draft_model_check(plan, cfg, state), est_s=3 * est)
    state.clear()


def _engine(cfg, params, plan: Plan, max_num_seqs: int, num_pages: int, prefill_tokens: int, speculative=None):
    """An engine whose first step prefills every prompt at once (one prefill program to compile)."""
    from inference.engine import Engine, EngineConfig

    return Engine(cfg, params, None, EngineConfig(
        page_size=plan.page_size, num_pages=num_pages, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(prefill_tokens, max_num_seqs), enable_prefix_caching=False,
        attn_impl=plan.fast_impl, speculative=speculative))


def engine_host_time(plan: Plan, cfg, state: dict) -> dict:
    """Median engine decode step (schedule + pad + device step + sampling + host bookkeeping) against the
    bare jitted model step at the same batch and context (the decode row above)."""
    import time

    from inference.sampling_params import SamplingParams

    b, c, n = plan.e2e_batches[1], plan.e2e_context, plan.engine_tokens
    prompt_len = c - n - 8  # decode stays inside one page-count bucket (no recompiles mid-run)
    engine = _engine(cfg, state["params"], plan, b, b * (-(-c // plan.page_size) + 1), b * prompt_len)
    rng = np.random.default_rng(1)
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for i in range(b):
        engine.add_request(str(i), rng.integers(0, cfg.vocab_size, prompt_len).tolist(), sp)
    decode_steps = []
    while engine.has_unfinished_requests():
        before = engine.stats["tokens_computed"]
        t0 = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - t0
        if engine.stats["tokens_computed"] - before == b:  # every sequence decoding one token
            decode_steps.append(seconds)
    engine.close()
    timed = decode_steps[2:]  # the first decode step compiles
    if not timed:
        raise RuntimeError(f"only {len(decode_steps)} decode steps; need more than 2")
    engine_step = float(np.median(timed))
    model_step = state.get(f"decode b{b}")
    figures = {"engine_step_ms": engine_step * 1e3, "engine_tok_s": b / engine_step, "steps": len(timed)}
    if model_step:
        figures.update(model_step_ms=model_step * 1e3, overhead_ms=(engine_step - model_step) * 1e3,
                       overhead_pct=100 * (engine_step - model_step) / engine_step)
    return figures


def speculative_check(plan: Plan, cfg, state: dict) -> dict:
    """Batch-1 greedy decode of a repetitive prompt with n-gram speculation on vs off (same tokens required).
    Random weights: acceptance depends on whether the model's own output repeats."""
    import time

    from inference.sampling_params import SamplingParams

    rng = np.random.default_rng(2)
    pattern = rng.integers(0, cfg.vocab_size, 16).tolist()
    prompt = (pattern * (plan.spec_prompt_len // 16 + 1))[:plan.spec_prompt_len]
    sp = SamplingParams(temperature=0.0, max_tokens=plan.spec_tokens, ignore_eos=True)
    pages = 2 * (-(-(len(prompt) + plan.spec_tokens + 8) // plan.page_size)) + 4
    figures, tokens = {}, {}
    for name, spec in (("off", None), ("on", {"method": "ngram", "num_speculative_tokens": 4})):
        engine = _engine(cfg, state["params"], plan, 1, pages, len(prompt), spec)
        engine.add_request("warmup", prompt, sp)
        engine.run()  # compiles the prefill, decode and verify programs
        t0 = time.perf_counter()
        engine.add_request("timed", prompt, sp)
        out = engine.run()["timed"]
        seconds = time.perf_counter() - t0
        tokens[name] = out.outputs[0].token_ids
        figures[f"tok_s_{name}"] = len(tokens[name]) / seconds
        if spec is not None:
            stats = engine.scheduler_stats()
            figures["acceptance_rate"] = stats.get("spec_acceptance_rate")
            figures["tokens_per_forward"] = stats.get("spec_tokens_per_forward")
        engine.close()
    figures["speedup"] = figures["tok_s_on"] / figures["tok_s_off"]
    figures["passed"] = tokens["on"] == tokens["off"]  # greedy output must not change with speculation
    return figures


def draft_model_check(plan: Plan, cfg, state: dict) -> dict:
    """Batch-1 greedy decode with a draft model (random weights, so its guesses are rejected: acceptance means
    nothing here) against plain decode: what one step costs, split into the draft's k proposal steps and the
    target's verify of k+1 tokens, and the speed-up those costs give at a per-guess acceptance alpha:
    E(alpha) = (1 - alpha^(k+1)) / (1 - alpha) tokens per step, times plain step / speculative step. draft_ms
    includes the draft's K/V write for the previous step's tokens (it runs on the device before the proposal)."""
    import dataclasses
    import functools
    import time

    import jax

    from inference import roofline
    from inference.sampling_params import SamplingParams
    from model.config import PRESETS
    from model.llama import init_params

    draft_cfg = PRESETS[plan.draft_preset]
    if plan.draft_layers:
        draft_cfg = dataclasses.replace(draft_cfg, num_layers=plan.draft_layers)
    draft_params = jax.jit(functools.partial(init_params, draft_cfg, dtype=_jnp_dtype(plan.dtype)))(jax.random.key(1))
    draft_params = roofline.for_engine(draft_params)
    k = 4
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, cfg.vocab_size, plan.spec_prompt_len).tolist()
    sp = SamplingParams(temperature=0.0, max_tokens=plan.spec_tokens, ignore_eos=True)
    pages = 2 * (-(-(len(prompt) + plan.spec_tokens + 8) // plan.page_size)) + 4
    spec = {"method": "draft", "model": (draft_cfg, draft_params), "num_speculative_tokens": k, "adaptive": False}
    figures, tokens = {}, {}
    for name, speculative in (("off", None), ("on", spec)):
        engine = _engine(cfg, state["params"], plan, 1, pages, len(prompt), speculative)
        engine.add_request("warmup", prompt, sp)
        engine.run()  # compiles the prefill, decode, draft and verify programs
        draft_seconds = []
        if speculative is not None:  # the proposal returns host tokens: its time includes the draft's device work
            propose = engine.proposer.propose

            def timed_propose(rows):
                t0 = time.perf_counter()
                out = propose(rows)
                draft_seconds.append(time.perf_counter() - t0)
                return out

            engine.proposer.propose = timed_propose
        engine.add_request("timed", prompt, sp)
        steps = []
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = engine.step()
            steps.append(time.perf_counter() - t0)
            for out in outs:
                if out.finished:
                    tokens[name] = out.outputs[0].token_ids
        engine.close()
        figures[f"step_ms_{name}"] = float(np.median(steps[1:])) * 1e3  # decode steps (the first one prefills)
        if draft_seconds:
            figures["draft_ms"] = float(np.median(draft_seconds[1:] or draft_seconds)) * 1e3
    plain, step, draft = figures["step_ms_off"], figures["step_ms_on"], figures["draft_ms"]
    figures.update(k=k, draft_step_ms=draft / k, verify_ms=step - draft, draft_step_over_plain_step=draft / k / plain,
                   verify_over_plain_step=(step - draft) / plain)
    for alpha in (0.6, 0.7, 0.8):
        figures[f"speedup_at_alpha_{alpha}"] = (1 - alpha ** (k + 1)) / (1 - alpha) * plain / step
    figures["passed"] = tokens["on"] == tokens["off"]  # greedy output must not change with speculation
    return figures


# ---------------------------------------------------------------------------------------------- 5 roofline
def section_roofline(rec: Recorder, plan: Plan, ctx: dict):
    from inference import roofline
    from model.config import PRESETS

    def report():
        peaks, measured = ctx.get("peaks"), ctx.get("rows") or []
        if peaks is None:
            raise Skip("no machine ceilings (section 1 did not measure them)")
        if not measured:
            raise Skip("no end-to-end rows were measured")
        cfg = PRESETS[plan.e2e_preset]
        rows = [roofline.make_row(phase, batch, length, roofline.phase_cost(cfg, phase, batch, length, **byte_kwargs),
                                  peaks, seconds) for _, phase, batch, length, seconds, byte_kwargs in measured]
        png = roofline.plot_roofline(rows, peaks, os.path.join(rec.out_dir, "roofline.png"))
        with open(os.path.join(rec.out_dir, "roofline.json"), "w") as f:
            f.write(roofline.to_json(rows, peaks))
        labels = "\n".join(f"- row {i + 1}: {m[0]}" for i, m in enumerate(measured))
        rec.appendix.append(f"## Roofline table ({cfg.name})\n\n{roofline.format_table(rows)}\n\n{labels}\n")
        return {"rows": len(rows), "png": os.path.basename(png),
                "worst_meas_over_pred": max(r.measured_over_predicted for r in rows)}

    rec.run("roofline report + PNG", report)


# ---------------------------------------------------------------------------------------------- main
SECTIONS = (("machine", "1. Machine (the ceilings)", section_machine),
            ("correctness", "2. Correctness on the device", section_correctness),
            ("speed", "3. Kernel speed", section_speed),
            ("e2e", "4. End to end, random weights", section_e2e),
            ("roofline", "5. Roofline report", section_roofline))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, roofline.png/json")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting items after this many seconds")
    parser.add_argument("--quick", action="store_true", help="smoke run (~2 minutes on a GPU)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpret-mode kernels")
    parser.add_argument("--fail", default="", help=f"comma-separated item names that raise on purpose (or ${FAIL_ENV_VAR})")
    parser.add_argument("--resume", action="store_true",
                        help="continue DIR/results.json of a run that died (scripts/gpu_check.sh does this once)")
    parser.add_argument("--watchdog-grace-s", type=float, default=90.0,
                        help="past budget + this, write the results and exit even if an item hangs")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
    # Grow GPU memory on demand (no 75% preallocation): weights, KV pools and references come and go.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import jax

    on_gpu = jax.default_backend() == "gpu"
    plan = DRY_PLAN if args.dry_run or not on_gpu else (QUICK_PLAN if args.quick else GPU_PLAN)
    mode = plan.mode if on_gpu or args.dry_run else "dry-run (no GPU found)"
    fail = [s.strip() for s in (args.fail or os.environ.get(FAIL_ENV_VAR, "")).split(",")]
    meta = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "lowering_env": os.environ.get("RIDGELINE_PALLAS_LOWERING", "")}
    rec = Recorder(args.out, args.budget_s, meta, fail_items=fail, resume=args.resume)
    rec.start_watchdog(args.watchdog_grace_s)
    ctx: dict = {}
    for name, title, run_section in SECTIONS:
        with rec.section(name, title, SECTION_SHARES[name]):
            run_section(rec, plan, ctx)
    rec.write(final=True)
    print("\n" + rec.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
