"""Quantization side by side on the default model (SmolLM2-135M): bytes, speed and quality in one run.

    python scripts/bench_quantization.py [--context 512] [--batches 1,8] [--skip-speed] [--skip-quality]
                                         [--json out.json]

1. Bytes moved per decode step (weights + KV), from inference.roofline.step_cost with every weight's
   stored bytes read off the real params (int8 / int4 values + scales + zeros). Rows: float32, bfloat16,
   int8 and int4 weights with an int8 KV cache (their unquantized parts -- embedding / tied head, norms --
   and activations in bf16, as deployed on an accelerator). The int8 KV cache counts its per-token scale.
2. Measured decode step time on this machine (the engine's jitted model step, cache donated, on
   inference.roofline.benchmark_step_inputs), for each weight / KV format, compute in float32 except the
   bf16 row; timed calls go round-robin over the rows so a busy shared machine skews them alike.
3. Quality: perplexity of tests/fixtures/perplexity_text.txt through the *paged* path (one prefill step
   writes K/V into the pool -- int8 when asked -- and attention reads it back, so KV quantization counts;
   LLM.score's dense path never reads the pool), and greedy agreement with float32 over a few prompts x
   32 tokens: the fraction of identical tokens position by position, and the mean common prefix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model.config import KV_CACHE_DTYPES, LlamaConfig  # noqa: E402
from model.llama import StepInputs, init_cache, kv_bytes_per_token_elem, make_step_fn  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
GREEDY_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
                  "The three primary colors are", "Water boils at", "The best way to learn a language is",
                  "Photosynthesis is the process by which", "In 1969, astronauts")


@dataclasses.dataclass(frozen=True)
class Variant:
    """weights: float32 | bfloat16 | int8 (per channel) | w8a8 (int8 weights and activations) | int4
    (asymmetric, group_size) | gguf (the file's own Q4_1 blocks, group 32); kv: float32 | bfloat16 | int8."""

    weights: str
    kv: str
    group_size: int = 64

    @property
    def name(self) -> str:
        w = f"int4-g{self.group_size}" if self.weights == "int4" else self.weights
        return f"{w} / kv {self.kv}"


BASELINE = Variant("float32", "float32")
SPEED_VARIANTS = (BASELINE, Variant("float32", "int8"), Variant("int8", "float32"), Variant("int8", "int8"),
                  Variant("w8a8", "float32"), Variant("int4", "int8"), Variant("gguf", "int8"), Variant("bfloat16", "bfloat16"))
QUALITY_VARIANTS = (BASELINE, Variant("float32", "int8"), Variant("int8", "float32"), Variant("int8", "int8"),
                    Variant("w8a8", "float32"), Variant("int4", "float32"), Variant("int4", "int8"), Variant("int4", "int8", 32),
                    Variant("gguf", "int8"))


# ----------------------------------------------------------------------------------------------------
# Model variants
# ----------------------------------------------------------------------------------------------------

class Models:
    """Loads the default GGUF once as float and once with its Q4_1 blocks kept; builds variants lazily."""

    def __init__(self):
        from model.gguf_loader import load_gguf
        from model.weights import default_model_path

        path = default_model_path()
        self.cfg, self.float_params, self.tokenizer = load_gguf(path)
        _, self.gguf_params, _ = load_gguf(path, quantization="gguf")
        self._cache: dict = {}

    def params(self, weights: str, group_size: int = 64, float_dtype=jnp.float32):
        from model.quantize import QuantizedWeight, quantize_params

        key = (weights, group_size, jnp.dtype(float_dtype).name)
        if key not in self._cache:
            if weights == "gguf":
                src = self.gguf_params
            else:
                src = self.float_params
            is_q = lambda a: isinstance(a, QuantizedWeight)  # noqa: E731
            dtype = jnp.bfloat16 if weights == "bfloat16" else float_dtype
            params = jax.tree.map(lambda a: a if is_q(a) else jnp.asarray(a, dtype), src, is_leaf=is_q)
            if weights in ("int8", "w8a8", "int4"):
                params = quantize_params(params, weights, group_size)
            self._cache[key] = jax.device_put(params)
        return self._cache[key]


# ----------------------------------------------------------------------------------------------------
# Quality helpers (also used by tests/test_quantized_model.py)
# ----------------------------------------------------------------------------------------------------

def paged_nll(params, cfg: LlamaConfig, ids: Sequence[int], kv_dtype=jnp.float32, *, page_size: int = 16,
              attn_impl: str = "auto") -> np.ndarray:
    """Teacher-forced -log p(ids[i+1] | ids[:i+1]) [len - 1] through the paged path: one prefill step writes
    every token's K/V into a fresh pool of kv_dtype (int8: quantized) and attention reads it back."""
    n = len(ids)
    num_pages = -(-n // page_size)
    positions = np.arange(n, dtype=np.int32)
    inputs = StepInputs(
        tokens=jnp.asarray(np.asarray(ids, np.int32)), positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(positions), cu_q_lens=jnp.asarray([0, n], jnp.int32),
        kv_lens=jnp.asarray([n], jnp.int32), block_tables=jnp.arange(num_pages, dtype=jnp.int32)[None, :],
        num_seqs=jnp.asarray([1], jnp.int32), logits_indices=jnp.arange(n - 1, dtype=jnp.int32))
    logits, _ = make_step_fn(cfg, attn_impl)(params, init_cache(cfg, num_pages, page_size, kv_dtype), inputs)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return -np.asarray(jnp.take_along_axis(logprobs, jnp.asarray(ids[1:])[:, None], axis=-1)[:, 0])


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))


def greedy_tokens(params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  kv_dtype=jnp.float32, *, page_size: int = 16, attn_impl: str = "auto") -> np.ndarray:
    """Greedy continuations [S, max_new_tokens] (EOS not special) of all prompts batched: one ragged prefill
    step, then one decode step per token, through the paged KV pool of kv_dtype."""
    S = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    pages_per_seq = -(-(int(lens.max()) + max_new_tokens) // page_size)
    tables = np.arange(S * pages_per_seq, dtype=np.int32).reshape(S, pages_per_seq)
    cache = init_cache(cfg, S * pages_per_seq, page_size, kv_dtype)
    step = make_step_fn(cfg, attn_impl)

    def run(tokens, seq, positions, q_lens):
        nonlocal cache
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        slots = tables[seq, positions // page_size] * page_size + positions % page_size
        inputs = StepInputs(
            tokens=jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions, jnp.int32),
            slot_mapping=jnp.asarray(slots, jnp.int32), cu_q_lens=jnp.asarray(cu),
            kv_lens=jnp.asarray(positions[cu[1:] - 1] + 1, jnp.int32), block_tables=jnp.asarray(tables),
            num_seqs=jnp.asarray([S], jnp.int32), logits_indices=jnp.asarray(cu[1:] - 1))
        logits, cache = step(params, cache, inputs)
        return np.asarray(jnp.argmax(logits, axis=-1))

    seq = np.repeat(np.arange(S), lens)
    positions = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    out = [run(np.concatenate(prompts), seq, positions, lens)]
    for i in range(max_new_tokens - 1):
        out.append(run(out[-1], np.arange(S), lens + i, np.ones(S, np.int32)))
    return np.stack(out, axis=1)


def agreement(tokens: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(fraction of identical tokens position by position, mean common-prefix fraction)."""
    same = tokens == reference
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return float(same.mean()), float(prefix.mean() / same.shape[1])


# ----------------------------------------------------------------------------------------------------
# 1. Bytes per decode step
# ----------------------------------------------------------------------------------------------------

def bytes_table(models: Models, context_len: int, batches: Sequence[int]) -> list[dict]:
    from inference.roofline import _PROJECTIONS, step_cost

    cfg = models.cfg
    d, f, L, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.head_dim
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    proj_params = L * (d * qd + 2 * d * kvd + qd * d + 3 * d * f)
    rows = []
    formats = (("float32", "float32", 4.0), ("bfloat16", "bfloat16", 2.0), ("int8", "int8", 2.0),
               ("int4", "int8", 2.0), ("gguf", "int8", 2.0))
    for weights, kv, float_bytes in formats:
        if weights in ("float32", "bfloat16"):
            wbpp = float_bytes
        else:  # stored bytes (values + scales + zeros) per logical weight, from the real params
            layers = models.params(weights)["layers"]
            wbpp = sum(layers[k].nbytes for k in _PROJECTIONS) / proj_params
        kv_elem = kv_bytes_per_token_elem(hd, KV_CACHE_DTYPES[kv])
        for batch in batches:
            cost = step_cost(cfg, batch=batch, context_len=context_len, new_tokens_per_seq=1,
                             weight_bytes_per_param=wbpp, float_bytes_per_param=float_bytes,
                             kv_bytes_per_elem=kv_elem, act_bytes_per_elem=float_bytes)
            proj = proj_params * wbpp
            rows.append(dict(weights=Variant(weights, kv).name, batch=batch, context=context_len,
                             bytes_per_weight=wbpp, kv_bytes_per_elem=kv_elem, projection_bytes=proj,
                             other_weight_bytes=cost.weight_bytes - proj, kv_bytes=cost.kv_bytes,
                             total_bytes=cost.total_bytes))
    for row in rows:  # ratios against the float rows of the same batch
        for ref in ("float32", "bfloat16"):
            base = next(r for r in rows if r["batch"] == row["batch"] and r["weights"].startswith(ref))
            row[f"proj+kv_vs_{ref}"] = ((row["projection_bytes"] + row["kv_bytes"])
                                        / (base["projection_bytes"] + base["kv_bytes"]))
            row[f"total_vs_{ref}"] = row["total_bytes"] / base["total_bytes"]
    return rows


# ----------------------------------------------------------------------------------------------------
# 2. Measured decode speed
# ----------------------------------------------------------------------------------------------------

def speed_table(models: Models, context_len: int, batches: Sequence[int], runs: int) -> list[dict]:
    """Best decode step time per (variant, batch). The timed calls go round-robin over all points, so load
    from other processes on a shared machine hits every variant alike instead of whichever ran then."""
    from inference.roofline import benchmark_step_inputs

    points = []
    for variant in SPEED_VARIANTS:
        params = models.params(variant.weights, variant.group_size)
        for batch in batches:
            inputs, num_pages = benchmark_step_inputs(models.cfg, batch, context_len, "decode")
            state = {"cache": init_cache(models.cfg, num_pages, 16, KV_CACHE_DTYPES[variant.kv]), "times": []}
            points.append((variant, batch, params, inputs, state))

    step = make_step_fn(models.cfg)  # the engine's jitted step (cache donated); compiles once per point
    for rep in range(runs + 1):  # rep 0 compiles and warms up
        for variant, batch, params, inputs, state in points:
            for timed in (False, True):  # an untimed call first: the switch from another point is not timed
                t0 = time.perf_counter()
                logits, state["cache"] = step(params, state["cache"], inputs)
                jax.block_until_ready((logits, state["cache"]))
                if rep and timed:
                    state["times"].append(time.perf_counter() - t0)
    rows = []
    for variant, batch, _, _, state in points:
        t = min(state["times"])
        rows.append(dict(variant=variant.name, batch=batch, context=context_len, step_ms=1e3 * t,
                         median_ms=1e3 * float(np.median(state["times"])), tokens_per_s=batch / t))
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["variant"] == BASELINE.name)
        row["speed_vs_float32"] = row["tokens_per_s"] / base["tokens_per_s"]
    return rows


# ----------------------------------------------------------------------------------------------------
# 3. Quality
# ----------------------------------------------------------------------------------------------------

def quality_table(models: Models, max_new_tokens: int) -> tuple[list[dict], dict]:
    from inference.scoring import token_logprobs

    cfg, tok = models.cfg, models.tokenizer
    ref = json.loads((FIXTURES / "smollm2_hf_reference.json").read_text())["perplexity"]
    ids = tok.encode((FIXTURES / ref["file"]).read_text())
    dense = perplexity(-token_logprobs(models.params("float32"), cfg, ids))  # what LLM.score computes
    header = dict(hf_float_ppl=ref["ppl"], dense_float32_ppl=dense, num_tokens=len(ids))
    prompts = [tok.encode(p) for p in GREEDY_PROMPTS]
    rows, base_tokens, base_ppl = [], None, None
    for variant in QUALITY_VARIANTS:
        params = models.params(variant.weights, variant.group_size)
        t0 = time.perf_counter()
        ppl = perplexity(paged_nll(params, cfg, ids, KV_CACHE_DTYPES[variant.kv]))
        tokens = greedy_tokens(params, cfg, prompts, max_new_tokens, KV_CACHE_DTYPES[variant.kv])
        if variant == BASELINE:
            base_tokens, base_ppl = tokens, ppl
        same, prefix = agreement(tokens, base_tokens)
        rows.append(dict(variant=variant.name, ppl=ppl, ppl_change=ppl / base_ppl - 1,
                         ppl_vs_hf=ppl / ref["ppl"] - 1, greedy_same=same, greedy_prefix=prefix,
                         seconds=time.perf_counter() - t0))
    return rows, header


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=512, help="cached tokens per sequence of the decode step")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes, comma separated")
    parser.add_argument("--runs", type=int, default=5, help="timed decode steps per point (best is reported)")
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--json", default=None, help="write every table here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    t0 = time.perf_counter()
    models = Models()
    cfg = models.cfg
    print(f"model {cfg.name}: {cfg.num_layers} layers, d={cfg.hidden_size}, ffn={cfg.intermediate_size}, "
          f"kv_heads={cfg.num_kv_heads}x{cfg.head_dim}, vocab={cfg.vocab_size}; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind} (load {time.perf_counter() - t0:.1f} s)")
    report: dict = {}

    mb = lambda x: f"{x / 1e6:.1f}"  # noqa: E731
    rows = bytes_table(models, args.context, batches)
    report["bytes"] = rows
    print(f"\n== Bytes moved per decode step (cost model, inference.roofline.step_cost), context {args.context} ==")
    print("   float parts (embedding / tied head, norms) and activations: f32 in the float32 row, bf16 in the others")
    print(_table(["weights / kv", "batch", "B/weight", "B/kv elem", "proj MB", "other w MB", "KV MB", "total MB",
                  "proj+KV vs bf16", "vs f32", "total vs bf16", "vs f32"],
                 [[r["weights"], str(r["batch"]), f"{r['bytes_per_weight']:.3f}", f"{r['kv_bytes_per_elem']:.3f}",
                   mb(r["projection_bytes"]), mb(r["other_weight_bytes"]), mb(r["kv_bytes"]), mb(r["total_bytes"]),
                   f"{r['proj+kv_vs_bfloat16']:.3f}", f"{r['proj+kv_vs_float32']:.3f}",
                   f"{r['total_vs_bfloat16']:.3f}", f"{r['total_vs_float32']:.3f}"] for r in rows]))

    if not args.skip_speed:
        rows = speed_table(models, args.context, batches, args.runs)
        report["speed"] = rows
        print(f"\n== Measured decode step on {jax.devices()[0].device_kind} (jitted model step, runs interleaved "
              f"across rows), context {args.context}; compute float32 except the bf16 row ==")
        print(_table(["weights / kv", "batch", f"best of {args.runs} ms", "median ms", "tokens/s", "vs float32"],
                     [[r["variant"], str(r["batch"]), f"{r['step_ms']:.1f}", f"{r['median_ms']:.1f}",
                       f"{r['tokens_per_s']:.1f}", f"{r['speed_vs_float32']:.2f}x"] for r in rows]))

    if not args.skip_quality:
        rows, header = quality_table(models, args.greedy_tokens)
        report["quality"], report["quality_header"] = rows, header
        print(f"\n== Quality: perplexity of {header['num_tokens']} tokens of perplexity_text.txt (paged path), "
              f"greedy agreement with float32 over {len(GREEDY_PROMPTS)} prompts x {args.greedy_tokens} tokens ==")
        print(f"   HF transformers float32: {header['hf_float_ppl']:.3f}; ridgeline float32 dense path "
              f"(LLM.score): {header['dense_float32_ppl']:.3f}")
        print("   gguf = the file's own Q4_1 blocks (int4, group 32), what LLM(quantization='int4' or 'gguf') uses "
              "on this model; int4-gN = re-quantized from the float weights")
        print(_table(["weights / kv", "perplexity", "vs float32", "vs HF", "same tokens", "common prefix"],
                     [[r["variant"], f"{r['ppl']:.3f}", f"{100 * r['ppl_change']:+.2f}%", f"{100 * r['ppl_vs_hf']:+.2f}%",
                       f"{100 * r['greedy_same']:.1f}%", f"{100 * r['greedy_prefix']:.1f}%"] for r in rows]))

    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
