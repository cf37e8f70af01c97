"""Multi-process / multi-host start-up (jax.distributed) driven by flags or environment variables.

Every process runs the same script. After `initialize_from_env_or_flags()`, `jax.devices()` lists the
devices of all processes, so `make_mesh(tp, dp)` can span hosts and a jitted step is one SPMD program
that every process executes in lockstep (each feeding and owning its local shards). The engine is
deterministic given the same requests, so all processes make the same scheduling decisions and call the
same programs; only the process-local parts (printing, writing outputs) should be limited to process 0.

Environment (flags win over the environment; see scripts/launch_multihost.sh):
    RIDGELINE_COORDINATOR     host:port of process 0's coordinator service (reachable by every process)
    RIDGELINE_NUM_PROCESSES   total number of processes
    RIDGELINE_PROCESS_ID      this process' id, 0 .. num_processes - 1

Call it before anything touches a JAX device (jax.distributed must initialize first).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

ENV_COORDINATOR = "RIDGELINE_COORDINATOR"
ENV_NUM_PROCESSES = "RIDGELINE_NUM_PROCESSES"
ENV_PROCESS_ID = "RIDGELINE_PROCESS_ID"


def _int_setting(value, env: str, name: str) -> Optional[int]:
    raw = value if value is not None else os.environ.get(env)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={raw!r} (from {'argument' if value is not None else '$' + env}) "
                         f"must be an integer") from None


def resolve_settings(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> Optional[tuple[str, int, int]]:
    """(coordinator, num_processes, process_id) from arguments, else the environment; None when nothing
    asks for multi-process (no coordinator and num_processes unset or 1). Raises ValueError on a partial
    or inconsistent setting, naming the values."""
    coordinator = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    n = _int_setting(num_processes, ENV_NUM_PROCESSES, "num_processes")
    pid = _int_setting(process_id, ENV_PROCESS_ID, "process_id")
    if coordinator is None and (n is None or n == 1) and pid in (None, 0):
        return None
    missing = [name for name, v, env in (("coordinator_address", coordinator, ENV_COORDINATOR),
                                         ("num_processes", n, ENV_NUM_PROCESSES),
                                         ("process_id", pid, ENV_PROCESS_ID)) if v is None]
    if missing:
        raise ValueError(f"multi-process start-up needs coordinator_address, num_processes and process_id; "
                         f"missing: {', '.join(missing)} (pass them or set ${ENV_COORDINATOR}, "
                         f"${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID})")
    if n < 1:
        raise ValueError(f"num_processes={n} must be >= 1")
    if not 0 <= pid < n:
        raise ValueError(f"process_id={pid} must be in [0, num_processes={n})")
    if ":" not in coordinator:
        raise ValueError(f"coordinator_address={coordinator!r} must be host:port")
    return coordinator, n, pid


def initialize_from_env_or_flags(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None, *,
                                 local_device_ids: Optional[Sequence[int]] = None,
                                 initialization_timeout: int = 300) -> bool:
    """Calls jax.distributed.initialize from arguments or $RIDGELINE_*; returns True if multi-process.

    Without any setting (or with num_processes 1) this is a no-op returning False, so single-host scripts
    can call it unconditionally. Calling it again after a successful start is also a no-op.
    `initialization_timeout` (seconds) bounds the wait for the other processes to join.
    """
    import jax

    settings = resolve_settings(coordinator_address, num_processes, process_id)
    if settings is None:
        return False
    if jax.distributed.is_initialized():
        return True
    coordinator, n, pid = settings
    if n == 1:
        return False
    # CPU collectives across processes need an implementation; gloo (TCP) is jax's default since 0.4.3x,
    # but an explicit None (e.g. from a user flag) would make cross-process CPU programs fail at run time.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid,
                               local_device_ids=local_device_ids, initialization_timeout=initialization_timeout)
    return True


def add_multihost_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds --coordinator, --num-processes, --process-id (defaults: the $RIDGELINE_* environment)."""
    group = parser.add_argument_group("multi-host (jax.distributed)")
    group.add_argument("--coordinator", default=None, help=f"host:port of process 0 (default ${ENV_COORDINATOR})")
    group.add_argument("--num-processes", type=int, default=None, help=f"default ${ENV_NUM_PROCESSES}")
    group.add_argument("--process-id", type=int, default=None, help=f"default ${ENV_PROCESS_ID}")
    return parser


def initialize_from_args(args: argparse.Namespace) -> bool:
    """initialize_from_env_or_flags with the values of add_multihost_flags."""
    return initialize_from_env_or_flags(args.coordinator, args.num_processes, args.process_id)


def is_main_process() -> bool:
    """Process 0 writes files / prints; the others compute their shards."""
    import jax

    return jax.process_index() == 0


def split_for_process(items: Sequence, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> list:
    """This process' share (round robin) of an offline job, for data parallelism across hosts by running
    independent jobs: every process calls it on the same list. Defaults: jax's process index/count once
    jax.distributed is up, else $RIDGELINE_PROCESS_ID / $RIDGELINE_NUM_PROCESSES (independent processes
    need no jax.distributed at all), else a single process."""
    import jax

    if jax.distributed.is_initialized():
        default_i, default_n = jax.process_index(), jax.process_count()
    else:
        default_i = _int_setting(None, ENV_PROCESS_ID, "process_id") or 0
        default_n = _int_setting(None, ENV_NUM_PROCESSES, "num_processes") or 1
    i = default_i if process_index is None else process_index
    n = default_n if process_count is None else process_count
    if not 0 <= i < n:
        raise ValueError(f"process_index={i} must be in [0, process_count={n})")
    return list(items)[i::n]


def gather_to_host(x):
    """A (possibly multi-process sharded) jax.Array as one numpy array on every process."""
    import jax
    import numpy as np

    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
