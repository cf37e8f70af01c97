"""Plumbing of scripts/gpu_check.py: a Recorder that runs items inside a time budget and rewrites
results.json / results.md after each one, plus the timing and error-measuring helpers the sections share.

Item outcomes: "ok"; "fail" (it ran and a check missed its stated tolerance); "error" (it raised; the
run goes on); "skipped" (with a reason: out of budget, a feature that does not exist yet, dry-run).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
import traceback
from typing import Callable, Optional

import numpy as np

FAIL_ENV_VAR = "RIDGELINE_GPU_CHECK_FAIL"  # comma-separated item names that raise on purpose (tests)
# After a kernel faults, the CUDA context is unusable: every later item would fail the same way. The
# process exits with this status instead, and scripts/gpu_check.sh resumes in a fresh one.
POISONED_EXIT_STATUS = 75
_POISONED = re.compile(r"ILLEGAL_ADDRESS|illegal memory access|illegal instruction|unspecified launch failure|"
                       r"CUDA_ERROR_LAUNCH_FAILED|misaligned address", re.IGNORECASE)


class Skip(Exception):
    """Raised by an item to record 'skipped: <reason>' instead of running to the end."""


class Recorder:
    """Ordered sections of items; every item outcome is written to disk at once, so a kill keeps results.

    Each section owns a share of the budget: items of a section start only while
    `now + est_s <= start + budget_s * cumulative_share`, so a slow section cannot eat the later ones
    (unused time rolls over, the deadlines being cumulative).

    resume=True continues the results.json of a process that died (a segfault in a compiler, say): the
    time it spent counts against the budget, the item it died in is recorded as an error, and items
    already recorded are not run again (except those run with redo=True, which later items depend on)."""

    def __init__(self, out_dir: str, budget_s: float, meta: dict, fail_items=(), echo: bool = True,
                 resume: bool = False):
        self.out_dir, self.budget_s, self.meta = out_dir, budget_s, dict(meta)
        self.fail_items = {name for name in fail_items if name}
        self.echo = echo
        self.t0 = time.perf_counter()
        self.sections: list[dict] = []
        self.appendix: list[str] = []  # extra markdown after the sections (the roofline table)
        self.deadline = self.t0 + budget_s
        self.current_item: Optional[str] = None
        self._lock = threading.RLock()
        self._died_in: Optional[list] = None  # [section, item] the previous process died in (resume)
        self._insert_at: Optional[int] = None  # where a redone item's outcome goes
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "results.json")
        if resume and os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            self.sections = previous["sections"]
            self.t0 -= float(previous["meta"].get("elapsed_s", 0.0))
            self._died_in = previous["meta"].get("running")
            self.meta["resumed"] = previous["meta"].get("resumed", 0) + 1

    # ------------------------------------------------------------------ structure
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def section(self, name: str, title: str, cumulative_share: float) -> "_Section":
        with self._lock:
            if not self.sections or self.sections[-1]["name"] != name:
                known = [s for s in self.sections if s["name"] == name]
                if known:  # resumed: continue the recorded section (sections come in a fixed order)
                    self.sections.remove(known[0])
                self.sections.append(known[0] if known else {"name": name, "title": title, "items": []})
            self.deadline = self.t0 + self.budget_s * cumulative_share
        if self.echo:
            print(f"\n== {title} (t={self.elapsed():.0f}s, section ends by t={self.deadline - self.t0:.0f}s)",
                  flush=True)
        self.write()
        return _Section(self, name)

    def run(self, name: str, fn: Callable[[], dict], *, est_s: float = 0.0, redo: bool = False) -> Optional[dict]:
        """Runs one item: fn() returns its figures (a dict; "passed": False marks a failed check).
        Returns the figures, or None when the item was skipped or raised."""
        section = self.sections[-1]
        if self._died_in == [section["name"], name]:
            self._died_in = None
            self._add(name, "error", reason="the process died during this item (crash, or killed); resumed after it")
            return None
        done = [it for it in section["items"] if it["name"] == name]
        if done and not redo:  # resumed: recorded by the previous process
            return done[0].get("figures") if done[0]["status"] in ("ok", "fail") else None
        if done:  # redo: the new outcome takes the recorded one's place
            self._insert_at = section["items"].index(done[0])
            section["items"].remove(done[0])
        # Items later ones depend on (redo) may use the whole budget, not only their section's share.
        left = (self.t0 + self.budget_s if redo else self.deadline) - time.perf_counter()
        if est_s > left:
            self._add(name, "skipped", reason=f"budget: {max(left, 0):.0f}s left in this section, needs ~{est_s:.0f}s")
            return None
        self.current_item = name
        self.meta["running"] = [section["name"], name]
        self.write()
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            if name in self.fail_items:
                raise RuntimeError(f"injected failure (${FAIL_ENV_VAR} / --fail names {name!r})")
            figures = fn() or {}
        except Skip as e:
            self._add(name, "skipped", reason=str(e), seconds=time.perf_counter() - t0)
            return None
        except NotImplementedError as e:  # a kernel variant or lowering that does not exist yet
            self._add(name, "skipped", reason=f"NotImplementedError: {e}", seconds=time.perf_counter() - t0)
            return None
        except Exception as e:  # noqa: BLE001 - one broken item must not end the run
            self._add(name, "error", reason=f"{type(e).__name__}: {str(e)[:600]}", seconds=time.perf_counter() - t0,
                      traceback=traceback.format_exc()[-3000:])
            if _POISONED.search(str(e)):
                self.write(stopped=f"device fault in {name!r}: exit {POISONED_EXIT_STATUS} (resume in a new process)")
                print(self.summary(), flush=True)
                os._exit(POISONED_EXIT_STATUS)
            return None
        finally:
            self.current_item = None
        status = "fail" if figures.get("passed") is False else "ok"
        self._add(name, status, seconds=time.perf_counter() - t0, figures=figures, cpu_s=time.process_time() - cpu0)
        return figures

    def skip(self, name: str, reason: str) -> None:
        self._add(name, "skipped", reason=reason)

    def _add(self, name: str, status: str, *, reason: str = "", seconds: float = 0.0, figures=None,
             traceback: str = "", cpu_s: Optional[float] = None) -> None:
        entry = {"name": name, "status": status, "seconds": round(seconds, 3)}
        if cpu_s is not None:  # host CPU time of the item (compiles, host loops); wall - cpu is waiting
            entry["cpu_s"] = round(cpu_s, 3)
        if reason:
            entry["reason"] = reason
        if figures:
            entry["figures"] = {k: _jsonable(v) for k, v in figures.items()}
        if traceback:
            entry["traceback"] = traceback
        with self._lock:
            items = self.sections[-1]["items"]
            items.insert(len(items) if self._insert_at is None else self._insert_at, entry)
            self._insert_at = None
            self.meta.pop("running", None)  # this outcome ends the item in flight
        if self.echo:
            extra = f" {reason}" if reason else " " + _headline(entry.get("figures", {}))
            print(f"  [{status:7s}] {name} ({seconds:.1f}s){extra}", flush=True)
        self.write()

    # ------------------------------------------------------------------ output
    def write(self, final: bool = False, stopped: str = "") -> None:
        with self._lock:
            self.meta["elapsed_s"] = round(self.elapsed(), 1)
            self.meta["complete"] = final
            if stopped:
                self.meta["stopped"] = stopped
            payload = {"meta": self.meta, "sections": self.sections}
            _atomic_write(os.path.join(self.out_dir, "results.json"), json.dumps(payload, indent=2))
            _atomic_write(os.path.join(self.out_dir, "results.md"), self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# ridgeline GPU check — {m.get('device', '?')}", "",
                 f"{m.get('date', '')}; jax {m.get('jax', '?')}, backend {m.get('backend', '?')}, "
                 f"mode {m.get('mode', '?')}, budget {self.budget_s:.0f}s, elapsed {m.get('elapsed_s', 0)}s"
                 + ("" if m.get("complete") else " (in progress or interrupted)"), ""]
        if m.get("stopped"):
            lines += [f"Stopped early: {m['stopped']}", ""]
        for sec in self.sections:
            lines += [f"## {sec['title']}", "", "| item | status | figures / reason | s |", "|---|---|---|---:|"]
            for it in sec["items"]:
                text = it.get("reason") or _headline(it.get("figures", {}), limit=12)
                lines.append(f"| {it['name']} | {it['status']} | {text.replace('|', '/')} | {it['seconds']:.1f} |")
            lines.append("")
        return "\n".join(lines + self.appendix)

    def summary(self) -> str:
        """The short table printed at the end: one line per item."""
        rows = []
        for sec in self.sections:
            for it in sec["items"]:
                text = it.get("reason") or _headline(it.get("figures", {}), limit=3)
                rows.append(f"{sec['name'][:11]:11s} {it['status']:7s} {it['name'][:44]:44s} {text[:90]}")
        counts = {s: sum(it["status"] == s for sec in self.sections for it in sec["items"])
                  for s in ("ok", "fail", "error", "skipped")}
        rows.append(" ".join(f"{k}={v}" for k, v in counts.items()) + f"  elapsed {self.elapsed():.0f}s")
        return "\n".join(rows)

    def start_watchdog(self, grace_s: float) -> None:
        """Past budget + grace (a hung compile, say), write what we have and exit the process."""

        def fire():
            self.write(stopped=f"watchdog: still in item {self.current_item!r} at budget + {grace_s:.0f}s")
            print(self.summary(), flush=True)
            os._exit(3)

        timer = threading.Timer(max(1.0, self.budget_s + grace_s - self.elapsed()), fire)
        timer.daemon = True
        timer.start()


class _Section:
    """Context manager of one section: an exception outside any item is recorded, and the run goes on."""

    def __init__(self, rec: Recorder, name: str):
        self.rec, self.name = rec, name

    def __enter__(self):
        return self.rec

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and isinstance(exc, Exception):
            self.rec._add(f"{self.name} (section)", "error", reason=f"{exc_type.__name__}: {str(exc)[:600]}",
                          traceback=traceback.format_exc()[-3000:])
            return True
        return False


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonable(v):
    if isinstance(v, (np.floating, float)):
        return float(v) if np.isfinite(v) else str(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _headline(figures: dict, limit: int = 4) -> str:
    """The first `limit` scalar figures as 'key=value' (lists and dicts live in results.json only)."""
    scalars = [(k, v) for k, v in figures.items() if not isinstance(v, (list, dict))]
    return ", ".join(f"{k}={_fmt(v)}" for k, v in scalars[:limit])


# ---------------------------------------------------------------------------------------------- measuring
def time_per_call(fn: Callable, arg_sets: list, *, warmup: int = 2, runs: int = 7) -> float:
    """Median seconds of one fn(*args) call, timed as one jitted program over every set in `arg_sets`.

    Several independent input sets per program amortise dispatch and keep small working sets from being
    served by the L2 cache; the program is compiled and run `warmup` times before `runs` timed runs,
    each ending in block_until_ready."""
    import jax

    program = jax.jit(lambda sets: [fn(*args) for args in sets])
    for _ in range(warmup):
        jax.block_until_ready(program(arg_sets))
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(program(arg_sets))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) / len(arg_sets)


def input_sets(make: Callable[[int], tuple], set_bytes: int, *, target_bytes: int = 256 << 20,
               max_sets: int = 8) -> list:
    """Independent input sets (make(seed) each) until they pass target_bytes together (L2 is 50-60 MB)."""
    count = int(min(max_sets, max(1, -(-target_bytes // max(set_bytes, 1)))))
    return [make(seed) for seed in range(count)]


def compare(out, ref, *, atol: float, rel_l2: float, rows: Optional[int] = None) -> dict:
    """Max abs error (relative to max(1, max|ref|)) and ||out - ref|| / ||ref|| against stated tolerances;
    non-finite output never passes. rows: compare only the first `rows` rows (padding is unspecified)."""
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if out32.shape != ref32.shape:
        raise ValueError(f"output shape {out32.shape} != reference shape {ref32.shape}")
    if rows is not None:
        out32, ref32 = out32[:rows], ref32[:rows]
    finite = bool(np.isfinite(out32).all())
    scale = max(1.0, float(np.max(np.abs(ref32)))) if ref32.size else 1.0
    max_abs = float(np.max(np.abs(out32 - ref32))) if ref32.size else 0.0
    rel = float(np.linalg.norm(out32 - ref32) / max(float(np.linalg.norm(ref32)), 1e-30))
    return {"max_abs_err": max_abs, "rel_l2_err": rel, "atol": atol * scale, "rel_l2_tol": rel_l2,
            "finite": finite, "passed": finite and max_abs <= atol * scale and rel <= rel_l2}
