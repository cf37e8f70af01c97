"""Tensor / data parallelism: the same logits and greedy tokens as one device, and clear layout errors.

Multi-device cases need XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported,
and pytest imports every test module into one process, so they run in a subprocess: this file is also
that subprocess' script (`python tests/test_sharding.py CASE OUT.json`). The model is PRESETS["tiny"]
with 8 query heads and 2 KV heads: TP 2 shards the KV pool (1 KV head per device); TP 4 and 8 have
fewer KV heads than devices, so each KV head is replicated on tp/2 devices (still 1 per device).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
WORKER_TIMEOUT_S = 300


def tiny_config():
    from model.config import PRESETS

    return dataclasses.replace(PRESETS["tiny"], num_heads=8, num_kv_heads=2, head_dim=8, name="tiny-h8-kv2")


# ----------------------------------------------------------------------------------------------------
# In-process tests: rules and errors that need no devices (AbstractMesh only has axis sizes)
# ----------------------------------------------------------------------------------------------------

def abstract_mesh(tp: int, dp: int = 1):
    from jax.sharding import AbstractMesh

    return AbstractMesh((dp, tp), ("data", "model"))


TP = ("model", "kv_replica")  # the whole tensor-parallel group (sharding.rules.TP)


def test_param_specs_megatron_layout():
    import jax
    from jax.sharding import PartitionSpec as P
    from model.llama import init_params
    from sharding.rules import cache_spec, param_specs, rules_mesh

    cfg = tiny_config()
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    mesh = abstract_mesh(2)
    assert dict(rules_mesh(mesh, cfg).shape) == {"data": 1, "model": 2, "kv_replica": 1}
    specs = param_specs(params, cfg, mesh)
    layers = specs["layers"]
    assert specs["embed"] == P("model", None) and specs["lm_head"] == P(None, "model")
    assert layers["wq"] == layers["wk"] == layers["wv"] == P(None, None, "model")
    assert layers["wo"] == P(None, "model", None)
    assert layers["w_gate"] == layers["w_up"] == P(None, None, "model")
    assert layers["w_down"] == P(None, "model", None)
    assert layers["attn_norm"] == P(None, None) and specs["final_norm"] == P(None)
    assert cache_spec(cfg, mesh) == P("model", None, None, None)


@pytest.mark.parametrize("tp, kv_groups", [(4, 2), (8, 2)])
def test_gqa_fewer_kv_heads_than_tp_replicates_kv_heads(tp, kv_groups):
    import jax
    from jax.sharding import PartitionSpec as P
    from model.llama import init_params
    from sharding.rules import cache_spec, param_specs, rules_mesh

    cfg = tiny_config()  # 8 query heads, 2 KV heads
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    mesh = abstract_mesh(tp, dp=2)
    # "model" becomes [KV groups, replicas per group]: each device keeps one KV head, its query heads use it.
    assert dict(rules_mesh(mesh, cfg).shape) == {"data": 2, "model": kv_groups, "kv_replica": tp // kv_groups}
    specs = param_specs(params, cfg, mesh)
    assert specs["layers"]["wq"] == P(None, None, TP)                 # query heads split tp ways
    assert specs["layers"]["wk"] == specs["layers"]["wv"] == P(None, None, "model")
    assert cache_spec(cfg, mesh) == P("model", None, None, None)


def test_kv_heads_coprime_with_tp_fully_replicated():
    from jax.sharding import PartitionSpec as P
    from sharding.rules import cache_spec

    cfg = dataclasses.replace(tiny_config(), num_heads=6, num_kv_heads=3, head_dim=8)
    assert cache_spec(cfg, abstract_mesh(2)) == P(None, None, None, None)


def test_quantized_weight_specs():
    import jax
    from jax.sharding import PartitionSpec as P
    from model.llama import init_params
    from model.quantize import quantize_params
    from sharding.rules import param_specs

    cfg = tiny_config()  # hidden 64, intermediate 96, heads*hd 64

    def quantized(mode):  # shapes only: nothing is computed
        return jax.eval_shape(lambda: quantize_params(init_params(cfg, jax.random.PRNGKey(0)), mode, group_size=32))

    q8 = param_specs(quantized("int8"), cfg, abstract_mesh(4))["layers"]
    assert (q8["wq"].values, q8["wq"].scales) == (P(None, None, TP), P(None, TP))
    assert (q8["wo"].values, q8["wo"].scales) == (P(None, TP, None), P(None, None))
    assert (q8["wk"].values, q8["wk"].scales) == (P(None, None, "model"), P(None, "model"))
    q4 = param_specs(quantized("int4"), cfg, abstract_mesh(2))["layers"]
    # w_down [96 -> 64]: 3 groups of 32 cannot split in 2 on group boundaries -> its input dim is replicated.
    assert q4["w_down"].values == q4["w_down"].scales == q4["w_down"].zeros == P(None, None, None)
    # wo [64 -> 64]: 2 groups, one per device: packed values and scales split alike.
    assert q4["wo"].values == q4["wo"].scales == q4["wo"].zeros == P(None, "model", None)
    assert q4["w_up"].values == q4["w_up"].scales == P(None, None, "model")


def test_heads_not_divisible_by_tp_names_values():
    from sharding.rules import check_layout, resolve_rules

    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"num_heads=8 .*tensor_parallel_size=3"):
        check_layout(cfg, 3)
    with pytest.raises(ValueError, match=r"num_heads=8"):
        resolve_rules(cfg, 16)


def test_uneven_mlp_replicates_with_warning():
    from sharding.rules import resolve_rules

    cfg = dataclasses.replace(tiny_config(), intermediate_size=90)
    with pytest.warns(UserWarning, match=r"intermediate_size=90 .*tensor_parallel_size=4"):
        rules = resolve_rules(cfg, 4)
    assert rules["mlp"] is None and rules["heads"] == TP


def test_more_devices_than_present_names_both_numbers():
    import jax
    from sharding.mesh import make_mesh

    have = len(jax.devices())
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={have + 1} x data_parallel_size=2 needs "
                                         rf"{2 * (have + 1)} devices, but only {have} "):
        make_mesh(have + 1, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=0"):
        make_mesh(0, 1)


class _FakeEngine:
    """Just enough of Engine for routing: requests finish after `steps` steps."""

    def __init__(self, steps: int = 2):
        from types import SimpleNamespace

        self.requests: dict[str, int] = {}
        self.scheduler = SimpleNamespace(num_unfinished=0)
        self.steps, self.closed = steps, False

    def add_request(self, rid, ids, params, prompt=None):
        self.requests[rid] = self.steps
        self.scheduler.num_unfinished = len(self.requests)
        return rid

    def abort(self, rid):
        ok = self.requests.pop(rid, None) is not None
        self.scheduler.num_unfinished = len(self.requests)
        return ok

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        from types import SimpleNamespace

        outs = []
        for rid in list(self.requests):
            self.requests[rid] -= 1
            done = self.requests[rid] == 0
            if done:
                del self.requests[rid]
            outs.append(SimpleNamespace(request_id=rid, finished=done))
        self.scheduler.num_unfinished = len(self.requests)
        return outs

    def scheduler_stats(self):
        return {"steps": 1, "name": "x"}

    def close(self):
        self.closed = True


def test_data_parallel_engine_routes_and_collects():
    from inference.data_parallel import DataParallelEngine

    engines = [_FakeEngine(), _FakeEngine()]
    dp = DataParallelEngine(engines)
    for i in range(5):
        dp.add_request(f"r{i}", [1], None)
    assert sorted(engines[0].requests) == ["r0", "r2", "r4"] and sorted(engines[1].requests) == ["r1", "r3"]
    with pytest.raises(ValueError, match="already queued"):
        dp.add_request("r1", [1], None)
    assert dp.abort("r3") and not dp.abort("r3")
    final = dp.run()
    assert sorted(final) == ["r0", "r1", "r2", "r4"] and not dp.has_unfinished_requests()
    assert dp.scheduler_stats()["steps"] == 2 and len(dp.scheduler_stats()["replicas"]) == 2
    dp.close()
    assert all(e.closed for e in engines)


def test_sharding_imports_nothing_from_inference():
    """Data flows down the layers: sharding/ may use model/ and pallas_kernels/, never inference/."""
    import ast

    upward = []
    for path in sorted((REPO / "sharding").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            upward += [f"{path.name}: {n}" for n in names if n == "inference" or n.startswith("inference.")]
    assert upward == []


DP_MAX_TOKENS = 12


@pytest.fixture(scope="module")
def dp_setup():
    """Tiny-model params, prompts and their greedy tokens from one plain Engine (which also compiles the
    step programs every engine of this config shares)."""
    import jax
    from inference.engine import Engine, EngineConfig
    from inference.sampling_params import SamplingParams
    from model.llama import init_params

    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompts = engine_prompts()
    sp = SamplingParams(temperature=0, max_tokens=DP_MAX_TOKENS, ignore_eos=True)
    engine = Engine(cfg, params, None, EngineConfig(**ENGINE_KW))
    ids = [engine.add_request(None, p, sp) for p in prompts]
    final = engine.run()
    engine.close()
    return cfg, params, prompts, sp, [final[i].token_ids for i in ids]


def _dp_engines(dp_setup, step_delays):
    """Real engines on this process' device, one per delay; a delay > 0 makes every step of that engine
    sleep first (a slow replica). Returns the engines and, per engine, the wall times its steps began."""
    import time

    from inference.engine import Engine, EngineConfig

    cfg, params = dp_setup[:2]
    engines, starts = [], []
    for delay in step_delays:
        engine = Engine(cfg, params, None, EngineConfig(**ENGINE_KW))
        began: list = []

        def step(engine=engine, began=began, delay=delay, plain=engine.step):
            began.append(time.monotonic())
            time.sleep(delay)
            return plain()

        engine.step = step
        engines.append(engine)
        starts.append(began)
    return engines, starts


def _no_replica_threads_left():
    import threading

    return not [t for t in threading.enumerate() if t.name.startswith("dp-replica") and t.is_alive()]


def test_data_parallel_replicas_step_independently(dp_setup):
    """Replica 0 takes 0.3 s a step, replica 1 is fast. Lockstep would finish both requests in the same
    step; independent replicas finish the fast one while the slow one has only a few of its tokens."""
    from inference.data_parallel import DataParallelEngine

    _, _, prompts, sp, want = dp_setup
    engines, _ = _dp_engines(dp_setup, [0.3, 0.0])
    dp = DataParallelEngine(engines)
    slow_id, fast_id = dp.add_request("slow", prompts[0], sp), dp.add_request("fast", prompts[1], sp)
    tokens_so_far = {slow_id: 0}
    slow_tokens_when_fast_finished = None
    final = {}
    while dp.has_unfinished_requests():
        for out in dp.step():  # streamed outputs: every step's progress of each request
            if out.request_id == slow_id:
                tokens_so_far[slow_id] = len(out.token_ids)
            if out.finished:
                final[out.request_id] = out
                if out.request_id == fast_id:
                    slow_tokens_when_fast_finished = tokens_so_far[slow_id]
    dp.close()
    assert final[fast_id].token_ids == want[1] and final[slow_id].token_ids == want[0]
    assert slow_tokens_when_fast_finished is not None and slow_tokens_when_fast_finished <= DP_MAX_TOKENS // 2
    assert _no_replica_threads_left()


def test_data_parallel_replica_error_fails_only_its_requests(dp_setup):
    from inference.data_parallel import DataParallelEngine

    _, _, prompts, sp, want = dp_setup
    engines, _ = _dp_engines(dp_setup, [0.0, 0.0])
    healthy_step, calls = engines[0].step, [0]

    def broken_step():
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("device lost")
        return healthy_step()

    engines[0].step = broken_step
    dp = DataParallelEngine(engines)
    ids = [dp.add_request(f"r{i}", p, sp, stream=False) for i, p in enumerate(prompts)]  # r0, r2 on replica 0
    final = dp.run()
    assert sorted(final) == sorted(ids)
    for i in (0, 2):
        assert final[ids[i]].finish_reason == "error"
        assert final[ids[i]].error == "data-parallel replica 0 of 2 failed: RuntimeError: device lost"
    for i in (1, 3):
        assert final[ids[i]].error is None and final[ids[i]].token_ids == want[i]
    # The failed replica takes no more requests; the other serves them.
    late = dp.add_request("late", prompts[0], sp, stream=False)
    assert dp.run()[late].token_ids == want[0]
    dp.close()
    assert _no_replica_threads_left()


def test_data_parallel_interrupt_pauses_every_replica(dp_setup):
    """Ctrl-C in step(): when it propagates no replica is stepping, and none starts a step until the next
    call; then the same requests carry on to the same tokens. close() ends the threads."""
    import _thread
    import threading
    import time

    from inference.data_parallel import DataParallelEngine

    _, _, prompts, sp, want = dp_setup
    # Steps slow enough that the job (>= 12 steps of 0.2 s) outlasts the interrupt at 0.5 s on a loaded machine.
    engines, starts = _dp_engines(dp_setup, [0.2, 0.1])
    dp = DataParallelEngine(engines)
    ids = [dp.add_request(None, p, sp, stream=False) for p in prompts]
    # interrupt_main acts like a real SIGINT: it does nothing where SIGINT is ignored (a process started in
    # the background by a script) and runs whatever handler an earlier test left; use Python's own here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    final = {}
    try:
        with pytest.raises(KeyboardInterrupt):
            while dp.has_unfinished_requests():
                final.update({o.request_id: o for o in dp.step() if o.finished})
    finally:
        signal.signal(signal.SIGINT, previous)
    interrupted = time.monotonic()
    time.sleep(0.3)
    assert all(t < interrupted for began in starts for t in began)  # nothing started after the interrupt
    assert dp.has_unfinished_requests()
    final.update(dp.run())
    assert [final[i].token_ids for i in ids] == want
    dp.close()
    assert _no_replica_threads_left()


# ----------------------------------------------------------------------------------------------------
# Multi-device tests: one subprocess per case, 8 virtual CPU devices
# ----------------------------------------------------------------------------------------------------

def run_worker(case: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{case}.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, case, str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT_S)
    assert proc.returncode == 0, f"worker {case} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def forward_results(tmp_path_factory):
    return run_worker("forward", tmp_path_factory.mktemp("sharding"))


@pytest.mark.parametrize("layout", ["tp1", "tp2", "tp4", "tp2xdp2", "tp8"])
def test_sharded_forward_matches_one_device(forward_results, layout):
    r = forward_results[layout]
    assert r["max_abs_diff"] < 1e-4, r
    assert r["max_abs_ref"] > 1e-2  # the comparison is not vacuous


def test_kv_pool_layout_and_no_pool_collectives(forward_results):
    # One of the 2 KV heads per device at every TP degree (TP 4 / 8: each KV head on tp/2 devices).
    for layout in ("tp2", "tp4", "tp8", "tp2xdp2"):
        assert forward_results[layout]["cache_shard_shape"][0] == 1, forward_results[layout]
        assert forward_results[layout]["kv_pool_split"] == 2
    assert forward_results["tp1"]["cache_shard_shape"][0] == 2 and forward_results["tp1"]["kv_pool_split"] == 1
    # Attention stays local to each device's heads: no collective moves (a shard of) the KV pool.
    for layout in LAYOUTS:
        assert forward_results[layout]["pool_collectives"] == [], forward_results[layout]


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    return run_worker("engine", tmp_path_factory.mktemp("sharding"))


@pytest.mark.parametrize("layout", ["llm_tp4", "engine_tp2xdp2"])
def test_sharded_engine_greedy_tokens_match_one_device(engine_results, layout):
    ref, got = engine_results["llm_tp1"], engine_results[layout]
    assert got["tokens"] == ref["tokens"]
    np.testing.assert_allclose(got["logprobs"], ref["logprobs"], atol=1e-4)


def test_data_parallel_engine_splits_the_job(engine_results):
    per_replica = engine_results["engine_tp2xdp2"]["requests_per_replica"]
    assert per_replica == [2, 2]


def test_llm_layout_errors(engine_results):
    errors = engine_results["errors"]
    assert "num_heads=8" in errors["tp3"] and "tensor_parallel_size=3" in errors["tp3"]
    assert "needs 16 devices" in errors["tp8xdp2"] and f"only {NUM_DEVICES} " in errors["tp8xdp2"]


# ----- Pallas kernels under tensor parallelism (shard_map), attn_impl="pallas_interpret" -----
# Tolerance: TP splits only heads (attention, KV writes) and adds the wo / w_down all-reduces, so logits
# differ from one device by float32 summation order only (observed ~2e-6 at these sizes).
PALLAS_TP_LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def pallas_tp_results(tmp_path_factory):
    return run_worker("pallas_tp", tmp_path_factory.mktemp("sharding"))


@pytest.mark.parametrize("model", ["mha8", "gqa_kv2"])
def test_pallas_tp_logits_match_one_device(pallas_tp_results, model):
    r = pallas_tp_results[model]
    assert sorted(r["logits"]) == ["tp2", "tp4", "tp8"]
    for tp, diff in r["logits"].items():
        assert diff["max_abs_diff"] < PALLAS_TP_LOGITS_ATOL, (model, tp, diff)
        assert diff["max_abs_ref"] > 1e-2
    # The KV pool shard each device holds: 8 KV heads split up to 8 ways; 2 KV heads split 2 ways and
    # replicated beyond (TP 4 / 8).
    assert r["pool_heads_per_device"] == ({"tp1": 8, "tp2": 4, "tp4": 2, "tp8": 1} if model == "mha8"
                                          else {"tp1": 2, "tp2": 1, "tp4": 1, "tp8": 1})


def test_kv_pool_sized_from_per_device_bytes(pallas_tp_results):
    """A 4 MiB per-device KV budget: each device holds 8 / tp of the 8 KV heads of every page, so TP t fits
    t times the pages of one device, and no device holds more than the budget."""
    sizing = pallas_tp_results["sizing"]
    base = sizing["tp1"]["num_pages"]
    assert base == KV_BUDGET_BYTES // (2 * 2 * 8 * PAGE_SIZE * 16 * 4)  # K+V, 2 layers, 8 KV heads, hd 16, f32
    for tp in (1, 2, 4, 8):
        got = sizing[f"tp{tp}"]
        assert got["num_pages"] == tp * base, (tp, got)
        assert KV_BUDGET_BYTES - got["page_bytes_per_device"] < got["pool_bytes_per_device"] <= KV_BUDGET_BYTES, got


def test_pallas_tp_engine_greedy_tokens_match_one_device(pallas_tp_results):
    runs = pallas_tp_results["engine"]
    assert sorted(runs) == ["tp1", "tp2", "tp4", "tp8"]
    for tp in ("tp2", "tp4", "tp8"):
        assert runs[tp]["tokens"] == runs["tp1"]["tokens"], tp
        np.testing.assert_allclose(runs[tp]["logprobs"], runs["tp1"]["logprobs"], atol=PALLAS_TP_LOGITS_ATOL)
    np.testing.assert_allclose(runs["tp8"]["score"], runs["tp1"]["score"], atol=PALLAS_TP_LOGITS_ATOL)


@pytest.mark.parametrize("model", ["mha8", "gqa_kv2"])
def test_pallas_tp_kernels_see_per_device_shapes(pallas_tp_results, model):
    """The TP step lowered for CUDA (impl="pallas"): every Triton custom call sits inside the shard_map
    (sdy.manual_computation) and its KV pool operands have one device's KV heads, not all of them."""
    low = pallas_tp_results[model]["cuda_lowering"]
    assert low["manual_computations"] >= 1
    assert low["triton_calls"] >= 2  # the KV update and the ragged attention, at least
    assert low["calls_with_local_pool"] == low["calls_with_pool"] >= 2, low
    assert low["calls_with_global_pool"] == 0, low
    assert low["calls_outside_manual"] == 0, low


@pytest.mark.slow
def test_sharded_quantized_forward_matches_one_device(tmp_path):
    r = run_worker("quantized", tmp_path)
    for name in ("int8", "int4", "int8-tied"):
        assert r[name]["max_abs_diff"] < 1e-4, r


# ----------------------------------------------------------------------------------------------------
# Worker (runs in the subprocess, with NUM_DEVICES CPU devices)
# ----------------------------------------------------------------------------------------------------

PAGE_SIZE, PAGES_PER_SEQ, PAD_TOKENS, PAD_SEQS = 16, 2, 32, 4
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "tp4": (4, 1), "tp2xdp2": (2, 2), "tp8": (8, 1)}


def ragged_step(seqs):
    """One ragged StepInputs for several (token_ids, start) sequences, sequence i on its own pages
    [i * PAGES_PER_SEQ, (i + 1) * PAGES_PER_SEQ); logits at every real token; padded to fixed sizes so
    every step shares one compiled program."""
    import jax.numpy as jnp
    from inference.simple import single_sequence_inputs
    from model.llama import StepInputs

    parts = [single_sequence_inputs(ids, start, PAGE_SIZE, PAGES_PER_SEQ, logits_rows="all") for ids, start in seqs]
    a = {k: [np.asarray(getattr(p, k)) for p in parts] for k in StepInputs._fields}
    lens = [len(ids) for ids, _ in seqs]
    T, pad = sum(lens), PAD_TOKENS - sum(lens)
    shift = [i * PAGES_PER_SEQ for i in range(len(seqs))]
    cu = np.concatenate([[0], np.cumsum(lens), np.full(PAD_SEQS - len(seqs), T)]).astype(np.int32)
    block_tables = np.zeros((PAD_SEQS, PAGES_PER_SEQ), np.int32)
    block_tables[:len(seqs)] = np.concatenate([b + s for b, s in zip(a["block_tables"], shift)])
    inputs = StepInputs(
        tokens=np.concatenate(a["tokens"] + [np.zeros(pad, np.int32)]),
        positions=np.concatenate(a["positions"] + [np.zeros(pad, np.int32)]),
        slot_mapping=np.concatenate([m + s * PAGE_SIZE for m, s in zip(a["slot_mapping"], shift)]
                                    + [np.full(pad, -1, np.int32)]),
        cu_q_lens=cu,
        kv_lens=np.concatenate(a["kv_lens"] + [np.zeros(PAD_SEQS - len(seqs), np.int32)]),
        block_tables=block_tables,
        num_seqs=np.array([len(seqs)], np.int32),
        logits_indices=np.concatenate([np.arange(T), np.zeros(pad, np.int64)]).astype(np.int32),
    )
    return StepInputs(*(jnp.asarray(x) for x in inputs)), T


def two_ragged_steps(params, cache, step_fn):
    """A prefill of three prompts, then a mixed step (two decodes and a 5-token chunk) on the same pages."""
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(1, 256, n).tolist() for n in (7, 12, 5))
    logits = []
    for seqs in ([(a, 0), (b, 0), (c, 0)], [([a[0]], 7), (b[:5], 12), ([c[1]], 5)]):
        inputs, T = ragged_step(seqs)
        out, cache = step_fn(params, cache, inputs)
        logits.append(np.asarray(out)[:T])
    return np.concatenate(logits), cache


def worker_forward(results: dict):
    import re

    import jax
    from model.llama import forward, init_cache, init_params
    from sharding.mesh import make_mesh
    from sharding.rules import cache_sharding, kv_pool_split, shard_params

    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    num_pages = PAGES_PER_SEQ * PAD_SEQS
    step = jax.jit(lambda p, c, i: forward(p, c, i, cfg), donate_argnums=(1,))
    ref, _ = two_ragged_steps(params, init_cache(cfg, num_pages, PAGE_SIZE), step)
    for name, (tp, dp) in LAYOUTS.items():
        mesh = make_mesh(tp, dp)
        sharded = shard_params(params, cfg, mesh)
        sharding = cache_sharding(cfg, mesh)
        cache = jax.device_put(init_cache(cfg, num_pages, PAGE_SIZE), sharding)
        pool_shape = tuple(cache["k"].shape)
        # Compile once (every step has the same padded shapes), inspect the program, then run it.
        compiled = step.lower(sharded, cache, ragged_step([([1, 2, 3], 0)])[0]).compile()
        shard_shape = sharding["k"].shard_shape(pool_shape)
        pool = "|".join(re.escape("[" + ",".join(map(str, s)) + "]") for s in {pool_shape, shard_shape})
        collectives = [ln.strip()[:160] for ln in compiled.as_text().splitlines()
                       if re.search(r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(", ln)
                       and re.search(pool, ln)]
        got, cache = two_ragged_steps(sharded, cache, compiled)
        results[name] = {"max_abs_diff": float(np.abs(got - ref).max()), "max_abs_ref": float(np.abs(ref).max()),
                         "cache_shard_shape": list(shard_shape), "kv_pool_split": kv_pool_split(cfg, sharding),
                         "cache_out_spec": str(cache["k"].sharding.spec), "pool_collectives": collectives}


class TinyTokenizer:
    """LLM needs a tokenizer; prompts here are token ids, so only decode / eos are used."""

    eos_token_id = None

    def encode(self, text):
        return [ord(ch) % 256 for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


ENGINE_KW = dict(page_size=16, num_pages=16, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)


def engine_prompts():
    # 8 prompt tokens in all: the prefill step and the decode steps share the smallest bucket (T=8, S=4), so
    # each engine compiles one program (the ragged forward checks above cover longer prompts).
    rng = np.random.default_rng(0)
    return [rng.integers(1, 256, n).tolist() for n in (3, 1, 2, 2)]


def summarize(outputs) -> dict:
    tokens = [o.outputs[0].token_ids for o in outputs]
    logprobs = [[lp[t] for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outputs]
    return {"tokens": tokens, "logprobs": logprobs}


def worker_engine(results: dict):
    import jax
    from inference.data_parallel import DataParallelEngine
    from inference.llm import LLM
    from inference.sampling_params import SamplingParams
    from model.llama import init_params

    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    sp = SamplingParams(temperature=0, max_tokens=4, logprobs=1)
    prompts = engine_prompts()

    # One device, and TP 4 through LLM's own hook (make_mesh / shard_params / cache_sharding).
    for name, tp in (("llm_tp1", 1), ("llm_tp4", 4)):
        with LLM(tensor_parallel_size=tp, _loaded=(cfg, params, TinyTokenizer()), **ENGINE_KW) as llm:
            results[name] = summarize(llm.generate(prompts, sp))

    # DP 2 x TP 2: one engine per replica group (LLM builds them), the requests split between them.
    llm = LLM(tensor_parallel_size=2, data_parallel_size=2, _loaded=(cfg, params, TinyTokenizer()), **ENGINE_KW)
    dp_engine = llm.engine
    assert isinstance(dp_engine, DataParallelEngine), type(dp_engine)
    for i, ids in enumerate(prompts):
        dp_engine.add_request(f"r{i}", ids, sp)
    per_replica = [e.scheduler.num_unfinished for e in dp_engine.engines]
    final = dp_engine.run()
    llm.close()
    results["engine_tp2xdp2"] = {**summarize([final[f"r{i}"] for i in range(len(prompts))]),
                                 "requests_per_replica": per_replica}

    errors = {}
    for name, (tp, dp) in {"tp3": (3, 1), "tp8xdp2": (8, 2)}.items():
        try:
            LLM(tensor_parallel_size=tp, data_parallel_size=dp, _loaded=(cfg, params, TinyTokenizer()), **ENGINE_KW)
            errors[name] = "no error"
        except ValueError as e:
            errors[name] = str(e)
    results["errors"] = errors


def worker_quantized(results: dict):
    import jax
    from model.llama import forward, init_cache, init_params
    from model.quantize import quantize_params
    from sharding.mesh import make_mesh
    from sharding.rules import cache_sharding, shard_params

    untied = tiny_config()
    tied = dataclasses.replace(untied, tie_word_embeddings=True)  # with an int8 head copy of the embedding
    num_pages = PAGES_PER_SEQ * PAD_SEQS
    for name, mode, cfg in (("int8", "int8", untied), ("int4", "int4", untied), ("int8-tied", "int8", tied)):
        step = jax.jit(lambda p, c, i, cfg=cfg: forward(p, c, i, cfg), donate_argnums=(1,))
        params = quantize_params(init_params(cfg, jax.random.PRNGKey(0)), mode, group_size=32,
                                 quantize_lm_head=cfg.tie_word_embeddings)
        ref, _ = two_ragged_steps(params, init_cache(cfg, num_pages, PAGE_SIZE), step)
        mesh = make_mesh(2, 1)
        cache = jax.device_put(init_cache(cfg, num_pages, PAGE_SIZE), cache_sharding(cfg, mesh))
        got, _ = two_ragged_steps(shard_params(params, cfg, mesh), cache, step)
        results[name] = {"max_abs_diff": float(np.abs(got - ref).max())}


def pallas_tp_configs():
    """mha8: 16 query heads / 8 KV heads, so TP 8 still splits the KV pool; gqa_kv2: 2 KV heads, replicated
    at TP 4 / 8. head_dim 16: the smallest the Pallas GPU kernels lower for."""
    base = dataclasses.replace(tiny_config(), head_dim=16)
    return {"mha8": dataclasses.replace(base, num_heads=16, num_kv_heads=8, name="tiny-h16-kv8"),
            "gqa_kv2": dataclasses.replace(base, num_heads=8, num_kv_heads=2, name="tiny-h8-kv2-hd16")}


def lowering_summary(lowered_text: str, global_pool: tuple, local_pool: tuple) -> dict:
    """Counts the Triton custom calls of a CUDA lowering, where they sit and which pool shapes they see."""
    import re

    # Functions called from inside a shard_map body (they hold the kernels: jit-wrapped wrappers).
    lines = lowered_text.splitlines()
    manual_lines, depth, inside = set(), 0, False
    for i, ln in enumerate(lines):
        if "sdy.manual_computation" in ln:
            inside, depth = True, 0
        if inside:
            manual_lines.add(i)
            depth += ln.count("{") - ln.count("}")
            if depth <= 0 and "}" in ln:
                inside = False
    called_in_manual = {m for i in manual_lines for m in re.findall(r"call @([\w$.-]+)", lines[i])}
    func_of_line, func = [], None
    for ln in lines:
        m = re.match(r"\s*func\.func (?:private |public )?@([\w$.-]+)", ln)
        if m:
            func = m.group(1)
        func_of_line.append(func)
    # Calls nest (wrapper -> jitted kernel fn): close over them.
    changed = True
    while changed:
        changed = False
        for i, ln in enumerate(lines):
            if func_of_line[i] in called_in_manual:
                for m in re.findall(r"call @([\w$.-]+)", ln):
                    if m not in called_in_manual:
                        called_in_manual.add(m)
                        changed = True
    calls = [(i, ln) for i, ln in enumerate(lines) if "__gpu$xla.gpu.triton" in ln]
    # KV-head counts of every pool-shaped operand of each call (its type signature follows the last " : ").
    pool_re = re.compile(r"tensor<(\d+)x" + "x".join(map(str, global_pool[1:])) + r"x\w+>")
    heads = [[int(h) for h in pool_re.findall(ln.rsplit(" : ", 1)[-1])] for _, ln in calls]
    return {"manual_computations": sum("sdy.manual_computation" in ln for ln in lines),
            "triton_calls": len(calls),
            "calls_with_pool": sum(bool(h) for h in heads),
            "calls_with_local_pool": sum(bool(h) and set(h) == {local_pool[0]} for h in heads),
            "calls_with_global_pool": sum(global_pool[0] in h for h in heads) if global_pool[0] != local_pool[0] else 0,
            "calls_outside_manual": sum(i not in manual_lines and func_of_line[i] not in called_in_manual
                                        for i, _ in calls)}


KV_BUDGET_BYTES = 4 << 20


def worker_pallas_tp(results: dict):
    import jax
    from inference.engine import Engine, EngineConfig
    from inference.llm import LLM
    from inference.sampling_params import SamplingParams
    from model.llama import forward, init_cache, init_params
    from sharding.mesh import make_mesh
    from sharding.rules import bytes_per_device, cache_sharding, shard_params

    num_pages = PAGES_PER_SEQ * PAD_SEQS
    for name, cfg in pallas_tp_configs().items():
        params = init_params(cfg, jax.random.PRNGKey(0))
        step = jax.jit(lambda p, c, i: forward(p, c, i, cfg, attn_impl="pallas_interpret"), donate_argnums=(1,))
        ref, _ = two_ragged_steps(params, init_cache(cfg, num_pages, PAGE_SIZE), step)
        r = {"logits": {}, "pool_heads_per_device": {"tp1": cfg.num_kv_heads}}
        for tp in (2, 4, 8):
            mesh = make_mesh(tp, 1)
            sharding = cache_sharding(cfg, mesh)
            cache = init_cache(cfg, num_pages, PAGE_SIZE, sharding=sharding)
            r["pool_heads_per_device"][f"tp{tp}"] = cache["k"].addressable_shards[0].data.shape[0]
            sharded = shard_params(params, cfg, mesh)
            got, cache = two_ragged_steps(sharded, cache, step)
            r["logits"][f"tp{tp}"] = {"max_abs_diff": float(np.abs(got - ref).max()),
                                      "max_abs_ref": float(np.abs(ref).max())}
            if tp == 8:
                pallas = jax.jit(lambda p, c, i: forward(p, c, i, cfg, attn_impl="pallas"))
                text = pallas.trace(sharded, cache, ragged_step([([1, 2, 3], 0)])[0]).lower(
                    lowering_platforms=("cuda",)).as_text()
                r["cuda_lowering"] = lowering_summary(text, tuple(cache["k"].shape),
                                                      sharding["k"].shard_shape(cache["k"].shape))
        results[name] = r

    # KV sizing from a per-device budget (nothing runs: only the pool is created).
    cfg = pallas_tp_configs()["mha8"]
    params = init_params(cfg, jax.random.PRNGKey(0))
    results["sizing"] = {}
    for tp in (1, 2, 4, 8):
        group = make_mesh(tp, 1)
        sizing_cfg = EngineConfig(page_size=PAGE_SIZE, kv_cache_memory_bytes=KV_BUDGET_BYTES, max_num_seqs=64,
                                  max_model_len=512)
        engine = Engine(cfg, shard_params(params, cfg, group), None, sizing_cfg, cache_sharding(cfg, group))
        pages = engine.runner.num_pages
        results["sizing"][f"tp{tp}"] = {"num_pages": pages, "pool_bytes_per_device": bytes_per_device(engine.runner.cache),
                                        "page_bytes_per_device": bytes_per_device(engine.runner.cache) // pages}
        engine.close()

    # Greedy tokens through the engine (LLM's own TP set-up) at every TP degree.
    sp = SamplingParams(temperature=0, max_tokens=4, logprobs=1)
    results["engine"] = {}
    for tp in (1, 2, 4, 8):
        with LLM(tensor_parallel_size=tp, attn_impl="pallas_interpret", _loaded=(cfg, params, TinyTokenizer()),
                 **ENGINE_KW) as llm:
            results["engine"][f"tp{tp}"] = summarize(llm.generate(engine_prompts(), sp))
            if tp in (1, 8):  # scoring: a packed ragged step over a TP-sharded scratch pool (kernels shard_mapped)
                results["engine"][f"tp{tp}"]["score"] = llm.score("tensor parallel flash")[0].token_logprobs[1:]


if __name__ == "__main__":
    case, out_path = sys.argv[1], sys.argv[2]
    sys.path.insert(0, str(REPO))
    import jax

    assert len(jax.devices()) >= NUM_DEVICES, f"need {NUM_DEVICES} devices, got {jax.devices()}"
    res: dict = {}
    {"forward": worker_forward, "engine": worker_engine, "quantized": worker_quantized,
     "pallas_tp": worker_pallas_tp}[case](res)
    Path(out_path).write_text(json.dumps(res))
