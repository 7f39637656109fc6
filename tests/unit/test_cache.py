"""store.cache: message bytes in memory, bounded by bytes and by age."""

from maildetour.store.cache import BytesCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_message_just_put_is_read_back_and_dropped_on_request() -> None:
    cache = BytesCache(100, 2.0, Clock())
    cache.put("Q1", b"x" * 10)
    assert cache.get("Q1") == b"x" * 10
    cache.drop("Q1")
    assert cache.get("Q1") is None and cache.size == 0


def test_the_budget_pushes_out_the_least_recently_used() -> None:
    cache = BytesCache(25, 60.0, Clock())
    for key in ("A", "B"):
        cache.put(key, b"x" * 10)
    assert cache.get("A") is not None  # A is now the most recently used
    cache.put("C", b"x" * 10)
    assert cache.get("B") is None and cache.get("A") is not None and cache.get("C") is not None
    assert cache.size == 20


def test_a_message_bigger_than_the_budget_is_never_kept() -> None:
    cache = BytesCache(25, 60.0, Clock())
    cache.put("A", b"x" * 10)
    cache.put("BIG", b"x" * 26)
    assert cache.get("BIG") is None and cache.get("A") is not None


def test_entries_unused_for_max_age_go_at_the_next_use() -> None:
    clock = Clock()
    cache = BytesCache(1000, 2.0, clock)
    cache.put("OLD", b"x" * 10)
    clock.now = 1.5
    cache.put("NEW", b"y" * 10)
    clock.now = 2.5
    assert cache.get("NEW") == b"y" * 10
    assert cache.get("OLD") is None and len(cache) == 1 and cache.size == 10


def test_a_zero_budget_keeps_nothing() -> None:
    cache = BytesCache(0, 2.0, Clock())
    cache.put("A", b"x")
    assert cache.get("A") is None and len(cache) == 0
