"""Device layout: the ("data", "model") mesh, its replica groups, and the data-parallel engine.

Tensor parallelism (TP) is the mesh's "model" axis: one copy of the weights and of the KV pool is split
across the TP devices of a replica group (sharding/rules.py says how) and each step is one jitted program
over those devices; XLA's GSPMD partitioner inserts the collectives.

Data parallelism (DP) is the "data" axis, and each row of the mesh is one *replica group*. We run one
independent engine per group (own weights copy, own KV pool, own scheduler) and split the requests of an
offline job between them, like vLLM's data-parallel engines. Why not one lockstep program with the batch
sharded over "data": the ragged step concatenates all sequences' tokens into one array and all sequences
share one page pool, so splitting it needs a scheduler per replica anyway; separate engines also never
wait for each other (no lockstep padding, no cross-replica collectives at all).
"""

from __future__ import annotations

import concurrent.futures
import itertools
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return int(value)


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A [data_parallel_size, tensor_parallel_size] mesh with axes ("data", "model").

    Uses the first tp * dp of `devices` (default: all global devices, every process's). jax.devices() is
    ordered process by process, so a replica group (a mesh row) stays inside one host whenever tp divides
    the local device count: TP collectives then run over the fast intra-host links.
    """
    tp = _positive_int("tensor_parallel_size", tensor_parallel_size)
    dp = _positive_int("data_parallel_size", data_parallel_size)
    devices = list(jax.devices() if devices is None else devices)
    need = tp * dp
    if need > len(devices):
        platform = devices[0].platform if devices else jax.default_backend()
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)"
                if platform == "cpu" else "")
        raise ValueError(f"tensor_parallel_size={tp} x data_parallel_size={dp} needs {need} devices, but only "
                         f"{len(devices)} {platform} device(s) are present{hint}")
    grid = np.array(devices[:need], dtype=object).reshape(dp, tp)
    # Auto axes: jit propagates shardings from the inputs (GSPMD), no sharding-in-types needed.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One [1, tp] mesh per replica group (row of `mesh`); the same partition specs apply to each.

    Each group gets its own engine driven by this process, so with several processes (jax.distributed)
    only data_parallel_size 1 is supported here: split the job per process instead (see
    sharding.multihost.split_for_process) and use tensor parallelism within each.
    """
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"mesh axes {tuple(mesh.axis_names)} must be {MESH_AXES} (use sharding.mesh.make_mesh)")
    dp = mesh.devices.shape[0]
    if dp > 1 and jax.process_count() > 1:
        raise ValueError(f"data_parallel_size={dp} with {jax.process_count()} processes is not supported: run one "
                         f"job per process (sharding.multihost.split_for_process) with data_parallel_size=1, "
                         f"and tensor_parallel_size spanning processes if the model needs it")
    return [Mesh(mesh.devices[i:i + 1], MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))
            for i in range(mesh.devices.shape[0])]


class DataParallelEngine:
    """Runs one `inference.engine.Engine` per replica group and splits the requests between them.

    It has the Engine methods `LLM` uses (add_request, abort, step, has_unfinished_requests, run,
    scheduler_stats, close, plus engine_cfg / runner / tokenizer of replica 0 for scoring), so `LLM`
    can hold it in place of an Engine. A request stays on the replica it was given to (its KV pages
    live there). `step()` steps every replica with work concurrently, one thread each: dispatch and the
    wait for results release the GIL, so replicas on different devices compute at the same time.
    """

    def __init__(self, engines: Sequence):
        if not engines:
            raise ValueError("DataParallelEngine needs at least one engine")
        self.engines = list(engines)
        self._owner: dict[str, int] = {}  # request id -> replica index
        self._ids = itertools.count()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.engines),
                                                           thread_name_prefix="dp-replica")

    # The attributes LLM reads from its engine; replica 0 stands for all (they share config and weights).
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

    def _load(self, i: int) -> int:
        # Outstanding work of replica i: requests it owns that have not finished.
        return self.engines[i].scheduler.num_unfinished

    def add_request(self, request_id, prompt_token_ids, params, prompt=None, **kwargs) -> str:
        """Queues the request on the least loaded replica (ties: lowest index); same contract as
        Engine.add_request (extra keyword arguments are passed on)."""
        rid = f"dp{next(self._ids)}" if request_id is None else str(request_id)
        if rid in self._owner:
            raise ValueError(f"request id {rid!r} is already queued")
        i = min(range(len(self.engines)), key=lambda j: (self._load(j), j))
        rid = self.engines[i].add_request(rid, prompt_token_ids, params, prompt=prompt, **kwargs)
        self._owner[rid] = i
        return rid

    def abort(self, request_id: str) -> bool:
        i = self._owner.pop(str(request_id), None)
        return False if i is None else self.engines[i].abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines)

    def step(self) -> list:
        """One step of every replica that has work, concurrently; their outputs concatenated."""
        busy = [e for e in self.engines if e.has_unfinished_requests()]
        if len(busy) <= 1:
            results = [out for e in busy for out in e.step()]
        else:
            results = [out for fut in [self._pool.submit(e.step) for e in busy] for out in fut.result()]
        for out in results:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return results

    def run(self, on_output=None) -> dict:
        from inference.engine import Engine

        return Engine.run(self, on_output)  # the same loop: only needs step() and has_unfinished_requests()

    def scheduler_stats(self) -> dict:
        """Numeric stats summed over replicas, plus each replica's own under "replicas"."""
        per = [e.scheduler_stats() for e in self.engines]
        total = {k: sum(s[k] for s in per) for k, v in per[0].items() if isinstance(v, (int, float))
                 and not isinstance(v, bool)}
        return {**total, "replicas": per}

    def close(self):
        for e in self.engines:
            e.close()
        self._pool.shutdown(wait=True)
