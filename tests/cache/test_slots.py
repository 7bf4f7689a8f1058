import pytest

from kvdrive.cache.slots import SequenceSlots
from kvdrive.errors import CapacityError, KvdriveError


def test_slots_are_reused_and_lengths_tracked():
    s = SequenceSlots(2, 10)
    assert s.add(7, 10) == 0 and s.add(8, 4) == 1
    with pytest.raises(CapacityError, match="in use"):
        s.add(9, 1)
    s.commit([7, 8], 3)
    assert s.starts([7, 8], 7) == (3, 3)
    with pytest.raises(CapacityError, match="length 10"):
        s.starts([7], 8)
    s.truncate(7, 1)
    assert s.length(7) == 1
    with pytest.raises(KvdriveError):
        s.truncate(7, 2)
    with pytest.raises(KvdriveError, match="not all cached"):
        s.check_range(8, 0, 4)
    assert s.free(7) == 0 and s.add(9, 2) == 0 and 7 not in s and s.seq_ids() == [8, 9]


def test_add_rejects_duplicates_and_oversize():
    s = SequenceSlots(1, 10)
    with pytest.raises(CapacityError, match="holds 10"):
        s.add(1, 11)
    s.add(1, 5)
    with pytest.raises(KvdriveError, match="already"):
        s.add(1, 5)
