"""Device layout: the ("data", "model") mesh and its replica groups.

Tensor parallelism (TP) is the mesh's "model" axis: one copy of the weights and of the KV pool is split
across the TP devices of a replica group (sharding/rules.py says how) and each step is one jitted program
over those devices; XLA's GSPMD partitioner inserts the collectives.

Data parallelism (DP) is the "data" axis, and each row of the mesh is one *replica group*. We run one
independent engine per group (own weights copy, own KV pool, own scheduler, own stepping thread:
inference/data_parallel.py) and split the requests between them, like vLLM's data-parallel engines.
Why not one lockstep program with the batch sharded over "data": the ragged step concatenates all sequences' tokens into one array and all sequences
share one page pool, so splitting it needs a scheduler per replica anyway; separate engines also never
wait for each other (no lockstep padding, no cross-replica collectives at all).
"""

from __future__ import annotations

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
