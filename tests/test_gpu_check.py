"""scripts/gpu_check.py cannot rot between GPU runs: its --dry-run (CPU, tiny shapes, interpret-mode kernels
against their references) must cover every section, and one failing item must not end the run."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from gpu_check_lib import FAIL_ENV_VAR, Recorder, Skip, compare  # noqa: E402

SECTIONS = ["machine", "correctness", "speed", "e2e", "roofline"]
INJECTED = "KV update float small [interpret]"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{FAIL_ENV_VAR: INJECTED})  # no PYTHONPATH: the script finds the repo
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--dry-run", "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=900, cwd=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return results, out, proc.stdout, time.perf_counter() - start


def _items(results):
    return {(sec["name"], item["name"]): item for sec in results["sections"] for item in sec["items"]}


def _numbers(figures):
    return [v for v in figures.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_dry_run_covers_every_section_with_numbers_or_reasons(dry_run):
    results, out, stdout, _ = dry_run
    assert [s["name"] for s in results["sections"]] == SECTIONS
    assert results["meta"]["complete"] is True and results["meta"]["mode"] == "dry-run"
    for sec in results["sections"]:
        assert sec["items"], f"section {sec['name']} recorded nothing"
        for item in sec["items"]:
            if item["name"] == INJECTED:
                continue
            if item["status"] == "skipped":
                assert item["reason"], item
                continue
            # Every kernel is checked against its reference in interpret mode: all must pass here.
            assert item["status"] == "ok", item
            assert _numbers(item["figures"]) and all(math.isfinite(v) for v in _numbers(item["figures"])), item
    items = _items(results)
    assert items[("machine", "ceilings: copy bandwidth, matmul")]["figures"]["copy_GBps"] > 0
    assert items[("e2e", "decode b1 ctx32")]["figures"]["tok_s"] > 0
    md = (out / "results.md").read_text()
    for title in ("1. Machine", "2. Correctness", "3. Kernel speed", "4. End to end", "5. Roofline", "Roofline table"):
        assert title in md
    assert (out / "roofline.png").stat().st_size > 1000
    assert "ok=" in stdout.splitlines()[-1]  # the summary table ends the output


def test_injected_failure_is_recorded_and_the_run_goes_on(dry_run):
    results, *_ = dry_run
    items = _items(results)
    failed = items[("correctness", INJECTED)]
    assert failed["status"] == "error" and "injected failure" in failed["reason"] and failed["traceback"]
    assert items[("correctness", "KV update int8 small [interpret]")]["status"] == "ok"  # the next item ran
    assert items[("roofline", "roofline report + PNG")]["status"] == "ok"


def test_recorder_outcomes_and_budget(tmp_path):
    rec = Recorder(str(tmp_path), budget_s=60, meta={"device": "cpu"}, fail_items=["boom"], echo=False)
    rec.section("s", "Section", cumulative_share=1.0)
    assert rec.run("good", lambda: {"x": 1.5}) == {"x": 1.5}
    on_disk = json.loads((tmp_path / "results.json").read_text())  # written after every item
    assert on_disk["sections"][0]["items"][0]["figures"] == {"x": 1.5}

    def missing():
        raise NotImplementedError("no mosaic kernel")

    def skip():
        raise Skip("not on this backend")

    def broken():
        raise ZeroDivisionError("bad")

    assert rec.run("missing", missing) is None
    rec.run("skip", skip)
    rec.run("broken", broken)
    rec.run("boom", lambda: {"x": 1})
    rec.run("off tolerance", lambda: {"err": 1.0, "passed": False})
    rec.run("too long", lambda: {"x": 1}, est_s=3600)
    rec.write(final=True)
    got = {it["name"]: it for it in json.loads((tmp_path / "results.json").read_text())["sections"][0]["items"]}
    assert got["missing"]["status"] == "skipped" and "no mosaic kernel" in got["missing"]["reason"]
    assert got["skip"] == {**got["skip"], "status": "skipped", "reason": "not on this backend"}
    assert got["broken"]["status"] == "error" and "ZeroDivisionError: bad" in got["broken"]["reason"]
    assert got["boom"]["status"] == "error" and "injected failure" in got["boom"]["reason"]
    assert got["off tolerance"]["status"] == "fail"
    assert got["too long"]["status"] == "skipped" and got["too long"]["reason"].startswith("budget")
    assert "| broken | error |" in (tmp_path / "results.md").read_text()


def test_compare_catches_wrong_and_non_finite_outputs():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 16)).astype(np.float32)
    assert compare(ref + 1e-6, ref, atol=1e-4, rel_l2=1e-4)["passed"]
    wrong = ref.copy()
    wrong[3, 5] += 0.1
    assert not compare(wrong, ref, atol=1e-4, rel_l2=1e-4)["passed"]
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare(nan, ref, atol=1.0, rel_l2=1.0)["passed"]
    assert compare(wrong, ref, atol=1e-4, rel_l2=1e-4, rows=3)["passed"]  # only the rows that matter


def test_resume_after_the_process_died_mid_item(tmp_path):
    rec = Recorder(str(tmp_path), budget_s=60, meta={}, echo=False)
    rec.section("s", "Section", cumulative_share=1.0)
    rec.run("setup", lambda: {"peak": 1.0})
    rec.run("done", lambda: {"x": 2.0})

    def dies():
        raise KeyboardInterrupt  # not an Exception: escapes the recorder like a crash would end the process

    with pytest.raises(KeyboardInterrupt):
        rec.run("crashes", dies)

    resumed = Recorder(str(tmp_path), budget_s=60, meta={}, echo=False, resume=True)
    resumed.section("s", "Section", cumulative_share=1.0)
    assert resumed.run("setup", lambda: {"peak": 3.0}, redo=True) == {"peak": 3.0}  # re-measured
    assert resumed.run("done", lambda: pytest.fail("recorded items are not run again")) == {"x": 2.0}
    assert resumed.run("crashes", lambda: pytest.fail("the item that killed the process is not retried")) is None
    resumed.run("after", lambda: {"y": 1.0})
    items = json.loads((tmp_path / "results.json").read_text())["sections"][0]["items"]
    assert [(it["name"], it["status"]) for it in items] == [
        ("setup", "ok"), ("done", "ok"), ("crashes", "error"), ("after", "ok")]
    assert "died" in items[2]["reason"] and items[0]["figures"] == {"peak": 3.0}


def test_a_device_fault_ends_the_process_for_a_fresh_one(tmp_path):
    """A CUDA fault poisons the context: the process records it and exits 75 (gpu_check.sh resumes)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gpu_check_lib import Recorder\n"
            "rec = Recorder(sys.argv[2], 60, {}, echo=False); rec.section('s', 'S', 1.0)\n"
            "def fault(): raise RuntimeError('CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access')\n"
            "rec.run('kernel', fault); rec.run('never', lambda: {'x': 1})\n")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "scripts"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert [it["name"] for it in results["sections"][0]["items"]] == ["kernel"]
    assert "device fault" in results["meta"]["stopped"]
