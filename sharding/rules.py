"""Partition rules: logical axis names (model/llama.py PARAM_AXES / CACHE_AXES) -> mesh axes.

Megatron-style tensor parallelism (TP) over the mesh's "model" axis:
- attention: wq/wk/wv split by output columns (whole heads per device), wo split by input rows, so each
  device attends with its own heads and one all-reduce after wo combines them;
- MLP: w_gate/w_up split by columns, w_down by rows (one all-reduce after w_down);
- embedding and lm_head split over the vocabulary;
- KV page pool [KVH, L*num_pages, page_size, head_dim] split over KV heads, so every device keeps exactly
  the K/V of the query heads it computes. Norms and everything along "embed" stay replicated.

GQA with fewer KV heads than TP devices (e.g. 2 KV heads, TP 4): the TP group is viewed as
[kv groups, kv replicas] = [g, tp / g] with g = gcd(num_kv_heads, tp). KV heads (wk, wv, the KV pool) are
split over the g groups and replicated over the replicas inside a group; query heads, MLP and vocab are
split over both. Device (i, j) then holds KV heads i*KVH/g .. and exactly the query heads that use them,
so attention stays local to every device and each holds the least KV a replicated layout allows
(vLLM's KV-head replication). With g = tp (TP divides KVH) this is the plain layout.

The placement is only a layout: under jit, GSPMD keeps the math identical whatever we pick and inserts
the collectives the layout implies. The rules exist for memory and speed; the checks turn layouts that
would split a head into clear errors, and uneven MLP / vocab splits into a replicated fallback.

Pallas kernels are custom calls that GSPMD cannot split (it would gather their operands and run them
whole on every device), so the model runs them inside `jax.shard_map` with specs from this same table
(`KernelSharding`): the attention and KV-update kernels see each device's own heads and KV pool shard,
the quantized matmul its own output columns (or input rows, then a psum).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional, Union

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from model.config import LlamaConfig
from model.llama import CACHE_AXES, PARAM_AXES
from model.quantize import QuantizedWeight
from sharding.mesh import DATA, MESH_AXES, MODEL

KV_REPLICA = "kv_replica"   # the part of the TP group that holds copies of the same KV heads
TP = (MODEL, KV_REPLICA)    # the whole TP group
RULES_MESH_AXES = (DATA, MODEL, KV_REPLICA)

# The one table: logical axis -> mesh axes (None = replicated). Every "data" row holds a full copy.
LOGICAL_AXIS_RULES: dict[str, Union[None, str, tuple]] = {
    "vocab": TP,
    "embed": None,
    "heads": TP,
    "kv_heads": MODEL,
    "head_dim": None,
    "mlp": TP,
    "layers": None,
    "pages": None,
    "page_slot": None,
    "tokens": None,  # activations: every device of a TP group holds all of a step's tokens
}

AnyMesh = Union[Mesh, AbstractMesh]


def tensor_parallel_size(mesh: AnyMesh) -> int:
    shape = dict(mesh.shape)
    return int(shape.get(MODEL, 1)) * int(shape.get(KV_REPLICA, 1))


def check_layout(cfg: LlamaConfig, tensor_parallel_size: int) -> None:
    """Raises ValueError for a TP degree that cannot hold whole attention heads per device."""
    tp = tensor_parallel_size
    if cfg.num_heads % tp:
        raise ValueError(f"num_heads={cfg.num_heads} of model {cfg.name!r} is not divisible by "
                         f"tensor_parallel_size={tp}; use a tensor_parallel_size that divides {cfg.num_heads}")


def rules_mesh(mesh: AnyMesh, cfg: LlamaConfig) -> AnyMesh:
    """The mesh arrays are placed on: `mesh` ("data", "model") with "model" viewed as
    ("model", "kv_replica") = [gcd(num_kv_heads, tp), tp / gcd]. Same devices, same order."""
    if tuple(mesh.axis_names) == RULES_MESH_AXES:
        return mesh
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"mesh axes {tuple(mesh.axis_names)} must be {MESH_AXES} (use sharding.mesh.make_mesh)")
    dp, tp = mesh.shape[DATA], mesh.shape[MODEL]
    check_layout(cfg, tp)
    groups = math.gcd(cfg.num_kv_heads, tp)
    sizes, types = (dp, groups, tp // groups), (AxisType.Auto,) * 3
    if isinstance(mesh, AbstractMesh):
        return AbstractMesh(sizes, RULES_MESH_AXES, types)
    return Mesh(mesh.devices.reshape(sizes), RULES_MESH_AXES, axis_types=types)


def resolve_rules(cfg: LlamaConfig, tensor_parallel_size: int) -> dict:
    """LOGICAL_AXIS_RULES specialised to one model and TP degree (after check_layout): "mlp" / "vocab" are
    replicated, with a warning, when TP does not divide intermediate_size / vocab_size (correct, but the
    weights then take tp times the memory)."""
    check_layout(cfg, tensor_parallel_size)
    tp = tensor_parallel_size
    rules = dict(LOGICAL_AXIS_RULES)
    for axis, size, field in (("mlp", cfg.intermediate_size, "intermediate_size"),
                              ("vocab", cfg.vocab_size, "vocab_size")):
        if tp > 1 and size % tp:
            warnings.warn(f"{field}={size} is not divisible by tensor_parallel_size={tp}: the {axis!r} axis is "
                          f"replicated instead of sharded (correct, but uses more memory)", stacklevel=3)
            rules[axis] = None
    return rules


def _axis_size(mesh: AnyMesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[n] for n in names]))


def _spec(axes: tuple, shape: tuple, rules: dict, mesh: AnyMesh) -> P:
    """PartitionSpec for one array: each dim takes its logical axis' mesh axes if they divide it evenly."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match an array of shape {tuple(shape)}")
    used, out = set(), []
    for name, size in zip(axes, shape):
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule in sharding.rules.LOGICAL_AXIS_RULES")
        axis = rules[name]
        # Size-1 mesh axes split nothing; leaving them out keeps specs readable (P("model") not P(("model",
        # "kv_replica"))) when there is no KV replication.
        names = tuple(n for n in (axis if isinstance(axis, tuple) else (axis,)) if n is not None
                      and mesh.shape[n] > 1)
        # A mesh axis shards one dim only, and jax cannot place an uneven split: replicate those dims.
        if not names or set(names) & used or size % _axis_size(mesh, names):
            out.append(None)
            continue
        used |= set(names)
        out.append(names[0] if len(names) == 1 else names)
    return P(*out)


def _quantized_specs(qw: QuantizedWeight, axes: tuple, rules: dict, mesh: AnyMesh) -> QuantizedWeight:
    """Specs for a QuantizedWeight: `values` like the float weight, scales/zeros along the same out dim
    (and the same input groups when grouped). A sharded input dim must split on group boundaries, so that
    each device's packed values and its scales describe the same input rows; otherwise it is replicated."""
    lead, in_name, out_name = tuple(axes[:-2]), axes[-2], axes[-1]
    in_rules = dict(rules)
    axis = rules[in_name]
    if axis is not None and qw.group_size is not None and (qw.in_features // qw.group_size) % _axis_size(mesh, axis):
        in_rules[in_name] = None
    values = _spec(lead + (in_name, out_name), qw.values.shape, in_rules, mesh)
    scale_axes = lead + ((out_name,) if qw.group_size is None else (in_name, out_name))
    scales = _spec(scale_axes, qw.scales.shape, in_rules, mesh)
    zeros = None if qw.zeros is None else _spec(scale_axes, qw.zeros.shape, in_rules, mesh)
    return dataclasses.replace(qw, values=values, scales=scales, zeros=zeros)


def param_specs(params, cfg: LlamaConfig, mesh: AnyMesh):
    """A pytree of PartitionSpecs (over rules_mesh(mesh)) shaped like `params`; QuantizedWeights get one
    spec per array. `params` may hold arrays or jax.ShapeDtypeStructs."""
    mesh = rules_mesh(mesh, cfg)
    rules = resolve_rules(cfg, tensor_parallel_size(mesh))

    def walk(tree, axes, path):
        if isinstance(tree, dict):
            if not isinstance(axes, dict):
                raise ValueError(f"params{path} is a dict but PARAM_AXES{path} is {axes!r}")
            missing = sorted(set(tree) - set(axes))
            if missing:
                raise ValueError(f"params{path} has keys {missing} with no logical axes in model.llama.PARAM_AXES")
            return {k: walk(v, axes[k], f"{path}[{k!r}]") for k, v in tree.items()}
        if isinstance(tree, QuantizedWeight):
            return _quantized_specs(tree, axes, rules, mesh)
        shape = tree.shape if hasattr(tree, "shape") else np.shape(tree)
        return _spec(tuple(axes), tuple(shape), rules, mesh)

    return walk(params, PARAM_AXES, "")


def param_shardings(params, cfg: LlamaConfig, mesh: Mesh):
    """NamedShardings shaped like `params` (e.g. for jit in_shardings)."""
    rmesh = rules_mesh(mesh, cfg)
    return jax.tree.map(lambda spec: NamedSharding(rmesh, spec), param_specs(params, cfg, rmesh),
                        is_leaf=lambda x: isinstance(x, P))


def _put(x, sharding: NamedSharding):
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # Multi-process: each process builds only its own shards, from the same host value in every process.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params, cfg: LlamaConfig, mesh: Mesh):
    """Places `params` on `mesh` by the rules (replicated over "data", split over the TP group)."""
    return jax.tree.map(_put, params, param_shardings(params, cfg, mesh))


def cache_spec(cfg: LlamaConfig, mesh: AnyMesh) -> P:
    """PartitionSpec (over rules_mesh(mesh)) of the KV pool [KVH, L * num_pages, page_size, head_dim]."""
    mesh = rules_mesh(mesh, cfg)
    rules = resolve_rules(cfg, tensor_parallel_size(mesh))
    # The pool size is not known yet: 0 stands for "any" (divisible), so only the table decides those dims.
    return _spec(CACHE_AXES, (cfg.num_kv_heads, 0, 0, cfg.head_dim), rules, mesh)


def cache_sharding(cfg: LlamaConfig, mesh: Mesh, kv_dtype=None) -> dict:
    """{"k", "v"} NamedShardings of the KV page pool: split over KV heads (see the module doc for GQA).
    An int8 pool's per-token "k_scale"/"v_scale" [KVH, L * num_pages, page_size] split the same way."""
    spec = cache_spec(cfg, mesh)
    s = NamedSharding(rules_mesh(mesh, cfg), spec)
    shardings = {"k": s, "v": s}
    if kv_dtype is not None and jax.numpy.dtype(kv_dtype) == jax.numpy.int8:
        scale = NamedSharding(rules_mesh(mesh, cfg), P(*spec[:3]))
        shardings.update(k_scale=scale, v_scale=scale)
    return shardings


@dataclasses.dataclass(frozen=True, eq=False)
class KernelSharding:
    """The table applied to the kernels' operands on one TP mesh (what `model.llama` hands to shard_map)."""

    cfg: LlamaConfig
    mesh: AnyMesh  # a rules mesh ("data", "model", "kv_replica") with tensor_parallel_size > 1
    rules: dict    # resolve_rules(cfg, tp)

    def spec(self, axes: tuple, shape: tuple) -> P:
        """PartitionSpec of an operand with these logical axes (None entries: never split)."""
        rules = {**self.rules, None: None}
        return _spec(tuple(axes), tuple(shape), rules, self.mesh)

    def quantized_weight_spec(self, w: QuantizedWeight, axes: tuple) -> QuantizedWeight:
        """Specs of a 2-D quantized weight [in, out] with logical `axes`, exactly as `shard_params` placed it."""
        return _quantized_specs(w, tuple(axes), self.rules, self.mesh)

    def parts(self, entry) -> int:
        """Into how many pieces one PartitionSpec entry (None, a mesh axis or a tuple of them) splits a dim."""
        return 1 if entry is None else _axis_size(self.mesh, entry)

    @property
    def query_heads_axis(self) -> str:
        """The logical axis the attention kernels split query heads by.

        The kernels map local query head h to local KV head h // (local heads / local KV heads). That is
        the model's GQA mapping when each device holds one KV head, or no KV head is replicated: then
        "heads" (each device its own query heads). Otherwise (e.g. 3 KV heads on TP 2, all replicated)
        each device attends for every query head of the KV heads it holds ("kv_heads") and keeps its own
        heads afterwards: redundant attention FLOPs, but no copy of the pool."""
        heads, kv_heads = self.cfg.num_heads, self.cfg.num_kv_heads
        q_split = self.parts(self.spec(("heads",), (heads,))[0])
        kv_split = self.parts(self.spec(("kv_heads",), (kv_heads,))[0])
        return "heads" if q_split == kv_split or kv_heads // kv_split == 1 else "kv_heads"


def kernel_sharding(cfg: LlamaConfig, mesh: Optional[AnyMesh]) -> Optional[KernelSharding]:
    """KernelSharding for operands placed on `mesh` by these rules; None without tensor parallelism (or on
    a mesh these rules did not build, where GSPMD alone partitions)."""
    if mesh is None or tuple(mesh.axis_names) != RULES_MESH_AXES or tensor_parallel_size(mesh) == 1:
        return None
    with warnings.catch_warnings():  # an uneven MLP / vocab split was already reported at placement
        warnings.simplefilter("ignore")
        rules = resolve_rules(cfg, tensor_parallel_size(mesh))
    return KernelSharding(cfg, mesh, rules)


def kv_pool_split(cfg: LlamaConfig, sharding: Optional[dict]) -> int:
    """Over how many devices each KV page is split (1: unsharded or replicated). Each device of a TP
    group holds 1/kv_pool_split of every page, so a per-device memory budget holds that many times the
    pages."""
    if sharding is None:
        return 1
    return cfg.num_kv_heads // sharding["k"].shard_shape((cfg.num_kv_heads, 1, 1, cfg.head_dim))[0]


def bytes_per_device(tree) -> int:
    """Largest number of bytes any one device holds of `tree` (the weights budget for KV sizing under TP)."""
    per: dict = {}
    for a in jax.tree.leaves(tree):
        if isinstance(a, jax.Array):
            for shard in a.addressable_shards:
                per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
        else:
            per[None] = per.get(None, 0) + int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize
    return max(per.values(), default=0)


__all__ = ["LOGICAL_AXIS_RULES", "KV_REPLICA", "TP", "check_layout", "rules_mesh", "resolve_rules",
           "param_specs", "param_shardings", "shard_params", "cache_spec", "cache_sharding",
           "KernelSharding", "kernel_sharding", "kv_pool_split", "bytes_per_device", "tensor_parallel_size"]
