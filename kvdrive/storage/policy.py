"""Eviction policies: which groups leave a tier when it must make room.

One policy instance tracks the groups resident in one tier (GPU cache or host). The
store calls ``insert`` when a group lands, ``touch`` when it is used (with attention
scores when the caller has them), ``remove`` when it leaves for another reason, and
``victims(n)`` when it needs room. Policies are chosen by name (``make_policy``);
attention-aware ones plug in here without touching the store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence

from kvdrive.errors import KvdriveError


class EvictionPolicy(ABC):
    """Contract: keys are hashable and tracked at most once. ``victims`` does not
    remove what it returns (the store removes a victim once it has really left), and
    returns at most ``n`` keys, fewer only if fewer are tracked and allowed by
    ``can_evict``. ``scores``, if given, align with ``keys`` (higher = more useful).
    All methods run on the engine thread.
    """

    @abstractmethod
    def insert(self, keys: Iterable[Hashable]) -> None: ...

    @abstractmethod
    def touch(self, keys: Iterable[Hashable], scores: Sequence[float] | None = None) -> None: ...

    @abstractmethod
    def remove(self, keys: Iterable[Hashable]) -> None: ...

    @abstractmethod
    def victims(self, n: int, can_evict: Callable[[Hashable], bool] | None = None) -> list[Hashable]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key) -> bool: ...


class LRUPolicy(EvictionPolicy):
    """Least recently inserted-or-touched first; O(1) per key, ``victims`` O(n + skipped)."""

    def __init__(self):
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, keys):
        for k in keys:
            self._order[k] = None
            self._order.move_to_end(k)

    def touch(self, keys, scores=None):
        for k in keys:
            if k in self._order:
                self._order.move_to_end(k)

    def remove(self, keys):
        for k in keys:
            self._order.pop(k, None)

    def victims(self, n, can_evict=None):
        out = []
        for k in self._order:
            if len(out) == n:
                break
            if can_evict is None or can_evict(k):
                out.append(k)
        return out

    def __len__(self):
        return len(self._order)

    def __contains__(self, key):
        return key in self._order


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise KvdriveError(f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}") from None
