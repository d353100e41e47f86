"""pipeline/lru.py: the bounded least-recently-used map behind the prompt, rewrite and reference caches."""

from __future__ import annotations

import threading

from pipeline.lru import LRU


def test_the_least_recently_used_go_first_and_the_size_stays_within_the_capacity():
    cache: LRU[str, bytes] = LRU(10, len)
    assert cache.put("a", b"xxxx") and cache.put("b", b"yyyy")
    assert cache.get("a") == b"xxxx"  # a is now the most recent: b goes first
    assert cache.put("c", b"zzzz")
    assert cache.get("b") is None and cache.get("a") == b"xxxx" and cache.get("c") == b"zzzz"
    assert (cache.size, len(cache), cache.hits, cache.misses) == (8, 2, 3, 1)
    assert cache.put("a", b"x")  # replacing counts the new size only
    assert cache.size == 5


def test_a_value_larger_than_the_capacity_is_not_kept_and_evicts_nothing():
    cache: LRU[str, bytes] = LRU(4, len)
    cache.put("small", b"ab")
    assert not cache.put("big", b"abcde")
    assert cache.get("big") is None and cache.get("small") == b"ab"


def test_counting_entries_and_dropping_some():
    cache: LRU[tuple[str, int], int] = LRU(3)  # capacity in entries
    for index in range(5):
        cache.put(("m", index), index)
    assert len(cache) == 3 and cache.get(("m", 1)) is None
    cache.put(("other", 0), 0)
    cache.drop(lambda key: key[0] == "m")
    assert len(cache) == 1 and cache.size == 1 and cache.get(("other", 0)) == 0


def test_threads_filling_it_together_keep_the_books_straight():
    cache: LRU[int, bytes] = LRU(1000, len)

    def fill(offset: int) -> None:
        for index in range(2000):
            cache.put(offset + index, b"0123456789")
            cache.get(offset + index // 2)

    threads = [threading.Thread(target=fill, args=(n * 10_000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.size == 10 * len(cache) <= 1000
    assert cache.hits + cache.misses == 4 * 2000
