"""Paged KV cache bookkeeping on the host: page budget helpers, block allocator and prefix cache.

The device cache is `{"k": [KVH, L * num_pages, page_size, hd], "v": same}`, plus float32 `"k_scale"` /
`"v_scale"` `[KVH, L * num_pages, page_size]` for an int8 pool; the scheduler's page p of layer l is physical
page `l * num_pages + p` (docs/DESIGN.md). This module only decides *which* page ids a sequence uses; it
never touches device memory.

Prefix caching (vLLM's "automatic prefix caching"): every FULL page is identified by a chain hash of the
whole token prefix up to and including that page, `sha256(parent_page_hash || page_tokens)`, rooted at a
random per-allocator value. Two requests whose prompts share the first k*page_size tokens therefore map to
the same k physical pages. A hash is only a lookup key, never trusted alone: a hit also compares the page's
tokens and its parent page's registration, so even a colliding hash (accidental or crafted) can only miss,
never serve another prompt's KV. A page whose reference count drops to 0 keeps its KV and hash in an LRU of
evictable pages; a later prefix hit revives it, and `allocate()` evicts the least recently freed one only when
no clean page is left.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import secrets
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np

HashFn = Callable[[bytes, Sequence[int]], bytes]


def hash_page_tokens(parent_hash: bytes, tokens: Sequence[int]) -> bytes:
    """Chain hash of one full page: it depends on every earlier token through `parent_hash`."""
    return hashlib.sha256(parent_hash + np.asarray(tokens, np.int64).tobytes()).digest()


class _CachedPage(NamedTuple):
    """What a registered page holds, checked on every hit (the hash alone is only a lookup key)."""
    prefix_hash: bytes
    parent: int          # registration id of the page before it; _ROOT for a sequence's first page
    tokens: tuple        # the page's own tokens
    registration: int    # unique per registration: a re-registered page never inherits stale children


_ROOT = -1


# ---------------------------------------------------------------------------------------------------------
# Memory budget -> number of pages
# ---------------------------------------------------------------------------------------------------------

def _dtype_bytes(kv_dtype_bytes) -> int:
    # Accept an int (2 for bf16) or anything numpy understands as a dtype ("bfloat16" needs ml_dtypes).
    if isinstance(kv_dtype_bytes, (int, np.integer)) and not isinstance(kv_dtype_bytes, bool):
        return int(kv_dtype_bytes)
    return int(np.dtype(kv_dtype_bytes).itemsize)


def kv_bytes_per_page(config, page_size: int, kv_dtype_bytes) -> int:
    """Bytes of one page across all layers, K and V: 2 * L * KVH * page_size * hd * dtype_bytes."""
    if page_size <= 0:
        raise ValueError(f"page_size={page_size} must be > 0")
    nbytes = _dtype_bytes(kv_dtype_bytes)
    if nbytes <= 0:
        raise ValueError(f"kv_dtype_bytes={kv_dtype_bytes!r} must be > 0")
    return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim * nbytes


def pages_for_memory_budget(config, page_size: int, kv_dtype_bytes, budget_bytes: int) -> int:
    """How many pages fit in `budget_bytes`; ValueError if not even one does."""
    per_page = kv_bytes_per_page(config, page_size, kv_dtype_bytes)
    num_pages = int(budget_bytes // per_page) if budget_bytes > 0 else 0
    if num_pages < 1:
        raise ValueError(
            f"KV cache budget of {int(budget_bytes)} bytes ({budget_bytes / 2**20:.2f} MiB) holds no page: one page "
            f"needs {per_page} bytes (2 * num_layers={config.num_layers} * num_kv_heads={config.num_kv_heads} * "
            f"page_size={page_size} * head_dim={config.head_dim} * kv_dtype_bytes={_dtype_bytes(kv_dtype_bytes)})")
    return num_pages


def device_memory(device=None) -> Optional[tuple[int, int]]:
    """(bytes_limit, bytes_in_use) of a JAX device, or None where the backend reports no stats (CPU)."""
    import jax  # local: the rest of this module is pure host code

    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))


# ---------------------------------------------------------------------------------------------------------
# Block allocator with prefix cache
# ---------------------------------------------------------------------------------------------------------

class OutOfPagesError(RuntimeError):
    """allocate() found neither a free nor an evictable page."""


@dataclasses.dataclass
class AllocatorStats:
    pages_allocated: int = 0       # allocate() calls that returned a page
    prefix_hits: int = 0           # cached pages reused instead of recomputed
    prefix_tokens_saved: int = 0   # prefix_hits * page_size
    prefix_query_tokens: int = 0   # tokens looked up in the cache (denominator of the hit rate)
    evictions: int = 0             # cached pages whose hash was dropped to reuse the page

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_tokens_saved / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


class BlockAllocator:
    """Reference-counted page pool.

    A page is in exactly one of three states:
      in use     ref_count > 0 (maybe also cached, i.e. has a prefix hash, shared by several sequences)
      evictable  ref_count == 0 but cached: still holds valid KV; in `_evictable` (LRU order)
      free       ref_count == 0, no hash; in `_free`
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 hash_fn: HashFn = hash_page_tokens):
        if num_pages <= 0:
            raise ValueError(f"num_pages={num_pages} must be > 0")
        if page_size <= 0:
            raise ValueError(f"page_size={page_size} must be > 0")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._free: collections.deque[int] = collections.deque(range(self.num_pages))
        self._ref = [0] * self.num_pages
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest first
        self._hash_to_page: dict[bytes, int] = {}
        self._cached: dict[int, _CachedPage] = {}
        self._registrations = itertools.count()
        # Chain hashes start from a secret per-allocator root, so nobody can precompute colliding prompts.
        self.root_hash = secrets.token_bytes(32)
        self.hash_fn = hash_fn
        self.stats = AllocatorStats()

    # ----- state -------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages allocate() can hand out: clean free pages plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages that currently hold a registered full-page prefix (in use or evictable)."""
        return len(self._cached)

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def is_cached(self, page: int) -> bool:
        return page in self._cached

    # ----- allocation ----------------------------------------------------------------------------------------
    def allocate(self) -> int:
        """One page with ref_count 1. Prefers clean pages; otherwise evicts the least recently freed cached one."""
        if self._free:
            page = self._free.popleft()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)
            del self._hash_to_page[self._cached.pop(page).prefix_hash]
            self.stats.evictions += 1
        else:
            raise OutOfPagesError(f"all {self.num_pages} KV pages are in use")
        self._ref[page] = 1
        self.stats.pages_allocated += 1
        return page

    def allocate_many(self, n: int) -> list[int]:
        """`n` pages or none at all (OutOfPagesError), so callers never hold a half-done allocation."""
        if n > self.num_free:
            raise OutOfPagesError(f"need {n} KV pages but only {self.num_free} of {self.num_pages} are free")
        return [self.allocate() for _ in range(n)]

    def free(self, page: int) -> None:
        """Drop one reference. At 0 a cached page becomes evictable (newest in the LRU), others become free."""
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} out of range [0, {self.num_pages})")
        if self._ref[page] <= 0:
            raise ValueError(f"double free of page {page}")
        self._ref[page] -= 1
        if self._ref[page] == 0:
            if page in self._cached:
                self._evictable[page] = None
            else:
                self._free.append(page)

    def free_all(self, pages: Iterable[int]) -> None:
        """Free a block table. Callers pass it tail first, so a sequence's last pages are evicted first
        and its (more shareable) leading prefix pages survive longest."""
        for page in pages:
            self.free(page)

    # ----- prefix cache --------------------------------------------------------------------------------------
    def page_hashes(self, token_ids: Sequence[int], num_pages: Optional[int] = None,
                    first: int = 0, parent_hash: Optional[bytes] = None) -> list[bytes]:
        """Chain hashes of full pages `first..num_pages-1` of token_ids; `parent_hash` is page first-1's."""
        full = len(token_ids) // self.page_size
        num_pages = full if num_pages is None else min(num_pages, full)
        hashes, parent_hash = [], self.root_hash if first == 0 else parent_hash
        for i in range(first, num_pages):
            parent_hash = self.hash_fn(parent_hash, token_ids[i * self.page_size:(i + 1) * self.page_size])
            hashes.append(parent_hash)
        return hashes

    def _page_tokens(self, token_ids: Sequence[int], i: int) -> tuple:
        return tuple(int(t) for t in token_ids[i * self.page_size:(i + 1) * self.page_size])

    def lookup_prefix(self, hashes: Sequence[bytes], token_ids: Sequence[int]) -> list[int]:
        """Pages of the longest cached run of `hashes` (chain hashes of token_ids' pages from page 0).

        Each hit must also hold the same tokens and follow the page matched before it; a mismatch (a hash
        collision) ends the run there. No side effects.
        """
        if not self.enable_prefix_caching:
            return []
        pages, parent = [], _ROOT
        for i, h in enumerate(hashes):
            page = self._hash_to_page.get(h)
            if page is None:
                break
            entry = self._cached[page]
            if entry.parent != parent or entry.tokens != self._page_tokens(token_ids, i):
                break
            pages.append(page)
            parent = entry.registration
        return pages

    def num_revived(self, pages: Iterable[int]) -> int:
        """How many of these cached pages are evictable, i.e. would leave the free pool when acquired."""
        return sum(1 for p in pages if self._ref[p] == 0)

    def acquire_cached(self, pages: Sequence[int], num_query_tokens: int = 0) -> None:
        """Take a reference on pages returned by lookup_prefix (reviving evictable ones); counts the hits."""
        for page in pages:
            if page not in self._cached:
                raise ValueError(f"page {page} is not a cached prefix page")
            if self._ref[page] == 0:
                del self._evictable[page]
            self._ref[page] += 1
        self.stats.prefix_hits += len(pages)
        self.stats.prefix_tokens_saved += len(pages) * self.page_size
        self.stats.prefix_query_tokens += num_query_tokens

    def register_full_page(self, page: int, prefix_hash: bytes, parent_hash: bytes, tokens: Sequence[int]) -> bool:
        """Record that in-use `page` now holds the full page `tokens`, whose chain hash is `prefix_hash` and
        whose parent page's chain hash is `parent_hash` (`root_hash` for a sequence's first page).

        Returns False (no-op) when caching is off, the page is already registered, another page already
        holds this prefix (two sequences computed it in the same step: the duplicate simply stays private),
        or the parent page is no longer cached (the page could not be verified on a later hit).
        """
        if not self.enable_prefix_caching or page in self._cached or prefix_hash in self._hash_to_page:
            return False
        if self._ref[page] <= 0:
            raise ValueError(f"register_full_page of page {page} which is not in use")
        if parent_hash == self.root_hash:
            parent = _ROOT
        elif parent_hash in self._hash_to_page:
            parent = self._cached[self._hash_to_page[parent_hash]].registration
        else:
            return False
        self._hash_to_page[prefix_hash] = page
        self._cached[page] = _CachedPage(prefix_hash, parent, tuple(int(t) for t in tokens),
                                         next(self._registrations))
        return True

    def __repr__(self) -> str:
        return (f"BlockAllocator(num_pages={self.num_pages}, page_size={self.page_size}, free={len(self._free)}, "
                f"evictable={len(self._evictable)}, cached={self.num_cached})")
