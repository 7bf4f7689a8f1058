import pytest

from kvdrive.errors import KvdriveError
from kvdrive.storage.policy import LRUPolicy, make_policy


def test_lru_order_touch_and_filter():
    p = LRUPolicy()
    p.insert("abcd")
    p.touch(["a"])
    assert p.victims(2) == ["b", "c"]
    assert p.victims(2, can_evict=lambda k: k != "b") == ["c", "d"]
    p.remove(["c"])
    assert len(p) == 3 and "c" not in p
    assert p.victims(10) == ["b", "d", "a"]


def test_registry():
    assert isinstance(make_policy("lru"), LRUPolicy)
    with pytest.raises(KvdriveError, match="lru"):
        make_policy("nope")
