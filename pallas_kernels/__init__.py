"""Attention and KV-cache kernels: Pallas GPU kernels beside pure-jnp reference and XLA paths.

Every public wrapper takes ``impl`` ("auto" | "reference" | "xla" | "pallas" | "pallas_interpret");
see ``pallas_kernels.backend`` for how "auto" and the Pallas GPU lowering are chosen.
"""

from pallas_kernels.backend import IMPLS, LOWERINGS, resolve_impl, resolve_lowering
from pallas_kernels.flash_attention import FlashAttentionBlockSizes, flash_attention, flash_attention_reference
from pallas_kernels.kv_cache_update import KVCacheUpdateBlockSizes, update_kv_cache, update_kv_cache_reference
from pallas_kernels.ragged_paged_attention import (
    RaggedPagedAttentionBlockSizes,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

__all__ = [
    "IMPLS",
    "LOWERINGS",
    "resolve_impl",
    "resolve_lowering",
    "FlashAttentionBlockSizes",
    "flash_attention",
    "flash_attention_reference",
    "KVCacheUpdateBlockSizes",
    "update_kv_cache",
    "update_kv_cache_reference",
    "RaggedPagedAttentionBlockSizes",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
