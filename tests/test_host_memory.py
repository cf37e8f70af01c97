"""inference.host_memory: with the raised glibc thresholds XLA:CPU's per-call scratch is reused, so a
repeated program run stops page-faulting its scratch in afresh (observed through the process's own
minor-fault counter, in a fresh interpreter since the setting is process-wide)."""

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The engine's step at 64 rows: [64, 49152] logits through the sampler (scratch > glibc's 32 MB cap).
PROBE = r"""
import json, resource, sys
import jax, numpy as np
from inference.host_memory import keep_scratch_mapped
from inference.sampler import SamplingTensors, sample
from inference.sampling_params import SamplingParams
applied = keep_scratch_mapped()
logits = jax.device_put(np.random.default_rng(0).standard_normal((64, 49152), np.float32))
tensors = SamplingTensors.from_params([SamplingParams(temperature=0.8, seed=i) for i in range(64)], steps=[0] * 64)
for _ in range(3):
    jax.block_until_ready(sample(logits, tensors))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    jax.block_until_ready(sample(logits, tensors))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"applied": applied, "faults_per_call": faults}))
"""


def _probe(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env_overrides)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_scratch_is_reused_without_page_faults():
    default = _probe(RIDGELINE_CPU_MALLOC="0")
    tuned = _probe()
    assert not default["applied"] and tuned["applied"]
    # Measured: ~9,000 faults per call with glibc's defaults (the scratch mapped afresh), ~200 tuned.
    if default["faults_per_call"] < 500:
        pytest.skip(f"this glibc already reuses the scratch ({default['faults_per_call']:.0f} faults per call)")
    assert tuned["faults_per_call"] < 0.1 * default["faults_per_call"], (default, tuned)


def test_user_malloc_settings_win():
    assert not _probe(MALLOC_TRIM_THRESHOLD_="1000000")["applied"]
