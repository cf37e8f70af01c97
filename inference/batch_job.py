"""Offline batch generation: JSONL in, JSONL out, resumable. Two input formats, detected from the file:

* ridgeline records: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}, optionally with per-record
  sampling overrides under "sampling" (any SamplingParams field). Output lines: {"id", "text", "token_ids",
  "finish_reason", "num_prompt_tokens", "error"}.
* OpenAI Batch: {"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
  "body": {...}} (any n, no streaming). Output lines: {"id", "custom_id", "response": {"status_code",
  "request_id", "body"}, "error"}; a bad body gets its OpenAI error as the response (status 400), a line that
  is not a request at all (bad JSON, no custom_id, wrong method or url) gets response null and `error`.

Every line is written, flushed and fsynced as its request finishes. On restart, the ids (custom_ids) already
in the output are skipped; a torn last line left by a kill is cut off first, so nothing is lost or duplicated.
Input lines are decoded one at a time: a non-UTF-8 or malformed line gets an error result with its line number.
Lines already in the output that are not results (non-UTF-8, not an object, no id) are warned about and skipped.

Safety around the output file (the output format itself is unchanged, so readers of it need not know):
* OUTPUT.lock: an exclusive flock held for the whole job; a second job on the same output gets OutputLockedError.
* OUTPUT.meta.json: written atomically before the first result; the input file's sha256, the job-level settings
  (format, chat, default SamplingParams / served model name) and, per request, its key, line and a sha256 of the
  canonical JSON of its record plus those settings. A resume refuses with ResumeMismatchError, naming the id and
  line, when the settings changed or any finished result's request is missing or different in the input; new
  records appended to the input are fine. `overwrite=True` (`--overwrite`) empties the output and starts over.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from inference import openai_protocol as protocol
from inference.openai_protocol import OpenAIError
from inference.outputs import CompletionOutput, RequestOutput
from inference.sampling_params import SamplingParams

RECORDS, OPENAI = "records", "openai"


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


class _LineError(Exception):
    """A record that cannot run; `line` is what gets written for it."""

    def __init__(self, message: str, line: dict):
        super().__init__(message)
        self.line = line


@dataclass
class _Job:
    """One input record's engine requests; `finish(outputs by choice)` -> (output line, error or None)."""

    requests: list  # (engine request id, choice index, prompt ids, params, prompt text)
    finish: Callable
    outputs: list = None

    def __post_init__(self):
        self.outputs = [None] * len(self.requests)


class BatchJobError(Exception):
    """A batch job that cannot start or resume; the message names the file, line or setting, and the fix."""


class OutputPathError(BatchJobError):
    """The output path cannot be written (a directory, a missing parent, no write permission)."""


class OutputLockedError(BatchJobError):
    """Another job holds the output's lock."""


class ResumeMismatchError(BatchJobError):
    """The output holds results made from other requests or settings than this run's."""


class BatchOutputWarning(UserWarning):
    """A line already in the output that is not a result (skipped; its request runs again)."""


def meta_path(output_path) -> Path:
    """The fingerprint sidecar: OUTPUT.meta.json."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".meta.json")


def lock_path(output_path) -> Path:
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".lock")


def check_output_path(output_path) -> Path:
    """Raises OutputPathError unless results can be appended to `output_path` (cheap: run before loading a model)."""
    output = Path(output_path)
    if output.is_dir():
        raise OutputPathError(f"output {str(output)!r} is a directory; give a file path such as "
                              f"{str(output / 'results.jsonl')!r}")
    parent = output.parent
    if not parent.is_dir():
        raise OutputPathError(f"output directory {str(parent)!r} does not exist (for output {str(output)!r}); "
                              "create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"output directory {str(parent)!r} is not writable (for output {str(output)!r})")
    if output.exists() and not os.access(output, os.W_OK):
        raise OutputPathError(f"output {str(output)!r} is not writable")
    return output


class OutputLock:
    """An exclusive flock on OUTPUT.lock, held for the whole job: two jobs can never append to one output.

    The lock file is left in place on release (unlinking a lock file races with a job about to take it).
    """

    def __init__(self, output_path):
        output = check_output_path(output_path)
        self.path = lock_path(output)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputPathError(f"cannot create the lock file {str(self.path)!r}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(f"output {str(output)!r} is in use by another batch job (it holds "
                                    f"{str(self.path)!r}); wait for it to finish or give another output") from None
        self._fd = fd

    def release(self):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=repr)


@dataclass
class _Entry:
    """One non-blank input line: its output key, parsed record (or the error it gets), and fingerprint."""

    line_no: int
    key: object
    record: object
    error: Optional[str]
    fingerprint: str  # sha256 of the canonical record (or of the raw bytes) plus the job's settings


def _read_input(input_path: Path, fmt, settings: dict) -> tuple[list, str]:
    """Every non-blank line, decoded alone (a non-UTF-8 or malformed line fails alone); and the file's sha256."""
    file_hash = hashlib.sha256()
    entries, seen_keys = [], set()
    settings_json = _canonical(settings)
    with open(input_path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            file_hash.update(raw)
            if not raw.strip():
                continue
            record, error = None, None
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    error = f"line {line_no}: expected a JSON object, got {type(record).__name__}"
            except UnicodeDecodeError as e:
                error = f"line {line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            except json.JSONDecodeError as e:
                error = f"line {line_no}: malformed JSON ({e.msg} at column {e.colno})"
            key = fmt.job_key(line_no, record)
            if key in seen_keys:
                error = f"line {line_no}: duplicate {fmt.key}={key!r}"
                key = f"{key}#line-{line_no}"
            seen_keys.add(key)
            content = _canonical(record) if record is not None else raw.hex()
            fingerprint = hashlib.sha256(f"{content}\n{settings_json}".encode()).hexdigest()
            entries.append(_Entry(line_no, key, record, error, fingerprint))
    return entries, file_hash.hexdigest()


def _write_meta(output_path: Path, meta: dict):
    """Atomically (write, fsync, rename): a kill leaves the old sidecar or the new one, never half of one."""
    path = meta_path(output_path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_resume(output_path: Path, input_path: Path, settings: dict, entries: list, done: set, key_name: str):
    """Raises ResumeMismatchError unless every result in the output was made from this run's request."""
    start_over = "pass --overwrite (overwrite=True) to start over, or give another output"
    path = meta_path(output_path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        recorded = {r["key"]: (r["line"], r["sha256"]) for r in meta["requests"]}
        old_settings = meta["settings"]
    except FileNotFoundError:
        raise ResumeMismatchError(f"{str(output_path)!r} holds {len(done)} results but no fingerprint file "
                                  f"{str(path)!r}, so they cannot be matched to {str(input_path)!r}; "
                                  f"{start_over}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeMismatchError(f"fingerprint file {str(path)!r} is unreadable ({e}); {start_over}") from None
    if old_settings != settings:
        changed = sorted(_diff(old_settings, settings))
        raise ResumeMismatchError(f"{str(output_path)!r} was written with other settings ({'; '.join(changed)}); "
                                  f"re-run with the earlier flags, or {start_over}")
    current = {e.key: e for e in entries}
    for key in sorted(done, key=lambda k: recorded.get(k, (0,))[0]):
        old = recorded.get(key)
        entry = current.get(key)
        if old is None:
            raise ResumeMismatchError(f"{str(output_path)!r} holds a result for {key_name}={key!r} that its "
                                      f"fingerprint file does not list; {start_over}")
        if entry is None:
            raise ResumeMismatchError(f"{str(output_path)!r} holds a result for {key_name}={key!r} (line {old[0]} "
                                      f"of the earlier input), which {str(input_path)!r} does not contain; "
                                      f"{start_over}")
        if entry.fingerprint != old[1]:
            raise ResumeMismatchError(f"line {entry.line_no} of {str(input_path)!r} ({key_name}={key!r}) differs "
                                      f"from the request (line {old[0]} of the earlier input) whose result is in "
                                      f"{str(output_path)!r}; {start_over}")


def _diff(old, new, prefix="") -> list:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def detect_format(input_path: Path) -> str:
    """OPENAI if the first JSON object line looks like an OpenAI Batch request, else RECORDS."""
    with open(input_path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                return OPENAI if "custom_id" in record or ("url" in record and "body" in record) else RECORDS
    return RECORDS


def _repair_and_read_done(output: Path, key: str) -> set:
    """Keys already written; truncates a torn (unterminated) last line left by a kill, warns about (and skips)
    lines that are not results, whose requests then run again."""
    done = set()
    if not output.exists():
        return done
    with open(output, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
            data = data[:end]
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        problem = None
        try:
            line = json.loads(raw.decode("utf-8"))
            if not isinstance(line, dict):
                problem = f"a JSON {type(line).__name__}, not a result object"
            elif not isinstance(line.get(key), (str, int)) or isinstance(line.get(key), bool):
                problem = f"no string or integer {key!r} ({key}={line.get(key)!r})"
            else:
                done.add(line[key])
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        except json.JSONDecodeError as e:
            problem = f"malformed JSON ({e.msg} at column {e.colno})"
        if problem:
            warnings.warn(f"{str(output)!r} line {line_no}: {problem}; skipped (its request runs again)",
                          BatchOutputWarning, stacklevel=3)
    return done


class _RecordsFormat:
    key = "id"

    def __init__(self, llm, default_params: SamplingParams, chat: bool):
        self.llm, self.default_params, self.chat = llm, default_params, chat

    def error_line(self, key, message: str) -> dict:
        return {"id": key, "text": None, "token_ids": None, "finish_reason": "error", "error": message}

    def job_key(self, line_no: int, record) -> object:
        rid = record.get("id", f"line-{line_no}") if isinstance(record, dict) else f"line-{line_no}"
        return rid if isinstance(rid, (str, int)) else f"line-{line_no}"

    def build(self, line_no: int, record: dict, key) -> _Job:
        rid = record.get("id", key)
        if not isinstance(rid, (str, int)):
            raise _LineError(m := f"line {line_no}: id={rid!r} must be a string or integer", self.error_line(key, m))
        if "prompt" not in record and "messages" not in record:
            m = f"line {line_no}: record id={key!r} has neither 'prompt' nor 'messages'"
            raise _LineError(m, self.error_line(key, m))
        tokenizer = self.llm.tokenizer
        try:
            params = self.default_params
            if record.get("sampling"):
                params = dataclasses.replace(self.default_params, **record["sampling"])
            if "messages" in record:
                ids, text = tokenizer.encode_chat(record["messages"]), None
            else:
                text = record["prompt"]
                if not isinstance(text, str):
                    raise ValueError(f"prompt={text!r} must be a string")
                ids = (tokenizer.encode_chat([{"role": "user", "content": text}]) if self.chat
                       else tokenizer.encode(text))
        except (ValueError, TypeError) as e:
            raise _LineError(m := f"line {line_no}: {e}", self.error_line(key, m)) from None

        n = params.n

        def finish(outputs):
            # n > 1: every sample under "outputs" (sample j of a seeded request has seed + j, as in LLM.generate);
            # the top-level fields are sample 0's. One failed sample fails the line.
            out = outputs[0]
            error = next((o.error for o in outputs if o.error), None)
            line = {"id": key, "text": out.text if not error else None,
                    "token_ids": out.token_ids if not error else None,
                    "finish_reason": "error" if error else out.finish_reason,
                    "num_prompt_tokens": len(out.prompt_token_ids), "error": error}
            if n > 1:
                line["outputs"] = None if error else [
                    {"index": j, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                    for j, o in enumerate(outputs)]
            return line, error

        if n == 1:
            return _Job([(str(key), 0, ids, params, text)], finish)
        # Engine ids of the samples are per input line, so no record's id can collide with them.
        return _Job([(f"line{line_no}-sample{j}", j, ids, params.for_child(j), text) for j in range(n)], finish)


class _OpenAIFormat:
    key = "custom_id"

    def __init__(self, llm, model_name: str):
        self.llm, self.model_name = llm, model_name

    def _line(self, key, response: Optional[dict], error: Optional[dict]) -> dict:
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": key, "response": response, "error": error}

    def error_line(self, key, message: str, code: str = "invalid_request") -> dict:
        return self._line(key, None, {"code": code, "message": message})

    def _error_response(self, key, request_id: str, e: OpenAIError) -> dict:
        return self._line(key, {"status_code": e.status_code, "request_id": request_id, "body": e.body()}, None)

    def job_key(self, line_no: int, record) -> object:
        cid = record.get("custom_id") if isinstance(record, dict) else None
        return cid if isinstance(cid, (str, int)) and not isinstance(cid, bool) else f"line-{line_no}"

    def build(self, line_no: int, record: dict, key) -> _Job:
        cid = record.get("custom_id")
        if cid is None or cid != key:
            raise _LineError(m := f"line {line_no}: custom_id={cid!r} must be a string", self.error_line(key, m))
        method, url = record.get("method"), record.get("url")
        if method != "POST":
            raise _LineError(m := f"line {line_no}: method={method!r} must be 'POST'", self.error_line(key, m))
        if url not in protocol.ROUTES:
            m = f"line {line_no}: url={url!r} must be one of {sorted(protocol.ROUTES)}"
            raise _LineError(m, self.error_line(key, m))
        request_id = uuid.uuid4().hex
        try:
            body = record.get("body")
            if body is not None and isinstance(body, dict) and body.get("stream"):
                raise OpenAIError("stream=true is not supported in batch files", param="stream")
            req = protocol.parse_request(protocol.ROUTES[url], body, self.llm.tokenizer, model_name=self.model_name,
                                         max_model_len=self.llm.engine.engine_cfg.max_model_len, strict_model=False)
        except OpenAIError as e:
            raise _LineError(f"line {line_no}: {e.message}", self._error_response(key, request_id, e)) from None
        req.request_id = request_id

        def finish(outputs):
            failed = next((o for o in outputs if o.error), None)
            if failed is not None:
                e = OpenAIError(failed.error, param="messages" if req.kind == protocol.CHAT else "prompt")
                return self._error_response(key, request_id, e), failed.error
            prompt_logprobs = None
            if req.wants_prompt_logprobs:
                prompt_logprobs = [self.llm._prompt_logprobs(ids, req.logprobs) for _, ids in req.prompts]
            body = protocol.completion_body(req, outputs, self.llm.tokenizer, prompt_logprobs)
            return self._line(key, {"status_code": 200, "request_id": request_id, "body": body}, None), None

        return _Job(req.engine_requests(f"line{line_no}"), finish)


def run_batch_job(llm, input_path, output_path, *, default_params: SamplingParams, chat: bool = False,
                  show_progress: bool = True, max_records: Optional[int] = None,
                  model_name: Optional[str] = None, overwrite: bool = False,
                  output_lock: Optional[OutputLock] = None) -> JobSummary:
    """Runs every not-yet-done record of `input_path` through `llm`'s engine, appending to `output_path`.

    default_params and chat apply to ridgeline records; OpenAI requests carry their own parameters (OpenAI
    defaults) and report `model_name` (default: the model's config name). Resuming refuses (ResumeMismatchError)
    when a finished result was made from a different request or settings; `overwrite=True` starts over.
    `output_lock`: an OutputLock already held on `output_path` (the CLI takes it before loading the model);
    without one the job takes its own, raising OutputLockedError if another job holds it.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file not found: {str(input_path)!r}")
    own_lock = output_lock is None
    lock = OutputLock(output_path) if own_lock else output_lock
    try:
        return _run_locked(llm, input_path, output_path, default_params=default_params, chat=chat,
                           show_progress=show_progress, max_records=max_records, model_name=model_name,
                           overwrite=overwrite)
    finally:
        if own_lock:
            lock.release()


def _run_locked(llm, input_path: Path, output_path: Path, *, default_params, chat, show_progress, max_records,
                model_name, overwrite) -> JobSummary:
    if detect_format(input_path) == OPENAI:
        fmt = _OpenAIFormat(llm, model_name or llm.config.name)
        settings = {"format": OPENAI, "model_name": fmt.model_name}
    else:
        fmt = _RecordsFormat(llm, default_params, chat)
        settings = {"format": RECORDS, "chat": chat, "defaults": dataclasses.asdict(default_params)}
    settings = json.loads(_canonical(settings))  # what the sidecar holds, so comparisons see the same types
    entries, input_sha256 = _read_input(input_path, fmt, settings)
    summary = JobSummary()
    if overwrite:
        output_path.write_bytes(b"")
        done = set()
    else:
        done = _repair_and_read_done(output_path, fmt.key)
        if done:
            _check_resume(output_path, input_path, settings, entries, done, fmt.key)
    _write_meta(output_path, {"version": 1, "input": {"path": str(input_path.absolute()), "sha256": input_sha256},
                              "settings": settings,
                              "requests": [{"key": e.key, "line": e.line_no, "sha256": e.fingerprint}
                                           for e in entries]})
    start = time.perf_counter()
    out = open(output_path, "a", encoding="utf-8")

    def write(line: dict, error: Optional[str]):
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())  # a kill right after never loses a finished record
        done.add(line[fmt.key])
        if error:
            summary.failed += 1
            summary.errors.append(error)
        else:
            summary.completed += 1

    engine = llm.engine
    pending: dict[str, tuple[_Job, int]] = {}  # engine request id -> (job, choice index)
    num_jobs = 0
    for entry in entries:
        line_no, key, record, error = entry.line_no, entry.key, entry.record, entry.error
        summary.total_records += 1
        if key in done:
            summary.skipped_done += 1
            continue
        if max_records is not None and num_jobs >= max_records:
            break
        try:
            if error is not None:
                raise _LineError(error, fmt.error_line(key, error))
            job = fmt.build(line_no, record, key)
            added = []
            try:
                for rid, index, ids, params, text in job.requests:
                    engine.add_request(rid, ids, params, prompt=text, stream=False)
                    added.append(rid)
            except (ValueError, TypeError) as e:
                for rid in added:
                    engine.abort(rid)
                failed = _error_output(rid, ids, f"line {line_no}: {e}")
                write(*job.finish([failed] * len(job.requests)))
                continue
            for rid, index, *_ in job.requests:
                pending[rid] = (job, index)
            num_jobs += 1
        except _LineError as e:
            write(e.line, str(e))

    progress = None
    if show_progress and pending:
        from tqdm import tqdm

        progress = tqdm(total=num_jobs, unit="req", file=sys.stderr, dynamic_ncols=True)
    try:
        while engine.has_unfinished_requests():
            for result in engine.step():
                if not result.finished or result.request_id not in pending:
                    continue
                job, index = pending.pop(result.request_id)
                job.outputs[index] = result
                if result.error:  # the rest of this record's samples are moot
                    for rid, *_ in job.requests:
                        if pending.pop(rid, None) is not None:
                            engine.abort(rid)
                    job.outputs = [o if o is not None else result for o in job.outputs]
                if any(o is None for o in job.outputs):
                    continue
                write(*job.finish(job.outputs))
                if not result.error:
                    summary.generated_tokens += sum(len(o.token_ids) for o in job.outputs)
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


def _error_output(request_id: str, ids: list, error: str) -> RequestOutput:
    return RequestOutput(request_id, None, list(ids), [CompletionOutput(0, "", [], "error")], True, error=error)
