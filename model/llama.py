"""Pure-functional Llama-family model: params and KV cache are pytrees, `forward` is a pure function.

One forward serves every kind of step: tokens of several sequences are concatenated (a ragged batch,
see docs/DESIGN.md), each sequence attends to its own paged KV. Layers are stacked and run with
`lax.scan`, which keeps compile time flat in the layer count; the KV cache is one page pool shared by all
layers (layer l's page p is physical page l * num_pages + p) and is carried through the scan and updated
in place.

Tensor parallelism: when the cache or weights live on a tensor-parallel mesh (sharding/rules.py), the
attention + KV-update kernels and quantized matmuls run inside `jax.shard_map`, each device on its own
heads / columns (a Pallas custom call under GSPMD alone would run whole on every device); the float
matmuls, norms and embeddings stay with GSPMD, which splits them by the weights' layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from model.config import LlamaConfig
from model.quantize import QuantizedWeight, StackedLayer, dense
from pallas_kernels import flash_attention, ragged_paged_attention, update_kv_cache

Params = dict
Cache = dict

# Logical axis names of every parameter (mapped onto mesh axes by sharding/rules.py).
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "layers": {
        "attn_norm": ("layers", "embed"),
        "wq": ("layers", "embed", "heads"),
        "wk": ("layers", "embed", "kv_heads"),
        "wv": ("layers", "embed", "kv_heads"),
        "bq": ("layers", "heads"),
        "bk": ("layers", "kv_heads"),
        "bv": ("layers", "kv_heads"),
        "wo": ("layers", "heads", "embed"),
        "mlp_norm": ("layers", "embed"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    },
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
}
CACHE_AXES = ("kv_heads", "pages", "page_slot", "head_dim")
CACHE_SCALE_AXES = ("kv_heads", "pages", "page_slot")  # "k_scale" / "v_scale" of an int8 cache
# Cache entries in the order they ride through the layer scan (scales only for int8 pages).
CACHE_KEYS = ("k", "v", "k_scale", "v_scale")


class StepInputs(NamedTuple):
    """One ragged step (docs/DESIGN.md). All int32."""

    tokens: jax.Array  # [T]
    positions: jax.Array  # [T]
    slot_mapping: jax.Array  # [T]  page * page_size + offset, -1 for padding
    cu_q_lens: jax.Array  # [S + 1]
    kv_lens: jax.Array  # [S]
    block_tables: jax.Array  # [S, max_pages]
    num_seqs: jax.Array  # [1]
    logits_indices: jax.Array  # [N]


# ----------------------------------------------------------------------------- init


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights at the config's real shapes (benchmarks, tests)."""
    d, f, hd, L = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    keys = iter(jax.random.split(key, 16))

    def normal(shape, fan_in):
        return (jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)

    layers = {
        "attn_norm": jnp.ones((L, d), dtype),
        "wq": normal((L, d, qd), d),
        "wk": normal((L, d, kvd), d),
        "wv": normal((L, d, kvd), d),
        "wo": normal((L, qd, d), qd),
        "mlp_norm": jnp.ones((L, d), dtype),
        "w_gate": normal((L, d, f), d),
        "w_up": normal((L, d, f), d),
        "w_down": normal((L, f, d), f),
    }
    if cfg.attention_bias:
        layers["bq"] = normal((L, qd), 1.0) * 0.1
        layers["bk"] = normal((L, kvd), 1.0) * 0.1
        layers["bv"] = normal((L, kvd), 1.0) * 0.1
    params = {"embed": normal((cfg.vocab_size, d), 1.0), "layers": layers, "final_norm": jnp.ones((d,), dtype)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((d, cfg.vocab_size), d)
    return params


def init_cache(cfg: LlamaConfig, num_pages: int, page_size: int, dtype=jnp.float32, *,
               sharding: Optional[dict] = None) -> Cache:
    """Empty paged KV pool: `num_pages` pages per layer, all layers in one array.

    dtype int8 gives a quantized pool: int8 "k"/"v" plus float32 "k_scale"/"v_scale"
    [KVH, L * num_pages, page_size], one absmax scale per token per KV head (pallas_kernels.kv_cache_update).
    sharding: a {key: Sharding} dict like the pool (sharding.rules.cache_sharding); each device then
    creates only its own shard (the whole pool never sits on one device).
    """
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"{num_pages=} and {page_size=} must be >= 1")
    dtype = jnp.dtype(dtype)
    if not (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.int8):
        raise ValueError(f"kv cache dtype={dtype} must be a float type or int8")
    shape = (cfg.num_kv_heads, cfg.num_layers * num_pages, page_size, cfg.head_dim)
    local_heads = cfg.num_kv_heads if sharding is None else sharding["k"].shard_shape(shape)[0]
    if pool_offsets_wrap((local_heads,) + shape[1:], dtype):
        low, high = safe_pool_pages(cfg, num_pages, page_size, dtype, local_heads), _first_i64_pool_pages(
            cfg, page_size, dtype, local_heads)
        raise ValueError(f"an {dtype} KV pool of {num_pages=} pages ({local_heads} KV heads per device) is an "
                         f"array of {local_heads * int(np.prod(shape[1:]))} bytes, where the Pallas GPU kernels' "
                         f"32-bit offsets wrap (2**31..2**32 bytes); use num_pages <= {low} or >= {high}")

    def zeros():
        cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        if dtype == jnp.int8:
            cache["k_scale"] = jnp.zeros(shape[:3], jnp.float32)
            cache["v_scale"] = jnp.zeros(shape[:3], jnp.float32)
        return cache

    return zeros() if sharding is None else jax.jit(zeros, out_shardings=sharding)()


# The Pallas Triton lowering indexes an array with 32-bit element offsets unless it exceeds 2**32 bytes
# (then 64-bit; jax/_src/pallas/triton/lowering.py). Offsets past 2**31 - 1 wrap, so an array of more than
# 2**31 elements but at most 2**32 bytes -- an int8 array of 2-4 GiB, e.g. one int8 pool holding every
# layer -- is read and written at wrong addresses. Wider dtypes cannot land there.
_I32_OFFSET_ELEMENTS = 2**31
_I64_OFFSETS_ABOVE_BYTES = 2**32


def pool_offsets_wrap(shape: tuple, dtype) -> bool:
    """True for an array (one device's KV pool shard) whose kernel offsets would wrap (see above)."""
    elements = int(np.prod(shape, dtype=np.int64))
    return elements > _I32_OFFSET_ELEMENTS and elements * jnp.dtype(dtype).itemsize <= _I64_OFFSETS_ABOVE_BYTES


def _page_elements(cfg: LlamaConfig, page_size: int, kv_heads: int) -> int:
    return kv_heads * cfg.num_layers * page_size * cfg.head_dim  # elements of one page per layer, all layers


def safe_pool_pages(cfg: LlamaConfig, num_pages: int, page_size: int, dtype, kv_heads: int) -> int:
    """num_pages, or the largest smaller page count whose pool shard of `kv_heads` KV heads stays below the
    wrapping range (capping, not padding: padding past 2**32 bytes would spend memory the budget lacks)."""
    shape = (kv_heads, cfg.num_layers * num_pages, page_size, cfg.head_dim)
    if not pool_offsets_wrap(shape, dtype):
        return num_pages
    return _I32_OFFSET_ELEMENTS // _page_elements(cfg, page_size, kv_heads)


def _first_i64_pool_pages(cfg: LlamaConfig, page_size: int, dtype, kv_heads: int) -> int:
    per_page = _page_elements(cfg, page_size, kv_heads) * jnp.dtype(dtype).itemsize
    return _I64_OFFSETS_ABOVE_BYTES // per_page + 1


def kv_bytes_per_token_elem(head_dim: int, dtype) -> float:
    """Bytes one K (or V) element costs in the pool, counting an int8 page's per-token scale."""
    dtype = jnp.dtype(dtype)
    return 1.0 + 4.0 / head_dim if dtype == jnp.int8 else float(dtype.itemsize)


def cache_carry(cache: Cache) -> tuple:
    """The cache as the tuple that rides through the layer scan: (k, v) or (k, v, k_scale, v_scale)."""
    return tuple(cache[key] for key in CACHE_KEYS if key in cache)


def cache_from_carry(pool: tuple) -> Cache:
    return dict(zip(CACHE_KEYS, pool))


def _scale_kwargs(pool: Cache) -> dict:
    """The kernels' k_scales / v_scales arguments: an int8 pool's scales, nothing for a float pool."""
    return {"k_scales": pool["k_scale"], "v_scales": pool["v_scale"]} if "k_scale" in pool else {}


# ----------------------------------------------------------------------------- blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin [T, head_dim // 2] for the half-split (Hugging Face "rotate_half") layout."""
    inv_freq = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, heads, head_dim]; rotates pairs (i, i + head_dim/2)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _attend(q, k, v, pool: Cache, slots, kv_lens, block_tables, cu_q_lens, num_seqs, *, attn_impl: str,
            dense_prefill_len: Optional[int], sm_scale: float):
    """Writes this step's K/V into the pool, then attends: (attn [T, H, hd], pool). Under tensor
    parallelism this runs inside shard_map, on one device's heads and pool shard."""
    T, H, hd = q.shape
    KVH = k.shape[1]
    new_k, new_v = k, v  # an int8 pool quantizes the float rows itself; a float pool stores them in its dtype
    if "k_scale" not in pool:
        new_k, new_v = k.astype(pool["k"].dtype), v.astype(pool["v"].dtype)
    pool = cache_from_carry(update_kv_cache(pool["k"], pool["v"], new_k, new_v, slots, impl=attn_impl,
                                            **_scale_kwargs(pool)))
    if dense_prefill_len is None:
        attn = ragged_paged_attention(q, pool["k"], pool["v"], kv_lens, block_tables, cu_q_lens, num_seqs,
                                      sm_scale=sm_scale, impl=attn_impl, **_scale_kwargs(pool))
    else:
        # Fresh prompts only (no cached prefix), each padded to dense_prefill_len: attend over the new K/V
        # directly with flash attention; nothing is read back from the pages.
        B = T // dense_prefill_len
        q_lens = cu_q_lens[1:B + 1] - cu_q_lens[:B]
        attn = flash_attention(
            q.reshape(B, dense_prefill_len, H, hd), k.reshape(B, dense_prefill_len, KVH, hd),
            v.reshape(B, dense_prefill_len, KVH, hd), q_lens, q_lens, causal=True, sm_scale=sm_scale,
            impl=attn_impl).reshape(T, H, hd)
    return attn, pool


def _sharded_attend(ks, q, k, v, pool: Cache, *replicated, **kw):
    """_attend inside shard_map: q split by ks.query_heads_axis, new K/V and the pool by KV heads, the
    step's metadata (slots, lengths, block tables) whole on every device."""
    q_spec = ks.spec(("tokens", ks.query_heads_axis, "head_dim"), q.shape)
    kv_spec = ks.spec(("tokens", "kv_heads", "head_dim"), k.shape)
    pool_specs = {key: ks.spec(CACHE_AXES if a.ndim == 4 else CACHE_SCALE_AXES, a.shape) for key, a in pool.items()}
    fn = jax.shard_map(functools.partial(_attend, **kw), mesh=ks.mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, pool_specs) + (P(),) * len(replicated),
                       out_specs=(q_spec, pool_specs), check_vma=False)
    return fn(q, k, v, pool, *replicated)


def _project(x, w, axes: tuple, ks, rows=None):
    """x @ w (model.quantize.dense; rows: x's real rows, see there). A quantized weight on a TP mesh runs its
    kernel inside shard_map on the local block: output columns (column-parallel), or input rows and a psum
    (row-parallel)."""
    if ks is None or not isinstance(w, QuantizedWeight):
        return dense(x, w, rows=rows)
    w_spec = ks.quantized_weight_spec(w, axes)
    in_axis, out_axis = w_spec.values
    lead = (None,) * (x.ndim - 1)

    def local(x, w):
        # Static sizes of the local block: the arrays arrive split, the dataclass fields still say global.
        w = dataclasses.replace(w, in_features=w.in_features // ks.parts(in_axis),
                                out_features=w.out_features // ks.parts(out_axis))
        y = dense(x, w)
        return y if in_axis is None else jax.lax.psum(y, in_axis)

    return jax.shard_map(local, mesh=ks.mesh, in_specs=(P(*lead, in_axis), w_spec), out_specs=P(*lead, out_axis),
                         check_vma=False)(x, w)


def _layer(cfg: LlamaConfig, inputs: StepInputs, attn_impl: str, dense_prefill_len: Optional[int],
           num_pages: int, carry, layer_and_params):
    """carry = (x, *cache_carry(cache)): (x, k, v) for a float pool, (x, k, v, k_scale, v_scale) for int8."""
    x, *pool = carry
    pool = cache_from_carry(pool)
    layer_idx, p = layer_and_params
    ks = kernel_sharding(cfg, pool["k"], p["attn_norm"])  # None without tensor parallelism
    T = x.shape[0]
    H, KVH, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    axes = PARAM_AXES["layers"]
    # The step's real tokens; the rest pad it to its compiled shape (a decode of one sequence runs 8 rows).
    num_tokens = inputs.cu_q_lens[inputs.num_seqs[0]]
    proj = lambda h, name: _project(h, p[name], axes[name][1:], ks, num_tokens)  # noqa: E731

    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q, k, v = proj(h, "wq"), proj(h, "wk"), proj(h, "wv")
    if cfg.attention_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q, k, v = q.reshape(T, H, hd), k.reshape(T, KVH, hd), v.reshape(T, KVH, hd)
    cos, sin = rope_tables(cfg, inputs.positions)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # This layer's pages live at offset layer_idx * num_pages of the shared pool.
    page_size = pool["k"].shape[2]
    slots = jnp.where(inputs.slot_mapping >= 0, inputs.slot_mapping + layer_idx * num_pages * page_size, -1)
    step = (slots, inputs.kv_lens, inputs.block_tables + layer_idx * num_pages, inputs.cu_q_lens, inputs.num_seqs)
    kw = dict(attn_impl=attn_impl, dense_prefill_len=dense_prefill_len, sm_scale=1.0 / float(np.sqrt(hd)))
    if ks is None:
        attn, pool = _attend(q, k, v, pool, *step, **kw)
    else:
        attn, pool = _sharded_attend(ks, q, k, v, pool, *step, **kw)
    x = x + proj(attn.reshape(T, H * hd), "wo").astype(x.dtype)

    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate, up = proj(h, "w_gate"), proj(h, "w_up")
    x = x + proj(jax.nn.silu(gate) * up, "w_down").astype(x.dtype)
    return (x, *cache_carry(pool)), None


def _placement_mesh(*arrays):
    """The mesh of the first of `arrays` that sits on one (under jit: its abstract mesh), or None."""
    for a in arrays:
        mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
        if mesh is not None and tuple(mesh.axis_names):
            return mesh
    return None


def kernel_sharding(cfg: LlamaConfig, *arrays):
    """sharding.rules.KernelSharding when `arrays` (the KV pool, the embedding) sit on a tensor-parallel
    mesh, else None."""
    mesh = _placement_mesh(*arrays)
    if mesh is None:
        return None
    # The partition table lives in sharding/rules.py (the one place of truth); only that module builds
    # the meshes this finds, so it is loaded only once such a mesh exists.
    from sharding.rules import kernel_sharding as rules_kernel_sharding

    return rules_kernel_sharding(cfg, mesh)


def hidden_states(params: Params, cache: Cache, inputs: StepInputs, cfg: LlamaConfig, *,
                  attn_impl: str = "auto", dense_prefill_len: Optional[int] = None,
                  num_layers: Optional[int] = None):
    """Final-norm hidden states [T, d] and the updated cache.

    num_layers: run only the first num_layers layers (default all), then the final norm: a layer-truncated
    draft model. The cache must then be a pool of num_layers layers (init_cache of a config with that many).
    """
    depth = cfg.num_layers if num_layers is None else num_layers
    if not 1 <= depth <= cfg.num_layers:
        raise ValueError(f"num_layers={depth} must be in 1..{cfg.num_layers} (the model's layers)")
    num_pages = cache["k"].shape[1] // depth
    x = jnp.take(params["embed"], inputs.tokens, axis=0)
    body = functools.partial(_layer, cfg, inputs, attn_impl, dense_prefill_len, num_pages)
    carry = (x, *cache_carry(cache))
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        # Unstacked layers (see unstack_layers): a Python loop, each layer's weights used where they lie.
        for i, layer_params in enumerate(layers[:depth]):
            carry, _ = body(carry, (i, layer_params))
    else:
        # The stacked weights ride into the loop whole and each layer is indexed inside it; quantized ones
        # stay unsliced (StackedLayer) where the matmul can read a layer in place (no tensor parallelism).
        in_place = kernel_sharding(cfg, cache["k"], layers["attn_norm"]) is None

        def layer_of(a, i):
            if not isinstance(a, QuantizedWeight):
                return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)
            return StackedLayer(a, i) if in_place else StackedLayer(a, i).sliced()

        def layer_body(carry, i):
            p = jax.tree.map(lambda a: layer_of(a, i), layers, is_leaf=lambda a: isinstance(a, QuantizedWeight))
            return body(carry, (i, p))

        carry, _ = jax.lax.scan(layer_body, carry, jnp.arange(depth, dtype=jnp.int32))
    x, *pool = carry
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cache_from_carry(pool)


def unstack_layers(params: Params) -> Params:
    """params with "layers" as a list of per-layer dicts instead of arrays stacked on a leading axis.

    `lax.scan` over stacked weights compiles one layer body (fast compiles), but XLA:CPU copies each
    layer's weight slices out of the stacked arrays before the matmuls, tripling the weight bytes a
    memory-bound decode step moves. Unstacked layers are unrolled (longer compiles) and read in place.
    Works for QuantizedWeight leaves too (their array fields are sliced)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers)]}


def logits_from_hidden(params: Params, h: jax.Array, cfg: LlamaConfig, rows: Optional[jax.Array] = None) -> jax.Array:
    """h [N, d] -> float32 logits [N, vocab].

    A tied model multiplies by its embedding, unless model.quantize.quantize_params gave it a quantized
    "lm_head" copy (then that, like an untied head, through the quantized matmul). rows: how many leading
    rows of h are real (a quantized head may skip the rest; their logits are then zero)."""
    if cfg.tie_word_embeddings and "lm_head" not in params:
        return jnp.einsum("nd,vd->nv", h, params["embed"], preferred_element_type=jnp.float32)
    ks = kernel_sharding(cfg, params["embed"])
    return _project(h, params["lm_head"], PARAM_AXES["lm_head"], ks, rows).astype(jnp.float32)


def forward(params: Params, cache: Cache, inputs: StepInputs, cfg: LlamaConfig, *,
            attn_impl: str = "auto", dense_prefill_len: Optional[int] = None, num_layers: Optional[int] = None,
            logits_rows: Optional[jax.Array] = None):
    """Returns (float32 logits [N, vocab] at inputs.logits_indices, updated cache). num_layers: see hidden_states.
    logits_rows: an upper bound on the real rows of logits_indices, which come first (the rest pad the step;
    their logits may come out zero)."""
    h, cache = hidden_states(params, cache, inputs, cfg, attn_impl=attn_impl, dense_prefill_len=dense_prefill_len,
                             num_layers=num_layers)
    return logits_from_hidden(params, h[inputs.logits_indices], cfg, rows=logits_rows), cache


@functools.lru_cache(maxsize=None)
def make_step_fn(cfg: LlamaConfig, attn_impl: str = "auto", dense_prefill_len: Optional[int] = None):
    """Jitted forward with the cache donated (updated in place)."""
    fn = functools.partial(forward, cfg=cfg, attn_impl=attn_impl, dense_prefill_len=dense_prefill_len)
    return jax.jit(fn, donate_argnums=(1,))
