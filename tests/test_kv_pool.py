import numpy as np
import pytest

from inference.kv_pool import (
    BlockAllocator,
    OutOfPagesError,
    hash_page_tokens,
    kv_bytes_per_page,
    pages_for_memory_budget,
)
from model.config import PRESETS

TINY = PRESETS["tiny"]  # 2 layers, 2 kv heads, head_dim 16


def _fill(alloc, tokens):
    """Simulate a sequence that computed `tokens`: allocate its pages and register the full ones."""
    ps = alloc.page_size
    pages = [alloc.allocate() for _ in range(-(-len(tokens) // ps))]
    hashes = alloc.page_hashes(tokens)
    for i, (page, h) in enumerate(zip(pages, hashes)):
        alloc.register_full_page(page, h, hashes[i - 1] if i else alloc.root_hash, tokens[i * ps:(i + 1) * ps])
    return pages


def _match(alloc, tokens):
    """What the scheduler does for a new request: look up every full page but the one holding the last
    token (it must be computed to give logits), then take references on the hits."""
    pages = alloc.lookup_prefix(alloc.page_hashes(tokens, (len(tokens) - 1) // alloc.page_size), tokens)
    alloc.acquire_cached(pages, num_query_tokens=len(tokens))
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


# ----- refcounts / free list ---------------------------------------------------------------------------------

def test_allocate_free_refcounts():
    alloc = BlockAllocator(4, page_size=2)
    pages = [alloc.allocate() for _ in range(4)]
    assert sorted(pages) == [0, 1, 2, 3]
    assert alloc.num_free == 0 and alloc.num_used == 4
    with pytest.raises(OutOfPagesError):
        alloc.allocate()
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
    alloc = BlockAllocator(4, page_size=2)
    a = alloc.page_hashes([1, 2, 3, 4, 5, 6])
    b = alloc.page_hashes([9, 2, 3, 4, 5, 6])
    assert len(a) == 3
    # Same tokens in pages 1 and 2, but a different earlier token: every hash differs.
    assert all(x != y for x, y in zip(a, b))
    assert a[0] == hash_page_tokens(alloc.root_hash, [1, 2]) and a[1] == hash_page_tokens(a[0], [3, 4])
    assert alloc.page_hashes([1, 2, 3]) == a[:1]  # only full pages are hashed
    assert alloc.page_hashes([1, 2, 3, 4, 5, 6], first=2, parent_hash=a[1]) == a[2:]


def test_each_allocator_has_its_own_secret_root():
    a, b = BlockAllocator(4, page_size=2), BlockAllocator(4, page_size=2)
    assert a.root_hash != b.root_hash and len(a.root_hash) >= 16
    assert a.page_hashes([1, 2]) != b.page_hashes([1, 2])


def _colliding_hash(parent, tokens):
    return b"every page has this hash"


def test_forced_hash_collision_never_serves_foreign_kv():
    alloc = BlockAllocator(16, page_size=2, hash_fn=_colliding_hash)
    first = [1, 2, 3, 4, 5]
    pages = _fill(alloc, first)
    assert alloc.num_cached == 1            # one hash for everything: only the first page got registered
    # A different first page with the same hash: the token check refuses it.
    assert _match(alloc, [7, 8, 3, 4, 5]) == []
    # The same first page matches, but page 1's hash leads back to page 0 itself: its parent check refuses it.
    assert _match(alloc, first) == pages[:1]
    assert alloc.stats.prefix_hits == 1


def test_same_tokens_after_a_different_prefix_are_not_served():
    """Page 1 holds the same tokens in both prompts but was computed after a different page 0."""
    def second_page_collides(parent, tokens):   # page 1 of both prompts gets one hash; page 0s differ
        return b"page 1" if tuple(tokens) == (3, 4) else hash_page_tokens(parent, tokens)

    alloc = BlockAllocator(16, page_size=2, hash_fn=second_page_collides)
    _fill(alloc, [1, 2, 3, 4, 0])
    other = [9, 9, 3, 4, 0]
    other_first_page = _fill(alloc, other[:2])[0]
    assert _match(alloc, other) == [other_first_page]


def test_same_prefix_maps_to_same_pages():
    alloc = BlockAllocator(16, page_size=4)
    prompt = list(range(100, 113))          # 13 tokens: 3 full pages + 1
    pages = _fill(alloc, prompt)
    other = prompt[:12] + [7, 8, 9]          # same first 12 tokens
    hit = _match(alloc, other)
    assert hit == pages[:3]
    assert all(alloc.ref_count(p) == 2 for p in hit)
    assert alloc.stats.prefix_hits == 3 and alloc.stats.prefix_tokens_saved == 12

    diverged = [0] + prompt[1:]              # a different first token: nothing matches
    assert _match(alloc, diverged) == []
    partial = prompt[:4] + [0] + prompt[5:]  # differs in page 1: only page 0 matches
    hit2 = _match(alloc, partial)
    assert hit2 == pages[:1]


def test_match_never_returns_the_last_token_page():
    alloc = BlockAllocator(8, page_size=4)
    prompt = list(range(8))                  # exactly 2 full pages, both cached
    pages = _fill(alloc, prompt)
    assert _match(alloc, prompt) == pages[:1]   # last token's page must be recomputed
    assert _match(alloc, prompt + [99]) == pages


def test_free_cached_page_becomes_evictable_and_revives():
    alloc = BlockAllocator(4, page_size=2)
    prompt = [1, 2, 3, 4, 5]
    pages = _fill(alloc, prompt)             # 3 pages, 2 cached
    for p in reversed(pages):
        alloc.free(p)
    assert alloc.num_free == 4 and alloc.num_evictable == 2 and alloc.num_cached == 2
    hit = _match(alloc, prompt)
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
    assert _match(alloc, [20, 0]) == []
    assert _match(alloc, [10, 0]) == [pages[0]]
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
    h = alloc.page_hashes([1, 2])[0]
    a, b = alloc.allocate(), alloc.allocate()
    assert alloc.register_full_page(a, h, alloc.root_hash, [1, 2])
    assert not alloc.register_full_page(b, h, alloc.root_hash, [1, 2])  # computed twice: keep the first
    alloc.free(b)
    assert alloc.num_evictable == 0                # the duplicate is a plain free page

    off = BlockAllocator(4, page_size=2, enable_prefix_caching=False)
    pages = _fill(off, [1, 2, 3, 4, 5])
    assert off.num_cached == 0
    for p in pages:
        off.free(p)
    assert off.num_evictable == 0 and _match(off, [1, 2, 3, 4, 5]) == []
