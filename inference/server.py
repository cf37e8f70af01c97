"""OpenAI-compatible HTTP server: `ridgeline serve` (FastAPI + uvicorn, the `[serve]` extra).

One engine loop (a dedicated thread, `EngineLoop`) owns the engine and steps it while there are requests,
so concurrent HTTP requests join the same continuous batch. Handlers run on the asyncio event loop: they
validate and tokenize (`inference.openai_protocol`), enqueue their engine requests, and receive outputs
through an asyncio queue fed by `loop.call_soon_threadsafe`. A client that disconnects has its requests
aborted, which frees their KV pages. Past `max_pending_sequences` queued or running sequences the server
answers 429 at once rather than queueing without bound.

    ridgeline serve --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 8}'
"""


import asyncio
import contextlib
import itertools
import json
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Optional

from inference import openai_protocol as protocol
from inference.openai_protocol import OpenAIError, PreparedRequest

logger = logging.getLogger("ridgeline.server")

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_DISCONNECT_POLL_SECONDS = 0.25


class ServerMetrics:
    """Prometheus metrics in their own registry; engine gauges are read from the loop's latest snapshot."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.generation_tokens = Counter("ridgeline_generation_tokens", "Generated tokens (rate() = tokens/s)",
                                         registry=self.registry)
        self.prompt_tokens = Counter("ridgeline_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=self.registry)
        self.finished = Counter("ridgeline_request_finished", "Finished sequences by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.rejected = Counter("ridgeline_request_rejected", "Requests answered with an error, by status code",
                                ["status_code"], registry=self.registry)
        self.ttft = Histogram("ridgeline_time_to_first_token_seconds", "Time to first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("ridgeline_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=self.registry)

    def attach(self, loop: "EngineLoop") -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        class EngineCollector:
            def collect(self):
                s = loop.snapshot
                yield GaugeMetricFamily("ridgeline_num_requests_running", "Sequences in the running batch",
                                        value=s.get("num_running", 0))
                yield GaugeMetricFamily("ridgeline_num_requests_waiting",
                                        "Sequences waiting for the batch (scheduler queue plus not yet handed over)",
                                        value=s.get("num_waiting", 0) + loop.num_queued_commands)
                yield CounterMetricFamily("ridgeline_num_preemptions", "Sequences preempted (recomputed later)",
                                          value=s.get("num_preemptions", 0))
                yield GaugeMetricFamily("ridgeline_prefix_cache_hit_rate",
                                        "Prompt tokens served by the prefix cache / prompt tokens looked up",
                                        value=s.get("prefix_hit_rate", 0.0))
                yield GaugeMetricFamily("ridgeline_kv_pages_free", "KV pages free or evictable",
                                        value=s.get("pages_free", 0))
                yield GaugeMetricFamily("ridgeline_kv_pages_total", "KV pages in the pool",
                                        value=loop.num_pages)

        self.registry.register(EngineCollector())


class EngineLoop:
    """The one thread that touches the engine. Other threads call `submit`, `abort` and `call`, which only
    enqueue commands; `deliver(event)` callbacks run on this thread and must not block.

    Events delivered for a submitted group: ("accepted", None) once every request of it is queued (or
    ("rejected", message) and none is), then ("output", (choice_index, RequestOutput)) per update, and
    ("failed", message) if the engine raised while stepping it.
    """

    def __init__(self, llm, metrics: Optional[ServerMetrics] = None):
        self.llm = llm
        self.engine = llm.engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._subscribers: dict[str, tuple[int, Callable]] = {}  # engine request id -> (choice index, deliver)
        self._token_counts: dict[str, int] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ridgeline-engine-loop", daemon=True)
        engines = getattr(self.engine, "engines", [self.engine])  # a DataParallelEngine holds several
        self.num_pages = sum(e.allocator.num_pages for e in engines)
        self.snapshot: dict = self.engine.scheduler_stats()

    # -- called from other threads ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._commands.put(("wake", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def num_queued_commands(self) -> int:
        return self._commands.qsize()

    def submit(self, requests: list, deliver: Callable) -> None:
        """requests: (engine request id, choice index, prompt ids, params, prompt text) tuples."""
        self._commands.put(("submit", (requests, deliver)))

    def abort(self, request_ids) -> None:
        self._commands.put(("abort", list(request_ids)))

    def call(self, fn: Callable) -> Future:
        """Runs fn() on the engine thread between steps (e.g. prompt scoring); its result as a Future."""
        future: Future = Future()
        self._commands.put(("call", (fn, future)))
        return future

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._handle_commands(block=not self.engine.has_unfinished_requests())
            if self._stopping or not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step fails its requests, not the server
                logger.exception("engine step failed")
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                continue
            for out in outputs:
                self._publish(out)
            self.snapshot = self.engine.scheduler_stats()
        self._fail_all("the server is shutting down")

    def _handle_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = command
            if kind == "submit":
                self._add(*arg)
            elif kind == "abort":
                for rid in arg:
                    self._subscribers.pop(rid, None)
                    self._token_counts.pop(rid, None)
                    self.engine.abort(rid)
            elif kind == "call":
                fn, future = arg
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:
                        future.set_exception(e)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self.snapshot = self.engine.scheduler_stats()

    def _add(self, requests: list, deliver: Callable) -> None:
        added = []
        try:
            for rid, index, ids, params, text in requests:
                self.engine.add_request(rid, ids, params, prompt=text)
                added.append(rid)
                self._subscribers[rid] = (index, deliver)
                self._token_counts[rid] = 0
        except (ValueError, TypeError) as e:
            for rid in added:
                self._subscribers.pop(rid, None)
                self._token_counts.pop(rid, None)
                self.engine.abort(rid)
            deliver(("rejected", str(e)))
            return
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(r[2]) for r in requests))
        deliver(("accepted", None))

    def _publish(self, out) -> None:
        rid = out.request_id
        if rid not in self._subscribers:
            return
        index, deliver = self._subscribers[rid]
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(out.token_ids) - self._token_counts[rid])
        self._token_counts[rid] = len(out.token_ids)
        if out.finished:
            del self._subscribers[rid], self._token_counts[rid]
            if self.metrics is not None and out.error is None:
                self.metrics.finished.labels(out.finish_reason or "unknown").inc()
                m = out.metrics
                if m is not None and m.ttft is not None:
                    self.metrics.ttft.observe(m.ttft)
                if m is not None and m.tpot is not None:
                    self.metrics.tpot.observe(m.tpot)
        deliver(("output", (index, out)))

    def _fail_all(self, message: str) -> None:
        for rid, (_, deliver) in list(self._subscribers.items()):
            self.engine.abort(rid)
            deliver(("failed", message))
        self._subscribers.clear()
        self._token_counts.clear()
        self.snapshot = self.engine.scheduler_stats()


class _Call:
    """One HTTP request's engine requests: admission against the queue limit, events, and abort-on-exit."""

    def __init__(self, state: "_ServerState", req: PreparedRequest):
        self.state, self.req = state, req
        self.events: asyncio.Queue = asyncio.Queue()
        self.requests = req.engine_requests(f"{req.request_id}-{next(state.ids)}")
        self.unfinished = {rid for rid, *_ in self.requests}
        self._admitted = False

    async def start(self) -> None:
        state, size = self.state, len(self.requests)
        if not state.loop.alive:
            raise OpenAIError("the engine loop is not running", status_code=503, type="server_error")
        if state.pending + size > state.max_pending_sequences:
            raise OpenAIError(f"the server is at capacity: {state.pending} sequences queued or running and "
                              f"this request adds {size}; the limit is max_pending_sequences="
                              f"{state.max_pending_sequences}. Retry later.", status_code=429,
                              type="rate_limit_error", code="rate_limit_exceeded")
        state.pending += size
        self._admitted = True
        loop = asyncio.get_running_loop()
        state.loop.submit(self.requests, lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event))
        kind, message = await self.events.get()
        if kind == "rejected":
            self.unfinished.clear()
            param = "messages" if self.req.kind == protocol.CHAT else "prompt"
            raise OpenAIError(message, param=param)
        if kind == "failed":
            self.unfinished.clear()
            raise OpenAIError(message, status_code=500, type="server_error")

    async def next_output(self, timeout: Optional[float] = None):
        """(choice index, RequestOutput); raises asyncio.TimeoutError after `timeout` seconds."""
        kind, payload = await asyncio.wait_for(self.events.get(), timeout)
        if kind == "failed":
            self.unfinished.clear()
            raise OpenAIError(payload, status_code=500, type="server_error")
        index, out = payload
        if out.finished:
            self.unfinished.discard(out.request_id)
            if out.error:
                raise OpenAIError(out.error, param="messages" if self.req.kind == protocol.CHAT else "prompt")
        return index, out

    def close(self) -> None:
        """Aborts whatever is still running (client gone, error) and gives the queue slots back."""
        if self.unfinished:
            self.state.loop.abort(self.unfinished)
            self.unfinished.clear()
        if self._admitted:
            self.state.pending -= len(self.requests)
            self._admitted = False


class _ServerState:
    def __init__(self, llm, model_name: str, max_pending_sequences: int):
        self.llm = llm
        self.model_name = model_name
        self.max_pending_sequences = max_pending_sequences
        self.metrics = ServerMetrics()
        self.loop = EngineLoop(llm, self.metrics)
        self.metrics.attach(self.loop)
        self.pending = 0  # sequences admitted and not yet done; only touched on the event loop
        self.ids = itertools.count()
        self.max_model_len = llm.engine.engine_cfg.max_model_len


def _sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


def create_app(llm, model_name: Optional[str] = None, max_pending_sequences: int = 256):
    """The FastAPI app serving `llm`. Its lifespan starts and stops the engine loop; while it runs, the loop
    owns `llm.engine` (do not call `llm.generate` concurrently)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_pending_sequences < 1:
        raise ValueError(f"max_pending_sequences={max_pending_sequences} must be >= 1")
    state = _ServerState(llm, model_name or llm.config.name, max_pending_sequences)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop.start()
        try:
            yield
        finally:
            state.loop.stop()

    app = FastAPI(title="ridgeline", lifespan=lifespan)
    app.state.ridgeline = state

    def error_response(e: OpenAIError) -> JSONResponse:
        state.metrics.rejected.labels(str(e.status_code)).inc()
        return JSONResponse(e.body(), status_code=e.status_code)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, e: OpenAIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error_response(OpenAIError(str(e.detail), status_code=e.status_code,
                                          type="not_found_error" if e.status_code == 404 else "invalid_request_error"))

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "ridgeline", "max_model_len": state.max_model_len}]}

    async def handle(request: Request, kind: str):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(f"the request body is not valid JSON: {e}") from None
        req = protocol.parse_request(kind, body, llm.tokenizer, model_name=state.model_name,
                                     max_model_len=state.max_model_len)
        call = _Call(state, req)
        try:
            await call.start()
            prompt_logprobs = None
            if req.wants_prompt_logprobs:
                prompt_logprobs = await asyncio.wrap_future(state.loop.call(
                    lambda: [llm._prompt_logprobs(ids, req.logprobs) for _, ids in req.prompts]))
            if req.stream:
                response = _EngineStream(call, _stream(call, prompt_logprobs))
                call = None  # the response closes it once sent, failed or cancelled
                return response
            outputs = [None] * req.num_choices
            while call.unfinished:
                try:
                    index, out = await call.next_output(_DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; close() aborts the work
                    continue
                if out.finished:
                    outputs[index] = out
            return protocol.completion_body(req, outputs, llm.tokenizer, prompt_logprobs)
        finally:
            if call is not None:
                call.close()

    class _EngineStream(StreamingResponse):
        """Server-sent events that abort their engine requests however the response ends: a disconnect
        surfaces as an OSError from send() (ASGI 2.4) or a cancellation, and may come before the body
        iterator has even started, so the generator's own `finally` is not enough."""

        def __init__(self, call: _Call, chunks):
            super().__init__(chunks, media_type="text/event-stream")
            self.call = call

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.call.close()

    async def _stream(call: _Call, prompt_logprobs):
        encoder = protocol.StreamEncoder(call.req, llm.tokenizer, prompt_logprobs)
        try:
            while call.unfinished:
                try:
                    index, out = await call.next_output()
                except OpenAIError as e:  # headers are sent: report in-band, as OpenAI does
                    yield _sse(e.body())
                    break
                for chunk in encoder.chunks(index, out):
                    yield _sse(chunk)
            else:
                usage = encoder.usage_chunk()
                if usage is not None:
                    yield _sse(usage)
            yield _sse("[DONE]")
        finally:
            call.close()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, protocol.COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, protocol.CHAT)

    return app


def serve(llm, host: str = "127.0.0.1", port: int = 8000, model_name: Optional[str] = None,
          max_pending_sequences: int = 256, log_level: str = "info") -> None:
    """Serves `llm` until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(llm, model_name, max_pending_sequences)
    logger.info("serving %s on http://%s:%d/v1", app.state.ridgeline.model_name, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
