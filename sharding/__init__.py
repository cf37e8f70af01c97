"""Tensor / data parallel layout of ridgeline models, and multi-host start-up.

- `sharding.mesh`: `make_mesh(tp, dp)` (axes "data", "model"), `replica_meshes` (the engines that
  run on them: inference/data_parallel.py).
- `sharding.rules`: the logical-axis -> mesh-axis table, `shard_params`, `cache_sharding`.
- `sharding.multihost`: `initialize_from_env_or_flags` (jax.distributed), `split_for_process`.

Submodules are imported on demand so `import sharding` stays cheap.
"""

__all__ = ["mesh", "rules", "multihost"]
