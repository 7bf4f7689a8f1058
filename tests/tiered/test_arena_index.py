"""``ArenaIndex``, the disk tier's arena bookkeeping, driven directly with numpy (no tensors)."""

import ast
from pathlib import Path

import numpy as np
import pytest
from factories import Done

from kvdrive.errors import CapacityError
from kvdrive.tiered import arena_index
from kvdrive.tiered.arena_index import ArenaIndex


class Pending:
    done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def _index(slots=4, groups=8, seqs=2, layers=1):
    return ArenaIndex(layers, seqs, groups, slots)


def test_the_module_needs_no_torch():
    tree = ast.parse(Path(arena_index.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name and name.split(".")[0] == "torch" for name in names)


def test_free_slots_lifo_all_or_none_and_double_free():
    ix = _index()
    assert ix.take(0, 3) == [0, 1, 2] and ix.num_free(0) == 1
    with pytest.raises(CapacityError):
        ix.take(0, 2)
    assert ix.num_free(0) == 1  # nothing taken
    ix.release(0, [1])
    assert ix.take(0, 1) == [1]  # the slot freed last comes first
    with pytest.raises(RuntimeError, match="double free"):
        ix.release(0, [3])  # never taken


def test_victims_are_durable_least_recent_and_unprotected():
    ix = _index()
    ix.begin(1)  # a decode step: clock 1
    ix.map(0, np.array([0, 1, 2, 3]), ix.take(0, 4))
    for group in (1, 3):  # clock 2: group 1 used again; clock 3: group 3 (group 5 is not in the arena)
        ix.begin(1)
        ix.touch(0, [0], np.array([[group, 5]]), np.array([[True, True]]))
    assert ix.victims(0, 4, set()).size == 0  # nothing is on disk yet: nothing may leave
    ix.disk_at[0, [0, 1, 2, 3]] = [[0, 10], [0, 11], [0, 12], [0, 13]]
    assert sorted(ix.owner[0][ix.victims(0, 2, set())]) == [0, 2]  # stamped at clock 1
    assert sorted(ix.owner[0][ix.victims(0, 2, {0})]) == [1, 2]  # 0 is protected; 1 is older than 3
    ix.disk_at[0, 2] = -1  # not durable: never a victim
    assert sorted(ix.owner[0][ix.victims(0, 4, {0})]) == [1, 3]


def test_evicted_slots_are_held_until_the_step_in_flight_ends():
    ix = _index()
    ix.map(0, np.array([4, 5]), ix.take(0, 2))
    step = Pending()
    ix.evict(0, np.array([0]), step)
    assert ix.slot_of[0, 0, 4] == -1 and ix.owner[0, 0] == -1 and ix.num_held(0) == 1
    ix.recycle(0)
    assert ix.num_free(0) == 2  # still held: the step may read the slot
    step.done = True
    ix.recycle(0)
    assert ix.num_free(0) == 3 and ix.num_held(0) == 0


def test_prefill_touches_rank_below_a_decode_step():
    ix = _index()
    ix.begin(16)  # a prefill chunk
    ix.map(0, np.array([0]), ix.take(0, 1))
    ix.begin(1)  # a decode step
    ix.map(0, np.array([1]), ix.take(0, 1))
    assert ix.stamp[0, 0] == -0.25 and ix.stamp[0, 1] == 1.0 and ix.clock == 1.0


def test_changes_keep_the_last_value_of_each_group():
    ix = _index(slots=8, layers=2)
    ix.map(1, np.array([3, 9]), [5, 6])  # seq 0 group 3, seq 1 group 1
    ix.evict(1, np.array([5]), Done())  # evicted ...
    ix.map(1, np.array([3]), [7])  # ... and mapped again
    ix.map(np.array([0, 0]), np.array([2, 2]), [1, 4])  # the same group twice: the second wins
    changes = ix.take_changes()
    got = {tuple(c[:3]): c[3] for c in changes.T.tolist()}
    assert len(got) == changes.shape[1] == 3
    assert got == {(1, 0, 3): 7, (1, 1, 1): 6, (0, 0, 2): 4}
    assert ix.take_changes() is None


def test_placement_reads_back_what_outranks_the_least_recent():
    ix = _index(slots=3, groups=4, seqs=1)
    ix.disk_at[0, :4] = [[0, i] for i in range(4)]  # all four groups durable
    ix.begin(1)
    ix.map(0, np.array([0, 1, 2]), ix.take(0, 3))  # the arena holds groups 0-2, group 3 on disk only
    ix.begin(1)
    ix.touch(0, [0], np.array([[2]]), np.array([[True]]))  # group 2 used again
    ix.prioritize(0, [0], np.array([[0.1, 0.2, 0.3, 0.9]]), np.array([4]))  # group 3 matters most
    assert (ix.prio[0, :4] < ix.clock - 0.5).all() and np.argmax(ix.prio[0, :4]) == 3
    assert ix.to_place(0, reserve=0).tolist() == [3]  # it outranks the stamps of groups 0 and 1


def test_clear_frees_a_sequence_and_returns_its_disk_copies():
    ix = _index(slots=4, groups=4, seqs=2)
    ix.map(0, np.array([1, 5]), ix.take(0, 2))  # seq 0 group 1, seq 1 group 1
    ix.disk_at[0, 1] = [0, 7]
    (at,) = ix.clear(0)
    assert at.tolist() == [[0, 7]] and ix.slot_of[0, 0, 1] == -1 and ix.slot_of[0, 1, 1] >= 0
    assert ix.num_free(0) == 3 and (ix.disk_at[0, :4] == -1).all() and ix.resident() == 1
