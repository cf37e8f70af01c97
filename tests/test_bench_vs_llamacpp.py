"""scripts/bench_vs_llamacpp.py: its parsing, and a tiny run of its ridgeline half (llama.cpp's half only
when RIDGELINE_LLAMA_BATCHED_BENCH names a llama-batched-bench binary)."""

import importlib.util
import os
import pathlib
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_vs_llamacpp.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_configs_parse_presets_and_json(bench):
    configs = bench.parse_configs('float32, wide:{"quantization": "int8", "max_num_seqs": 64},int8')
    assert configs == [("float32", {"dtype": "float32"}),
                       ("wide", {"quantization": "int8", "max_num_seqs": 64}),
                       ("int8", {"dtype": "float32", "quantization": "int8"})]
    with pytest.raises(ValueError, match="'fp9' is not one of"):
        bench.parse_configs("float32,fp9")
    with pytest.raises(ValueError, match="must be a JSON object"):
        bench.parse_configs("x:[1, 2]")


def test_batched_bench_output_parses_in_both_formats(bench):
    table = """
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    64 |     32 |    1 |     96 |    0.201 |   318.41 |    0.322 |    99.38 |    0.523 |   183.56 |
|    64 |     32 |   16 |   1536 |    3.112 |   329.05 |    2.278 |   224.76 |    5.390 |   284.97 |
"""
    assert bench.parse_batched_bench(table) == {1: 0.523, 16: 5.39}
    jsonl = ('{"n_kv_max": 6144, "pp": 64, "tg": 32, "pl": 4, "n_kv": 384, "t_pp": 0.8, "speed_pp": 320.0, '
             '"t_tg": 0.84, "speed_tg": 152.4, "t": 1.64, "speed": 234.1}\nllama_perf_context_print: ...\n')
    assert bench.parse_batched_bench(jsonl) == {4: 1.64}


def test_ridgeline_half_runs_the_workload(bench, capsys):
    binary = os.environ.get("RIDGELINE_LLAMA_BATCHED_BENCH")
    argv = ["--batches", "1", "--prompt-tokens", "5", "--new-tokens", "2", "--configs", "float32",
            "--peak-gflops", "0"] + (["--llama-batched-bench", binary] if binary else [])
    results = bench.main(argv)
    systems = {r.system for r in results}
    assert "ridgeline float32" in systems and ("llama.cpp" in systems) == bool(binary)
    assert all(r.batch == 1 and r.seconds > 0 for r in results)
    assert "| ridgeline float32 | 1 |" in capsys.readouterr().out
