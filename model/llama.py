"""Pure-functional Llama-family model: params and KV cache are pytrees, `forward` is a pure function.

One forward serves every kind of step: tokens of several sequences are concatenated (a ragged batch,
see docs/DESIGN.md), each sequence attends to its own paged KV. Layers are stacked and run with
`lax.scan`, which keeps compile time flat in the layer count; the KV cache is one page pool shared by all
layers (layer l's page p is physical page l * num_pages + p) and is carried through the scan and updated
in place.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from model.config import LlamaConfig
from model.quantize import dense
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


def init_cache(cfg: LlamaConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> Cache:
    """Empty paged KV pool: `num_pages` pages per layer, all layers in one array.

    dtype int8 gives a quantized pool: int8 "k"/"v" plus float32 "k_scale"/"v_scale"
    [KVH, L * num_pages, page_size], one absmax scale per token per KV head (pallas_kernels.kv_cache_update).
    """
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"{num_pages=} and {page_size=} must be >= 1")
    dtype = jnp.dtype(dtype)
    if not (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.int8):
        raise ValueError(f"kv cache dtype={dtype} must be a float type or int8")
    shape = (cfg.num_kv_heads, cfg.num_layers * num_pages, page_size, cfg.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if dtype == jnp.int8:
        cache["k_scale"] = jnp.zeros(shape[:3], jnp.float32)
        cache["v_scale"] = jnp.zeros(shape[:3], jnp.float32)
    return cache


def kv_bytes_per_token_elem(head_dim: int, dtype) -> float:
    """Bytes one K (or V) element costs in the pool, counting an int8 page's per-token scale."""
    dtype = jnp.dtype(dtype)
    return 1.0 + 4.0 / head_dim if dtype == jnp.int8 else float(dtype.itemsize)


def cache_bytes_per_page(cfg: LlamaConfig, page_size: int, dtype) -> int:
    """Bytes of one page across all layers, K and V (and their scales). dtype: a dtype or its byte size."""
    if isinstance(dtype, (int, np.integer)):  # a byte size: a float pool of that width
        return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * int(dtype)
    per_elem = kv_bytes_per_token_elem(cfg.head_dim, dtype)
    return int(round(2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * per_elem))


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


def _layer(cfg: LlamaConfig, inputs: StepInputs, attn_impl: str, dense_prefill_len: Optional[int],
           num_pages: int, carry, layer_and_params):
    """carry = (x, *cache_carry(cache)): (x, k, v) for a float pool, (x, k, v, k_scale, v_scale) for int8."""
    x, *pool = carry
    pool = cache_from_carry(pool)
    layer_idx, p = layer_and_params
    T = x.shape[0]
    H, KVH, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q, k, v = dense(h, p["wq"]), dense(h, p["wk"]), dense(h, p["wv"])
    if cfg.attention_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q, k, v = q.reshape(T, H, hd), k.reshape(T, KVH, hd), v.reshape(T, KVH, hd)
    cos, sin = rope_tables(cfg, inputs.positions)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # This layer's pages live at offset layer_idx * num_pages of the shared pool.
    page_size = pool["k"].shape[2]
    slots = jnp.where(inputs.slot_mapping >= 0, inputs.slot_mapping + layer_idx * num_pages * page_size, -1)
    new_k, new_v = k, v  # an int8 pool quantizes the float rows itself; a float pool stores them in its dtype
    if "k_scale" not in pool:
        new_k, new_v = k.astype(pool["k"].dtype), v.astype(pool["v"].dtype)
    pool = cache_from_carry(update_kv_cache(pool["k"], pool["v"], new_k, new_v, slots, impl=attn_impl,
                                            **_scale_kwargs(pool)))
    sm_scale = 1.0 / float(np.sqrt(hd))
    if dense_prefill_len is None:
        attn = ragged_paged_attention(
            q, pool["k"], pool["v"], inputs.kv_lens, inputs.block_tables + layer_idx * num_pages,
            inputs.cu_q_lens, inputs.num_seqs, sm_scale=sm_scale, impl=attn_impl, **_scale_kwargs(pool))
    else:
        # Fresh prompts only (no cached prefix), each padded to dense_prefill_len: attend over the new K/V
        # directly with flash attention; nothing is read back from the pages.
        B = T // dense_prefill_len
        q_lens = inputs.cu_q_lens[1:B + 1] - inputs.cu_q_lens[:B]
        attn = flash_attention(
            q.reshape(B, dense_prefill_len, H, hd), k.reshape(B, dense_prefill_len, KVH, hd),
            v.reshape(B, dense_prefill_len, KVH, hd), q_lens, q_lens, causal=True, sm_scale=sm_scale,
            impl=attn_impl).reshape(T, H, hd)
    x = x + dense(attn.reshape(T, H * hd), p["wo"]).astype(x.dtype)

    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate, up = dense(h, p["w_gate"]), dense(h, p["w_up"])
    x = x + dense(jax.nn.silu(gate) * up, p["w_down"]).astype(x.dtype)
    return (x, *cache_carry(pool)), None


def hidden_states(params: Params, cache: Cache, inputs: StepInputs, cfg: LlamaConfig, *,
                  attn_impl: str = "auto", dense_prefill_len: Optional[int] = None):
    """Final-norm hidden states [T, d] and the updated cache."""
    num_pages = cache["k"].shape[1] // cfg.num_layers
    x = jnp.take(params["embed"], inputs.tokens, axis=0)
    body = functools.partial(_layer, cfg, inputs, attn_impl, dense_prefill_len, num_pages)
    carry = (x, *cache_carry(cache))
    if isinstance(params["layers"], (list, tuple)):
        # Unstacked layers (see unstack_layers): a Python loop, each layer's weights used where they lie.
        for i, layer_params in enumerate(params["layers"]):
            carry, _ = body(carry, (i, layer_params))
    else:
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        carry, _ = jax.lax.scan(body, carry, (layer_ids, params["layers"]))
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


def logits_from_hidden(params: Params, h: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """h [N, d] -> float32 logits [N, vocab]."""
    if cfg.tie_word_embeddings:
        return jnp.einsum("nd,vd->nv", h, params["embed"], preferred_element_type=jnp.float32)
    return dense(h, params["lm_head"]).astype(jnp.float32)


def forward(params: Params, cache: Cache, inputs: StepInputs, cfg: LlamaConfig, *,
            attn_impl: str = "auto", dense_prefill_len: Optional[int] = None):
    """Returns (float32 logits [N, vocab] at inputs.logits_indices, updated cache)."""
    h, cache = hidden_states(params, cache, inputs, cfg, attn_impl=attn_impl, dense_prefill_len=dense_prefill_len)
    return logits_from_hidden(params, h[inputs.logits_indices], cfg), cache


@functools.lru_cache(maxsize=None)
def make_step_fn(cfg: LlamaConfig, attn_impl: str = "auto", dense_prefill_len: Optional[int] = None):
    """Jitted forward with the cache donated (updated in place)."""
    fn = functools.partial(forward, cfg=cfg, attn_impl=attn_impl, dense_prefill_len=dense_prefill_len)
    return jax.jit(fn, donate_argnums=(1,))
