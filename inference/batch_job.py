"""Offline batch generation: JSONL in, JSONL out, resumable.

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [{"role": ..., "content": ...}, ...]},
optionally with per-record sampling overrides under "sampling" (any SamplingParams field).
Output lines: {"id", "text", "token_ids", "finish_reason", "num_prompt_tokens", "error"} written and flushed
as each request finishes. On restart, ids already in the output are skipped; a torn last line left by a
kill is cut off first, so nothing is lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from inference.sampling_params import SamplingParams


@dataclass
class JobSummary:
    total_records: int = 0
    skipped_done: int = 0
    completed: int = 0
    failed: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    errors: list = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        return (f"records: {self.total_records}  done before: {self.skipped_done}  completed: {self.completed}  "
                f"failed: {self.failed}  generated tokens: {self.generated_tokens}  "
                f"time: {self.seconds:.1f}s  throughput: {self.tokens_per_second:.1f} tok/s")


def _repair_and_read_done(output: Path) -> set:
    """Ids already written; truncates a torn (unterminated) last line left by a kill."""
    done = set()
    if not output.exists():
        return done
    with open(output, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
            data = data[:end]
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            continue
    return done


def _parse_record(line_no: int, line: str):
    """(id, record, error): error is a message naming the problem; id falls back to the line number."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"line-{line_no}", None, f"line {line_no}: malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return f"line-{line_no}", None, f"line {line_no}: expected a JSON object, got {type(record).__name__}"
    rid = record.get("id", f"line-{line_no}")
    if not isinstance(rid, (str, int)):
        return f"line-{line_no}", None, f"line {line_no}: id={rid!r} must be a string or integer"
    if "prompt" not in record and "messages" not in record:
        return rid, None, f"line {line_no}: record id={rid!r} has neither 'prompt' nor 'messages'"
    return rid, record, None


def run_batch_job(llm, input_path, output_path, *, default_params: SamplingParams, chat: bool = False,
                  show_progress: bool = True, max_records: Optional[int] = None) -> JobSummary:
    """Runs every not-yet-done record of `input_path` through `llm`'s engine, appending to `output_path`."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file not found: {str(input_path)!r}")
    summary = JobSummary()
    done = _repair_and_read_done(output_path)
    start = time.perf_counter()
    out = open(output_path, "a", encoding="utf-8")

    def write(result: dict):
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())  # a kill right after never loses a finished record
        done.add(result["id"])

    engine = llm.engine
    pending = {}
    seen_ids = set()
    with open(input_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            summary.total_records += 1
            rid, record, error = _parse_record(line_no, line)
            if rid in done:
                summary.skipped_done += 1
                continue
            if rid in seen_ids:
                error = f"line {line_no}: duplicate id={rid!r}"
                rid = f"{rid}#line-{line_no}"
                if rid in done:
                    summary.skipped_done += 1
                    continue
            seen_ids.add(rid)
            if max_records is not None and len(pending) >= max_records:
                break
            if error is None:
                try:
                    params = default_params
                    if record.get("sampling"):
                        params = dataclasses.replace(default_params, **record["sampling"])
                    if "messages" in record:
                        ids = llm.tokenizer.encode_chat(record["messages"])
                        text = None
                    else:
                        text = record["prompt"]
                        if not isinstance(text, str):
                            raise ValueError(f"prompt={text!r} must be a string")
                        ids = (llm.tokenizer.encode_chat([{"role": "user", "content": text}]) if chat
                               else llm.tokenizer.encode(text))
                    engine.add_request(str(rid), ids, params, prompt=text, stream=False)
                    pending[str(rid)] = rid
                    continue
                except (ValueError, TypeError) as e:
                    error = f"line {line_no}: {e}"
            write({"id": rid, "text": None, "token_ids": None, "finish_reason": "error", "error": error})
            summary.failed += 1
            summary.errors.append(error)

    progress = None
    if show_progress and pending:
        from tqdm import tqdm

        progress = tqdm(total=len(pending), unit="req", file=sys.stderr, dynamic_ncols=True)
    try:
        while engine.has_unfinished_requests():
            for result in engine.step():
                if not result.finished or result.request_id not in pending:
                    continue
                rid = pending.pop(result.request_id)
                write({"id": rid, "text": result.text if not result.error else None,
                       "token_ids": result.token_ids if not result.error else None,
                       "finish_reason": result.finish_reason, "num_prompt_tokens": len(result.prompt_token_ids),
                       "error": result.error})
                if result.error:
                    summary.failed += 1
                    summary.errors.append(result.error)
                else:
                    summary.completed += 1
                    summary.generated_tokens += len(result.token_ids)
                if progress is not None:
                    elapsed = time.perf_counter() - start
                    progress.set_postfix_str(f"{summary.generated_tokens / max(elapsed, 1e-9):.1f} tok/s")
                    progress.update(1)
    finally:
        if progress is not None:
            progress.close()
        out.close()
        summary.seconds = time.perf_counter() - start
    return summary
