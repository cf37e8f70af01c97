import numpy as np
import pytest

from inference.kv_pool import (
    BlockAllocator,
    OutOfPagesError,
    hash_page_tokens,
    kv_bytes_per_page,
    page_hashes,
    pages_for_memory_budget,
    pages_for_utilization,
)
from model.config import PRESETS

TINY = PRESETS["tiny"]  # 2 layers, 2 kv heads, head_dim 16


def _fill(alloc, tokens):
    """Simulate a sequence that computed `tokens`: allocate its pages and register the full ones."""
    ps = alloc.page_size
    pages = [alloc.allocate() for _ in range(-(-len(tokens) // ps))]
    for page, h in zip(pages, page_hashes(tokens, ps)):
        alloc.register_full_page(page, h)
    return pages


# ----- memory budget ---------------------------------------------------------------------------------------

def test_bytes_per_page_formula():
    assert kv_bytes_per_page(TINY, 16, 2) == 2 * 2 * 2 * 16 * 16 * 2
    assert kv_bytes_per_page(TINY, 16, np.float32) == 2 * 2 * 2 * 16 * 16 * 4


def test_pages_for_memory_budget():
    per_page = kv_bytes_per_page(TINY, 16, 2)
    assert pages_for_memory_budget(TINY, 16, 2, per_page * 10) == 10
    assert pages_for_memory_budget(TINY, 16, 2, per_page * 10 + per_page - 1) == 10
    with pytest.raises(ValueError, match=rf"{per_page - 1} bytes.*num_layers=2.*page_size=16"):
        pages_for_memory_budget(TINY, 16, 2, per_page - 1)


def test_pages_for_utilization():
    per_page = kv_bytes_per_page(TINY, 16, 2)
    total = 1000 * per_page
    assert pages_for_utilization(TINY, 16, 2, 0.5, total, 100 * per_page) == 400
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.1 .*bytes_in_use="):
        pages_for_utilization(TINY, 16, 2, 0.1, total, 100 * per_page)
    with pytest.raises(ValueError, match="gpu_memory_utilization=1.5"):
        pages_for_utilization(TINY, 16, 2, 1.5, total, 0)


# ----- refcounts / free list ---------------------------------------------------------------------------------

def test_allocate_free_refcounts():
    alloc = BlockAllocator(4, page_size=2)
    pages = [alloc.allocate() for _ in range(4)]
    assert sorted(pages) == [0, 1, 2, 3]
    assert alloc.num_free == 0 and alloc.num_used == 4
    with pytest.raises(OutOfPagesError):
        alloc.allocate()
    alloc.incref(pages[0])
    assert alloc.ref_count(pages[0]) == 2
    alloc.free(pages[0])
    assert alloc.num_free == 0  # still referenced once
    alloc.free(pages[0])
    assert alloc.num_free == 1 and alloc.ref_count(pages[0]) == 0
    with pytest.raises(ValueError, match="double free"):
        alloc.free(pages[0])
    assert alloc.stats.pages_allocated == 4


def test_allocate_many_is_all_or_nothing():
    alloc = BlockAllocator(3, page_size=2)
    alloc.allocate()
    with pytest.raises(OutOfPagesError, match="need 3"):
        alloc.allocate_many(3)
    assert alloc.num_free == 2
    assert len(alloc.allocate_many(2)) == 2


# ----- prefix cache --------------------------------------------------------------------------------------------

def test_chain_hash_depends_on_all_earlier_tokens():
    a = page_hashes([1, 2, 3, 4, 5, 6], 2)
    b = page_hashes([9, 2, 3, 4, 5, 6], 2)
    assert len(a) == 3
    # Same tokens in pages 1 and 2, but a different earlier token: every hash differs.
    assert all(x != y for x, y in zip(a, b))
    assert a[1] == hash_page_tokens(a[0], [3, 4])
    assert page_hashes([1, 2, 3], 2) == a[:1]  # only full pages are hashed


def test_same_prefix_maps_to_same_pages():
    alloc = BlockAllocator(16, page_size=4)
    prompt = list(range(100, 113))          # 13 tokens: 3 full pages + 1
    pages = _fill(alloc, prompt)
    other = prompt[:12] + [7, 8, 9]          # same first 12 tokens
    hit = alloc.match_prefix(other)
    assert hit == pages[:3]
    assert all(alloc.ref_count(p) == 2 for p in hit)
    assert alloc.stats.prefix_hits == 3 and alloc.stats.prefix_tokens_saved == 12

    diverged = [0] + prompt[1:]              # a different first token: nothing matches
    assert alloc.match_prefix(diverged) == []
    partial = prompt[:4] + [0] + prompt[5:]  # differs in page 1: only page 0 matches
    hit2 = alloc.match_prefix(partial)
    assert hit2 == pages[:1]


def test_match_never_returns_the_last_token_page():
    alloc = BlockAllocator(8, page_size=4)
    prompt = list(range(8))                  # exactly 2 full pages, both cached
    pages = _fill(alloc, prompt)
    assert alloc.match_prefix(prompt) == pages[:1]   # last token's page must be recomputed
    assert alloc.match_prefix(prompt + [99]) == pages


def test_free_cached_page_becomes_evictable_and_revives():
    alloc = BlockAllocator(4, page_size=2)
    prompt = [1, 2, 3, 4, 5]
    pages = _fill(alloc, prompt)             # 3 pages, 2 cached
    for p in reversed(pages):
        alloc.free(p)
    assert alloc.num_free == 4 and alloc.num_evictable == 2 and alloc.num_cached == 2
    hit = alloc.match_prefix(prompt)
    assert hit == pages[:2]
    assert alloc.num_evictable == 0 and alloc.num_free == 2
    assert all(alloc.ref_count(p) == 1 for p in hit)
    assert alloc.stats.evictions == 0


def test_lru_eviction_order():
    alloc = BlockAllocator(3, page_size=1)
    seqs = [[10], [20], [30]]
    pages = []
    for tokens in seqs:
        pages += _fill(alloc, tokens)
    # Free in order 1, 0, 2: page 1 is the least recently freed, so evicted first.
    for i in (1, 0, 2):
        alloc.free(pages[i])
    assert alloc.num_free == 3 and alloc.num_evictable == 3
    assert alloc.allocate() == pages[1]
    assert alloc.stats.evictions == 1
    # The evicted prefix is gone; the others still hit (a trailing token keeps the page matchable).
    assert alloc.match_prefix([20, 0]) == []
    assert alloc.match_prefix([10, 0]) == [pages[0]]
    # Reviving page 0 removes it from the LRU, so page 2 is evicted next.
    assert alloc.allocate() == pages[2]
    with pytest.raises(OutOfPagesError):
        alloc.allocate()
    assert alloc.stats.evictions == 2


def test_clean_pages_are_used_before_evicting():
    alloc = BlockAllocator(3, page_size=1)
    cached = _fill(alloc, [5])[0]
    alloc.free(cached)
    got = {alloc.allocate(), alloc.allocate()}
    assert cached not in got and alloc.stats.evictions == 0


def test_duplicate_registration_and_disabled_cache():
    alloc = BlockAllocator(4, page_size=2)
    h = page_hashes([1, 2], 2)[0]
    a, b = alloc.allocate(), alloc.allocate()
    assert alloc.register_full_page(a, h)
    assert not alloc.register_full_page(b, h)      # same prefix computed twice: keep the first
    alloc.free(b)
    assert alloc.num_evictable == 0                # the duplicate is a plain free page

    off = BlockAllocator(4, page_size=2, enable_prefix_caching=False)
    pages = _fill(off, [1, 2, 3, 4, 5])
    assert off.num_cached == 0
    for p in pages:
        off.free(p)
    assert off.num_evictable == 0 and off.match_prefix([1, 2, 3, 4, 5]) == []


def test_reset_prefix_cache():
    alloc = BlockAllocator(4, page_size=2)
    for p in _fill(alloc, [1, 2, 3, 4, 5]):
        alloc.free(p)
    alloc.reset_prefix_cache()
    assert alloc.num_evictable == 0 and alloc.num_cached == 0 and alloc.num_free == 4
    assert alloc.match_prefix([1, 2, 3, 4, 5]) == []
