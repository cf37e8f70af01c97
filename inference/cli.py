"""`ridgeline` console entry point.

    ridgeline generate "The capital of France is"
    ridgeline generate --input prompts.jsonl --output results.jsonl [--chat]
    ridgeline batch --input requests.jsonl --output results.jsonl     (OpenAI Batch lines, or the above)
    ridgeline serve --port 8000                                       (OpenAI-compatible HTTP server)
    ridgeline lm-eval --model ridgeline --model_args pretrained=M --tasks T  (lm-evaluation-harness)
    ridgeline convert model.gguf out_dir/
    ridgeline roofline --model default --batches 1,8 --contexts 128 --png docs/roofline.png
    ridgeline bench --preset llama3-8b --dtype bfloat16     (random weights at real shapes)
    ridgeline eval --model ridgeline --model_args pretrained=PATH --tasks hellaswag   (lm-eval's own flags)
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help="a .gguf file, an HF directory, a `ridgeline convert` checkpoint "
                                                  "(default: SmolLM2-135M-Instruct, downloaded on first use)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4", "w8a8", "gguf"],
                   help="weight quantization ('w8a8': int8 weights and int8 activations); 'gguf' keeps the file's "
                        "own Q8_0/Q4_0/Q4_1 blocks; 'auto' (default): 'w8a8' on CPU with --dtype auto ('int8' "
                        "without AVX-512 VNNI), else none")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"])
    p.add_argument("--attn-impl", default="auto", choices=["auto", "xla", "pallas", "pallas_interpret", "reference"])
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)


def _add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(args):
    from inference.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def _make_llm(args):
    from inference.llm import LLM

    quantization = None if args.quantization == "none" else args.quantization
    return LLM(args.model, dtype=args.dtype, quantization=quantization, kv_cache_dtype=args.kv_cache_dtype,
               attn_impl=args.attn_impl, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
               tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size)


def cmd_generate(args) -> int:
    params = _sampling_params(args)
    if args.input:
        if not args.output:
            raise SystemExit("ridgeline generate: --input needs --output")
        return _run_batch(args, params, model_name=None)
    if not args.prompts:
        raise SystemExit("ridgeline generate: give a prompt, or --input prompts.jsonl --output results.jsonl")
    llm = _make_llm(args)
    for prompt in args.prompts:
        target = {"messages": [{"role": "user", "content": prompt}]} if args.chat else prompt
        if args.stream:
            for delta in llm.generate_stream(target, params):
                print(delta.text, end="", flush=True)
            print()
            continue
        out = llm.generate(target, params)[0]
        if out.error:
            print(f"error: {out.error}", file=sys.stderr)
            return 2
        print(out.text if args.chat else prompt + out.text)
    llm.close()
    return 0


def _served_model_name(args) -> str:
    from model.weights import DEFAULT_MODEL

    return args.served_model_name or args.model or DEFAULT_MODEL


def _run_batch(args, params, model_name: Optional[str]) -> int:
    from pathlib import Path

    from inference.batch_job import OutputLock, run_batch_job

    if not Path(args.input).is_file():
        raise FileNotFoundError(f"input file not found: {args.input!r}")
    with OutputLock(args.output) as lock:  # path checked and lock taken before the model loads
        llm = _make_llm(args)
        try:
            summary = run_batch_job(llm, args.input, args.output, default_params=params, chat=args.chat,
                                    show_progress=not args.quiet, model_name=model_name, overwrite=args.overwrite,
                                    output_lock=lock)
        finally:
            llm.close()
    print(summary.format(), file=sys.stderr)
    return 0


def cmd_batch(args) -> int:
    return _run_batch(args, _sampling_params(args), model_name=_served_model_name(args))


def cmd_serve(args) -> int:
    try:
        from inference.server import serve
    except ImportError as e:
        raise SystemExit(f"ridgeline serve needs the [serve] extra (pip install 'ridgeline[serve]'): {e}")
    llm = _make_llm(args)
    if args.warmup:  # compile the common shape buckets before the first request pays for them
        llm.warmup()
    try:
        serve(llm, host=args.host, port=args.port, model_name=_served_model_name(args),
              max_pending_sequences=args.max_pending_sequences, log_level=args.log_level)
    finally:
        llm.close()
    return 0


def cmd_convert(args) -> int:
    from pathlib import Path

    from model.checkpoint import load_model, save_checkpoint

    if Path(args.output).exists():  # checked before the (slow) model load
        raise FileExistsError(f"convert output {args.output!r} already exists; remove it or give a new path")
    cfg, params, tok = load_model(args.model)
    path = save_checkpoint(args.output, cfg, params, tok)
    print(f"saved {cfg.name} ({cfg.num_params() / 1e6:.1f}M params) to {path}", file=sys.stderr)
    return 0


def cmd_roofline(args) -> int:
    from inference import roofline

    roofline.main(args.roofline_args)
    return 0


def cmd_eval(args) -> int:
    try:
        from inference.lm_eval_backend import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"ridgeline eval needs lm-evaluation-harness: pip install -e '.[eval]' ({e})")
    return cli_evaluate(args.lm_eval_args)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="ridgeline", description="LLM inference in JAX/XLA with Pallas kernels")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (one prompt, several, or a JSONL batch job)")
    g.add_argument("prompts", nargs="*")
    g.add_argument("--input", help="JSONL with {id, prompt | messages, sampling?} per line")
    g.add_argument("--output", help="JSONL results, appended and flushed as each request finishes; resumable")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--overwrite", action="store_true", help="--input: empty --output and start over instead of "
                                                            "resuming (a resume with other inputs is refused)")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--quiet", action="store_true")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("batch", help="offline batch job over OpenAI Batch lines ({custom_id, method, url, body}) "
                                     "or {id, prompt | messages} records; resumable")
    b.add_argument("--input", required=True, help="JSONL requests")
    b.add_argument("--output", required=True, help="JSONL results, appended, flushed and fsynced as each finishes")
    b.add_argument("--chat", action="store_true", help="{id, prompt} records: apply the model's chat template")
    b.add_argument("--overwrite", action="store_true",
                   help="empty --output and start over instead of resuming (a resume with other inputs is refused)")
    b.add_argument("--served-model-name", default=None, help="the `model` reported in OpenAI response bodies")
    b.add_argument("--quiet", action="store_true")
    _add_model_args(b)
    _add_sampling_args(b)  # defaults for {id, prompt} records; OpenAI bodies carry their own parameters
    b.set_defaults(func=cmd_batch)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients pass (default: --model as given, or smollm2-135m-instruct)")
    s.add_argument("--max-pending-sequences", type=int, default=256,
                   help="queued + running sequences past which requests get 429")
    s.add_argument("--warmup", action="store_true", help="compile the common batch/prompt shape buckets first")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_model_args(s)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("convert", help="convert a model to an orbax checkpoint for fast reloads")
    c.add_argument("model", nargs="?", default=None)
    c.add_argument("output")
    c.set_defaults(func=cmd_convert)

    for name, help_text in (("roofline", "roofline report: FLOPs, bytes, intensity vs measured peaks, PNG plot"),
                            ("bench", "alias of roofline: measured step times for a sweep of batches/contexts")):
        r = sub.add_parser(name, help=help_text, add_help=False)
        r.add_argument("roofline_args", nargs=argparse.REMAINDER,
                       help="--model/--preset, --batches 1,4,16, --contexts 128,512, --png, --json (see --help)")
        r.set_defaults(func=cmd_roofline)

    e = sub.add_parser("eval", help="lm-evaluation-harness with the `ridgeline` model registered", add_help=False)
    e.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's flags (see `ridgeline eval --help`)")
    e.set_defaults(func=cmd_eval)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("roofline", "bench"):  # its own flags: see `ridgeline roofline --help`
        args = argparse.Namespace(func=cmd_roofline, roofline_args=argv[1:])
    elif argv and argv[0] == "eval":  # lm_eval's own flags
        args = argparse.Namespace(func=cmd_eval, lm_eval_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    from inference.batch_job import BatchJobError

    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, BatchJobError) as e:
        print(f"ridgeline: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
