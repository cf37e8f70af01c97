"""Host overhead of the engine loop: how long each step keeps the host busy outside the device program.

Part 1 runs a 1-layer, 64-wide random model with the default model's tokenizer and vocabulary, so the
device step is nearly free and what is left is the loop itself: scheduling, input building, stop
checks, incremental detokenization, outputs. Every request runs from the start (64 or 256 running
sequences), with seeded sampling, repetition/frequency penalties, logprobs and stop strings on, for
up to --output-tokens tokens (EOS ignored; the stop strings are chosen not to fire). Reported per
step: host ms (step wall time minus the time blocked on the device's results), device-wait ms, and
the host ms at several output positions (the loop's cost must not grow with the output length);
plus XLA compilations after `warmup`.

Each probe job runs with the synchronous loop, with overlapped dispatch (async_scheduling: the host
processes step N while the device runs step N + 1) and with multi-step decode (--probe-decode-steps: k
decode steps per program, so the host's per-step work is shared by k token positions; reported as host ms
per decode step), side by side. The medians cover steady steps: all requests running, their prompts done,
none finishing (steps that finish requests, and build their final outputs, are reported apart); output
positions are the running requests' median generated tokens.

--stub-program (host Python alone, not the real figure): the step's XLA program is replaced by
ready-made results (random tokens of the real vocabulary, random logprobs, already on the device),
so a step costs its host work (inputs packed, results copied back) but no program launch, input copy or run. It makes
2,048-token outputs at 256 sequences fit in a short run (the check that host cost is flat in the
output length); the probe jobs then run the synchronous loop only.

Host time includes the step program's launch (the jitted call: argument handling and the input copy,
thread CPU, reported on its own as "launch"). On XLA:CPU the program runs on worker threads, not in the
calling thread, but on the same cores: after blocking on its results the host's caches are cold, so the
same host Python costs more per step than with --stub-program (measured: ~3x at 64 sequences; a stub
step that sleeps as long as the device would, --stub-wait-ms, reproduces most of it).

Part 2 (skip with --skip-default-model) runs the default model (quantized as LLM() would on this machine) at
64 sequences and reports tokens/s, in one run: the synchronous loop, overlapped dispatch, and multi-step
decode (--decode-steps per program).

Usage: python scripts/bench_host_overhead.py [--seqs 64 256] [--output-tokens 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

import inference.runner as runner_module  # noqa: E402
from inference.runner import count_xla_compiles  # noqa: E402
from inference.llm import LLM, _auto_quantization  # noqa: E402
from inference.sampling_params import SamplingParams  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.config import LlamaConfig  # noqa: E402
from model.llama import init_params  # noqa: E402

PROMPT_TOKENS = 16
STOPS = ["zqxjv", "vjxqz"]  # random tokens of the real vocabulary practically never spell these (runs of
# newlines do: the vocabulary has tokens of many newlines)


def sampling(i: int, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=max_tokens, ignore_eos=True,
                          repetition_penalty=1.1, frequency_penalty=0.1, logprobs=2, stop=STOPS)


class StubProgram:
    """Stands in for `runner._sample_step_fn`: returns one of a few ready device results of the step's
    shape instead of running the program (the cache and penalty state pass through untouched)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.rng, self.made = vocab_size, np.random.default_rng(0), {}

    def __call__(self, cfg, attn_impl, num_logprobs):
        def step(params, cache, penalties, packed, fed_back, layout):
            S = dict((name, shape) for name, shape, _ in layout)["logits_indices"][0]
            ring = self.made.get((S, num_logprobs))
            if ring is None:
                ring = self.made[S, num_logprobs] = [self._result(S, num_logprobs) for _ in range(8)]
            ring.append(ring.pop(0))
            return ring[0], cache, penalties, fed_back
        return step

    def _result(self, S: int, num_logprobs):
        k = num_logprobs or 0
        tokens = self.rng.integers(0, self.vocab_size, (S, 1 + k)).astype(np.int32)
        logprobs = -self.rng.random((S, 1 + k), np.float32) * 5
        # The runner's packed layout: token, chosen logprob, k top ids, k top logprobs (float bits).
        packed = np.concatenate([tokens[:, :1], logprobs[:, :1].view(np.int32), tokens[:, 1:],
                                 logprobs[:, 1:].view(np.int32)], axis=1)
        return jax.device_put(packed)


def probe_job(loaded, num_seqs: int, output_tokens: int, async_scheduling: bool = False,
              stub_wait_ms: float = 0.0, num_decode_steps: int = 1) -> dict:
    cfg, params, tok = loaded
    max_len = PROMPT_TOKENS + output_tokens
    # (A multi-step block counts each sequence's num_decode_steps tokens against the budget.)
    with LLM(_loaded=(cfg, params, tok), max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * num_decode_steps,
             max_model_len=max_len, page_size=16, num_pages=num_seqs * -(-max_len // 16),
             async_scheduling=async_scheduling, num_decode_steps=num_decode_steps) as llm:
        engine = llm.engine
        runner = engine.runner
        launch_s = [0.0]  # thread CPU of the step programs' jitted calls (ModelRunner._run)

        def timed_run(*args, _run=runner._run, **kwargs):
            c = time.thread_time()
            try:
                return _run(*args, **kwargs)
            finally:
                launch_s[0] += time.thread_time() - c
        runner._run = timed_run
        if stub_wait_ms:  # the stub's results are read after an idle wait as long as a device step
            def waiting_fetch(out, _fetch=runner._fetch):
                t = time.perf_counter()
                time.sleep(stub_wait_ms / 1e3)
                runner.device_wait_seconds += time.perf_counter() - t
                return _fetch(out)
            runner._fetch = waiting_fetch
        t0 = time.perf_counter()
        with count_xla_compiles() as warm:
            llm.warmup(logprobs=True, penalties=True)
        warmup_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        for i in range(num_seqs):
            engine.add_request(f"r{i}", rng.integers(0, cfg.vocab_size, PROMPT_TOKENS).tolist(),
                               sampling(i, output_tokens), stream=False)
        host_ms, cpu_ms, wait_ms, launch_ms = [], [], [], []
        # Per step, read outside the timed part: the output position it reached (median generated tokens
        # of the running requests), the token positions it advanced each row by (num_decode_steps > 1:
        # several), and whether requests finished in it (such steps also build their final outputs).
        position, advanced, finishing = [], [], []
        with count_xla_compiles() as job:
            t_start = time.perf_counter()
            while engine.has_unfinished_requests():
                running = [s.stop for s in engine._requests.values()]
                lens0 = [len(s.token_ids) for s in running]
                # Steady state: all num_seqs requests running, their prompts done (a request with no
                # token yet is still prefilling).
                admitted = len(lens0) == num_seqs and min(lens0) >= 1
                w0, l0, t, c = engine.runner.device_wait_seconds, launch_s[0], time.perf_counter(), time.thread_time()
                outs = engine.step()
                dt, dc = time.perf_counter() - t, time.thread_time() - c
                grown = [len(s.token_ids) - n for s, n in zip(running, lens0) if len(s.token_ids) > n]
                position.append(float(np.median([len(s.token_ids) for s in running])) if running else 0.0)
                advanced.append(max(grown, default=0) if admitted else 0)
                finishing.append(any(o.finished for o in outs))
                wait = engine.runner.device_wait_seconds - w0
                host_ms.append((dt - wait) * 1e3)
                # CPU time of this thread: the host work alone, even on a machine busy with other work
                # (a blocked wait uses none). On a CPU backend it includes the program launch.
                cpu_ms.append(dc * 1e3)
                wait_ms.append(wait * 1e3)
                launch_ms.append((launch_s[0] - l0) * 1e3)
            total_s = time.perf_counter() - t_start
    # Steady-state steps (every prompt done) in which no request finished.
    steady = np.array([i for i in range(len(host_ms)) if advanced[i] >= 1 and not finishing[i]], np.int64)
    if not steady.size:
        raise SystemExit(f"{num_seqs} x {output_tokens}: no step ran with every request decoding and none "
                         f"finishing (admission takes longer than the outputs); raise --output-tokens")
    host, cpu = np.array(host_ms)[steady], np.array(cpu_ms)[steady]
    per_position = cpu / np.array(advanced)[steady]  # host CPU ms per decode step (token position)
    pos = np.array(position)[steady]
    # Host CPU ms by output position: steps whose median request stood within 32 tokens before n.
    at = {n: float(np.median(cpu[(pos > n - 33) & (pos <= n)])) for n in (128, 512, 1024, 2048)
          if ((pos > n - 33) & (pos <= n)).any()}
    fin = [cpu_ms[i] for i in range(len(cpu_ms)) if finishing[i]]
    return {
        "num_seqs": num_seqs, "output_tokens": output_tokens, "async_scheduling": async_scheduling,
        "num_decode_steps": num_decode_steps,
        "steps": len(host_ms), "tokens_per_s": num_seqs * output_tokens / total_s,
        "host_ms_per_step": float(np.median(host)), "host_ms_mean": float(host.mean()),
        "host_cpu_ms_per_step": float(np.median(cpu)),
        "host_cpu_ms_per_decode_step": float(np.median(per_position)),
        "launch_cpu_ms_per_step": float(np.median(np.array(launch_ms)[steady])),
        "device_wait_ms_per_step": float(np.median(np.array(wait_ms)[steady])),
        "host_cpu_ms_at_output_token": at,
        "finishing_steps": len(fin), "finishing_step_cpu_ms_mean": float(np.mean(fin)) if fin else 0.0,
        "wall_s": total_s, "warmup_s": warmup_s,
        "warmup_compiles": warm.count, "compiles_after_warmup": job.count,
    }


def default_model_tokens_per_s(loaded, num_seqs: int, output_tokens: int, **engine_kw) -> dict:
    cfg, params, tok = loaded
    prompts = [{"prompt_token_ids": tok.encode(f"Write a short story about the number {i}.")} for i in range(num_seqs)]
    sp = [SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True) for _ in range(num_seqs)]
    # What LLM() picks for the default model on this machine (weights passed in stay as they are otherwise).
    quantization = _auto_quantization("auto", weights_given=False, devices=1)
    with LLM(_loaded=loaded, max_num_seqs=num_seqs, max_num_batched_tokens=max(num_seqs, 512),
             max_model_len=256, quantization=quantization, **engine_kw) as llm:
        llm.generate(prompts, sp)  # compiles every program the timed run uses (block-table widths grow with it)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    return {"num_seqs": num_seqs, "output_tokens": output_tokens, "tokens_per_s": n / dt, "seconds": dt,
            "quantization": quantization}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="*", default=[64, 256], help="probe jobs (none: skip them)")
    ap.add_argument("--output-tokens", type=int, default=2048, help="per request (shorter keeps runs bounded)")
    ap.add_argument("--skip-default-model", action="store_true")
    ap.add_argument("--default-model-tokens", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[4, 8], help="num_decode_steps compared with 1")
    ap.add_argument("--probe-overlap", choices=["both", "off", "on"], default="both")
    ap.add_argument("--probe-decode-steps", type=int, nargs="*", default=[8],
                    help="probe jobs also run with these num_decode_steps > 1 (host cost per decode step)")
    ap.add_argument("--stub-program", action="store_true",
                    help="host Python alone: replace the step program by ready-made results (not the real figure)")
    ap.add_argument("--stub-wait-ms", type=float, default=0.0,
                    help="with --stub-program: sleep this long before reading each step's results (an idle wait "
                         "like a device step's, which leaves the host's caches cold)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    default = load_model(None)
    tok = default[2]
    cfg = LlamaConfig(vocab_size=default[0].vocab_size, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=PROMPT_TOKENS + args.output_tokens,
                      name="host-probe")
    probe = (cfg, init_params(cfg, jax.random.key(0)), tok)
    report = {"backend": jax.default_backend(), "probe": [], "default_model": None, "stub_program": args.stub_program}
    overlaps = {"both": (False, True), "off": (False,), "on": (True,)}[args.probe_overlap]
    if args.stub_program:
        runner_module._sample_step_fn = StubProgram(cfg.vocab_size)
        overlaps = (False,)  # the stub's results do not feed placeholders
        args.probe_decode_steps = []  # nor does it stand in for the multi-step program
        args.skip_default_model = True
    loops = [(o, 1) for o in overlaps] + [(False, k) for k in args.probe_decode_steps if k > 1]
    for S, (overlap, k) in ((S, loop) for S in args.seqs for loop in loops):
        r = probe_job(probe, S, args.output_tokens, overlap, args.stub_wait_ms if args.stub_program else 0.0, k)
        report["probe"].append(r)
        print(f"[probe {S} seqs x {args.output_tokens} tokens, async_scheduling={overlap}"
              f"{f', num_decode_steps={k}' if k > 1 else ''}"
              f"{', STUB PROGRAM (host Python alone)' if args.stub_program else ''}"
              f"{f', stub wait {args.stub_wait_ms:g} ms' if args.stub_program and args.stub_wait_ms else ''}] "
              f"{r['tokens_per_s']:.0f} tok/s, host {r['host_ms_per_step']:.2f} ms/step wall "
              f"(mean {r['host_ms_mean']:.2f}), {r['host_cpu_ms_per_step']:.2f} ms/step thread CPU "
              f"(of which launch {r['launch_cpu_ms_per_step']:.2f}; per decode step "
              f"{r['host_cpu_ms_per_decode_step']:.2f}), device wait "
              f"{r['device_wait_ms_per_step']:.2f} ms/step, host CPU ms near output token "
              f"{ {n: round(v, 2) for n, v in r['host_cpu_ms_at_output_token'].items()} }, "
              f"{r['finishing_steps']} steps finishing requests (mean {r['finishing_step_cpu_ms_mean']:.1f} ms), "
              f"{r['steps']} steps in {r['wall_s']:.1f} s; "
              f"compiles: warm-up {r['warmup_compiles']}, after warm-up {r['compiles_after_warmup']}", flush=True)
    if not args.skip_default_model:
        report["default_model"] = {}
        variants = [{}, {"async_scheduling": True}] + [{"num_decode_steps": k} for k in args.decode_steps]
        for kw in variants:
            r = default_model_tokens_per_s(default, 64, args.default_model_tokens, **kw)
            name = ", ".join(f"{k}={v}" for k, v in kw.items()) or "synchronous"
            report["default_model"][name] = r
            print(f"[default model ({r['quantization']}) 64 seqs x {r['output_tokens']} tokens, {name}] "
                  f"{r['tokens_per_s']:.1f} tok/s "
                  f"({r['tokens_per_s'] / report['default_model']['synchronous']['tokens_per_s']:.2f}x synchronous)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
