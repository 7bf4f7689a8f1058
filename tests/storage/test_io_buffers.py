"""The write ring: contiguous runs handed out first in, first out, freed in any order."""

from kvdrive.storage.io_buffers import Ring


def test_ring_wraps_and_reuses_space_only_behind_the_oldest_live_run():
    r = Ring(10)
    a, b = r.alloc(4), r.alloc(4)
    assert (a, b) == (0, 4) and r.largest() == 2
    assert r.alloc(3) is None  # 2 left at the end, the start is still held by a
    r.free(a)
    assert r.alloc(3) == 0  # wrapped to the front
    assert r.largest() == 1  # [3, 4): b holds [4, 8), and [8, 10) waits until the ring passes it again
    r.free(b)
    assert r.largest() == 7 and r.used == 3


def test_ring_frees_out_of_order_and_empties():
    r = Ring(6)
    runs = [r.alloc(2) for _ in range(3)]
    assert runs == [0, 2, 4] and r.largest() == 0
    r.free(2)  # a younger run first: its space waits for the oldest
    assert r.largest() == 0
    r.free(0)
    assert r.largest() == 4
    r.free(4)
    assert r.used == 0 and r.largest() == 6 and r.alloc(6) == 0
