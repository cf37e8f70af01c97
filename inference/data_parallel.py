"""Data parallelism: one independent engine per replica group, each stepped by its own thread.

`LLM(tensor_parallel_size=t, data_parallel_size=d)` builds d engines (sharding.mesh.replica_meshes gives each
its [1, t] sub-mesh: own weights copy, KV pool and scheduler) and holds them in a `DataParallelEngine`, which
has the Engine methods `LLM`, the server and batch jobs use (add_request, abort, step,
has_unfinished_requests, run, scheduler_stats, close).

Each replica runs its own loop on its own thread: it steps its engine whenever it has work and a consumer
is asking for outputs (inside `step()`), and puts every step's outputs on one queue. `step()` returns as soon
as any replica finished a step, so a replica with long requests or slow steps never holds back a fast one
(no lockstep; dispatch and device waits release the GIL, so replicas on different devices compute at the
same time). Between `step()` calls the replicas pause at their next step boundary: requests are added
and aborted while no step runs, so `add_request` can validate synchronously and raise, as Engine's does.

A request stays on the replica it was given to (its KV pages live there). If a replica's step raises, that
replica is retired: each of its requests finishes with an error naming the replica and the exception, and
the other replicas carry on. An interrupt (KeyboardInterrupt) in `step()` lets every in-flight step finish
and pauses all replicas before it propagates; `close()` ends the threads.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

from inference.engine import Engine
from inference.outputs import CompletionOutput, RequestOutput


@dataclass
class _Replica:
    index: int
    engine: object
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while its engine steps or is changed
    num_owned: int = 0        # requests given to it whose final output the consumer has not taken yet
    error: Optional[str] = None  # set once its step raised: it takes no more work
    thread: Optional[threading.Thread] = None


@dataclass
class _Owned:
    replica: _Replica
    prompt: Optional[str]
    prompt_token_ids: list


class DataParallelEngine:
    """Engines (one per replica group) that step independently; requests go to the least-loaded one.

    engine_cfg / runner / tokenizer / cfg are replica 0's (the replicas share config and weights), which
    is what `LLM.score` and warm-up read."""

    def __init__(self, engines: Sequence):
        if not engines:
            raise ValueError("DataParallelEngine needs at least one engine")
        self.engines = list(engines)
        self._replicas = [_Replica(i, e) for i, e in enumerate(self.engines)]
        self._owner: dict[str, _Owned] = {}
        self._ids = itertools.count()
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()  # (replica, outputs, exception or None)
        self._cond = threading.Condition()  # guards the three fields below
        self._pulling = False   # a consumer is inside step(): replicas may start steps
        self._stopping = False
        self._num_stepping = 0  # replicas inside an engine step now
        for rep in self._replicas:
            rep.thread = threading.Thread(target=self._replica_loop, args=(rep,), daemon=True,
                                          name=f"dp-replica-{rep.index}")
            rep.thread.start()

    # The attributes LLM reads from its engine; replica 0 stands for all.
    @property
    def engine_cfg(self):
        return self.engines[0].engine_cfg

    @property
    def runner(self):
        return self.engines[0].runner

    @property
    def tokenizer(self):
        return self.engines[0].tokenizer

    @property
    def cfg(self):
        return self.engines[0].cfg

    # ------------------------------------------------------------------ replica threads
    def _has_work(self, rep: _Replica) -> bool:
        with rep.lock:
            return rep.engine.has_unfinished_requests()

    def _replica_loop(self, rep: _Replica) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._pulling and rep.error is None and self._has_work(rep)):
                    self._cond.wait()
                if self._stopping:
                    return
                self._num_stepping += 1
            outputs, failure = [], None
            try:
                with rep.lock:
                    outputs = rep.engine.step()
            except BaseException as e:  # noqa: BLE001 -- any failure retires this replica only
                failure = e
            with self._cond:
                if failure is not None:
                    rep.error = (f"data-parallel replica {rep.index} of {len(self._replicas)} failed: "
                                 f"{type(failure).__name__}: {failure}")
                self._outputs.put((rep, outputs, failure))
                self._num_stepping -= 1
                self._cond.notify_all()

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id, prompt_token_ids, params, prompt=None, **kwargs) -> str:
        """Queues the request on the least loaded healthy replica (ties: lowest index); same contract as
        Engine.add_request (extra keyword arguments are passed on)."""
        rid = f"dp{next(self._ids)}" if request_id is None else str(request_id)
        if rid in self._owner:
            raise ValueError(f"request id {rid!r} is already queued")
        healthy = [rep for rep in self._replicas if rep.error is None]
        if not healthy:
            raise RuntimeError("every data-parallel replica has failed: "
                               + "; ".join(rep.error for rep in self._replicas))
        rep = min(healthy, key=lambda r: (r.num_owned, r.index))
        with rep.lock:
            rid = rep.engine.add_request(rid, prompt_token_ids, params, prompt=prompt, **kwargs)
        self._owner[rid] = _Owned(rep, prompt, list(prompt_token_ids))
        rep.num_owned += 1
        with self._cond:
            self._cond.notify_all()
        return rid

    def abort(self, request_id: str) -> bool:
        owned = self._owner.pop(str(request_id), None)
        if owned is None:
            return False
        owned.replica.num_owned -= 1
        with owned.replica.lock:
            return owned.replica.engine.abort(str(request_id))

    def has_unfinished_requests(self) -> bool:
        """True until the final output of every request queued here was returned by step()."""
        return bool(self._owner)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Waits until at least one replica finished a step; returns the outputs of every step finished
        since the last call. The others are not waited for: a step in flight carries on into the next call."""
        if not self._owner:
            return []
        with self._cond:
            self._pulling = True
            self._cond.notify_all()
        try:
            first = self._next_item()
            with self._cond:
                self._pulling = False
            if first is None:
                return self._fail_lost()
            items = [first]
            while True:
                try:
                    items.append(self._outputs.get_nowait())
                except queue.Empty:
                    break
            results = []
            for rep, outputs, failure in items:
                if failure is not None:
                    results += self._fail_replica(rep)
                for out in outputs:
                    if out.request_id not in self._owner:  # aborted after its replica produced this
                        continue
                    if out.finished:
                        del self._owner[out.request_id]
                        rep.num_owned -= 1
                    results.append(out)
            return results
        except BaseException:
            # Interrupted (Ctrl-C): no replica starts another step until the next call.
            self._pause()
            raise

    def _next_item(self):
        """The next replica step's (replica, outputs, failure), or None if no replica can make one."""
        while True:
            try:
                return self._outputs.get(timeout=0.5)
            except queue.Empty:
                with self._cond:  # a replica puts its item before it stops counting as stepping
                    if (not self._num_stepping and self._outputs.empty()
                            and not any(rep.error is None and self._has_work(rep) for rep in self._replicas)):
                        return None

    def _fail_lost(self) -> list[RequestOutput]:
        """Requests whose replica holds no work any more yet never gave a final output (never expected: an
        error rather than a hang)."""
        lost = []
        for rid, owned in list(self._owner.items()):
            del self._owner[rid]
            owned.replica.num_owned -= 1
            lost.append(RequestOutput(rid, owned.prompt, owned.prompt_token_ids, [CompletionOutput(0, "", [], "error")],
                                      True, error=f"data-parallel replica {owned.replica.index} dropped the request "
                                                  f"without a final output"))
        return lost

    def _pause(self) -> None:
        """Stops the replicas from starting new steps and waits for the steps in flight to end."""
        with self._cond:
            self._pulling = False
            while self._num_stepping:
                self._cond.wait()

    def _fail_replica(self, rep: _Replica) -> list[RequestOutput]:
        """Every request of a replica whose step raised: aborted there, finished here with its error."""
        failed = []
        for rid in [rid for rid, owned in self._owner.items() if owned.replica is rep]:
            owned = self._owner.pop(rid)
            with rep.lock:
                rep.engine.abort(rid)
            failed.append(RequestOutput(rid, owned.prompt, owned.prompt_token_ids,
                                        [CompletionOutput(0, "", [], "error")], True, error=rep.error))
        rep.num_owned = 0
        return failed

    run = Engine.run  # the same loop: it needs only step() and has_unfinished_requests()

    def scheduler_stats(self) -> dict:
        """Numeric stats summed over replicas, plus each replica's own under "replicas"."""
        per = []
        for rep in self._replicas:
            with rep.lock:
                per.append(rep.engine.scheduler_stats())
        total = {k: sum(s[k] for s in per) for k, v in per[0].items() if isinstance(v, (int, float))
                 and not isinstance(v, bool)}
        return {**total, "replicas": per}

    def close(self):
        """Ends the replica threads (after their steps in flight), then releases every engine."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for rep in self._replicas:
            rep.thread.join()
        for e in self.engines:
            e.close()
