"""Multi-process runs: two jax.distributed processes on this machine (2 CPU devices each, gloo collectives)
give the same logits and greedy tokens as one process, with TP 4 spanning both processes.

The processes are started by scripts/launch_multihost.sh (free port, time limit, the others stopped when
one fails); this file is also their script (`python tests/test_multihost.py worker OUT_DIR`). Helpers
(tiny model, ragged steps, engine prompts) come from tests/test_sharding.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "scripts" / "launch_multihost.sh"
NUM_PROCESSES, DEVICES_PER_PROCESS, TP = 2, 2, 4
TIMEOUT_S = 240


# ----------------------------------------------------------------------------------------------------
# In-process: settings from flags / environment
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    from sharding import multihost

    for var in (multihost.ENV_COORDINATOR, multihost.ENV_NUM_PROCESSES, multihost.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_no_settings_is_single_process(clean_env):
    from sharding.multihost import initialize_from_env_or_flags, resolve_settings

    assert resolve_settings() is None
    assert initialize_from_env_or_flags() is False
    assert resolve_settings(num_processes=1) is None


def test_env_and_flags(clean_env):
    from sharding.multihost import resolve_settings

    clean_env.setenv("RIDGELINE_COORDINATOR", "host0:1234")
    clean_env.setenv("RIDGELINE_NUM_PROCESSES", "4")
    clean_env.setenv("RIDGELINE_PROCESS_ID", "3")
    assert resolve_settings() == ("host0:1234", 4, 3)
    assert resolve_settings("other:99", None, 0) == ("other:99", 4, 0)  # flags win


def test_bad_settings_name_the_values(clean_env):
    from sharding.multihost import resolve_settings

    with pytest.raises(ValueError, match=r"missing: num_processes, process_id"):
        resolve_settings("host0:1234")
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        resolve_settings("host0:1234", 2, 2)
    clean_env.setenv("RIDGELINE_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"num_processes='two' \(from \$RIDGELINE_NUM_PROCESSES\)"):
        resolve_settings("host0:1234", None, 0)
    with pytest.raises(ValueError, match=r"host:port"):
        resolve_settings("host0", 2, 0)


def test_split_for_process(clean_env):
    from sharding.multihost import split_for_process

    items = list(range(7))
    assert split_for_process(items, 1, 3) == [1, 4]
    assert sorted(sum((split_for_process(items, i, 3) for i in range(3)), [])) == items
    clean_env.setenv("RIDGELINE_NUM_PROCESSES", "2")
    clean_env.setenv("RIDGELINE_PROCESS_ID", "1")
    assert split_for_process(items) == [1, 3, 5]


def test_launcher_rejects_bad_layouts():
    run = lambda *a: subprocess.run(["bash", str(LAUNCH), *a], capture_output=True, text=True, timeout=30)  # noqa
    r = run("-n", "2", "-f", "1", "-l", "1", "--", "true")
    assert r.returncode == 2 and "--coordinator" in r.stderr
    r = run("-n", "2", "-f", "1", "-l", "2", "-c", "h:1", "--", "true")
    assert r.returncode == 2 and "not within 0..1" in r.stderr
    r = run("-n", "2", "--", "false")  # a failing process fails the launch
    assert r.returncode == 1


# ----------------------------------------------------------------------------------------------------
# Two processes vs one
# ----------------------------------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    for var in ("RIDGELINE_COORDINATOR", "RIDGELINE_NUM_PROCESSES", "RIDGELINE_PROCESS_ID"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, [results of each of the two processes])."""
    root = tmp_path_factory.mktemp("multihost")
    single, multi = root / "single", root / "multi"
    single.mkdir()
    multi.mkdir()
    env = _env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={TP}"
    proc = subprocess.run([sys.executable, __file__, "worker", str(single)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"single-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    proc = subprocess.run(["bash", str(LAUNCH), "-n", str(NUM_PROCESSES), "-d", str(DEVICES_PER_PROCESS),
                           "-t", str(TIMEOUT_S - 30), "--", sys.executable, __file__, "worker", str(multi)],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"two-process run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    load = lambda d, i: (json.loads((d / f"process_{i}.json").read_text()), np.load(d / f"process_{i}.npz"))  # noqa
    return load(single, 0), [load(multi, i) for i in range(NUM_PROCESSES)]


def test_two_processes_see_all_devices(runs):
    _, multi = runs
    for i, (meta, _) in enumerate(multi):
        assert meta["process_index"] == i and meta["process_count"] == NUM_PROCESSES
        assert meta["num_devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
        assert meta["num_local_devices"] == DEVICES_PER_PROCESS


def test_two_process_logits_match_one_process(runs):
    (_, ref), multi = runs
    assert np.abs(ref["logits_single_device"]).max() > 1e-2
    np.testing.assert_allclose(ref["logits_tp"], ref["logits_single_device"], atol=1e-4)
    for _, arrays in multi:
        np.testing.assert_allclose(arrays["logits_tp"], ref["logits_single_device"], atol=1e-4)


def test_two_process_greedy_tokens_match_one_process(runs):
    (ref, _), multi = runs
    for meta, _ in multi:
        assert meta["engine"]["tokens"] == ref["engine"]["tokens"]
        np.testing.assert_allclose(meta["engine"]["logprobs"], ref["engine"]["logprobs"], atol=1e-4)


def test_data_parallel_across_processes_is_refused(runs):
    _, multi = runs
    for meta, _ in multi:
        assert "data_parallel_size=2 with 2 processes is not supported" in meta["dp_error"]


# ----------------------------------------------------------------------------------------------------
# Worker: one process of the job (or the whole job when started alone)
# ----------------------------------------------------------------------------------------------------

def worker(out_dir: Path):
    from sharding.multihost import initialize_from_env_or_flags

    # Join the job first (before anything touches a device); bounded so a missing peer cannot hang us.
    initialize_from_env_or_flags(initialization_timeout=60)

    import jax
    from test_sharding import ENGINE_KW, PAGE_SIZE, PAGES_PER_SEQ, PAD_SEQS, TinyTokenizer, engine_prompts, \
        summarize, tiny_config, two_ragged_steps

    from inference.llm import LLM
    from inference.sampling_params import SamplingParams
    from model.llama import forward, init_cache, init_params
    from sharding.mesh import make_mesh, replica_meshes
    from sharding.rules import cache_sharding, shard_params

    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))  # same key, same weights in every process
    num_pages = PAGES_PER_SEQ * PAD_SEQS
    step = jax.jit(lambda p, c, i: forward(p, c, i, cfg), donate_argnums=(1,))

    arrays = {}
    if jax.process_count() == 1:  # the one-device reference
        arrays["logits_single_device"], _ = two_ragged_steps(params, init_cache(cfg, num_pages, PAGE_SIZE), step)
    # TP over all devices of all processes: every process runs the same program on its own shards.
    mesh = make_mesh(TP, 1)
    cache = init_cache(cfg, num_pages, PAGE_SIZE, sharding=cache_sharding(cfg, mesh))
    logits, _ = two_ragged_steps(shard_params(params, cfg, mesh), cache, lambda p, c, i: _gathered(step(p, c, i)))
    arrays["logits_tp"] = logits

    with LLM(tensor_parallel_size=TP, _loaded=(cfg, params, TinyTokenizer()), **ENGINE_KW) as llm:
        engine = summarize(llm.generate(engine_prompts(), SamplingParams(temperature=0, max_tokens=4, logprobs=1)))

    dp_error = ""
    if jax.process_count() > 1:
        try:
            replica_meshes(make_mesh(TP // 2, 2))
        except ValueError as e:
            dp_error = str(e)

    meta = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "num_devices": len(jax.devices()), "num_local_devices": len(jax.local_devices()),
            "engine": engine, "dp_error": dp_error}
    i = jax.process_index()
    np.savez(out_dir / f"process_{i}.npz", **arrays)
    (out_dir / f"process_{i}.json").write_text(json.dumps(meta))


def _gathered(result):
    # Logits come out split over the vocab, across processes: gather them so every process has all of them.
    from sharding.multihost import gather_to_host

    logits, cache = result
    return gather_to_host(logits), cache


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.path[:0] = [str(REPO), str(Path(__file__).parent)]
        worker(Path(sys.argv[2]))
