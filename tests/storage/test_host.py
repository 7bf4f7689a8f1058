import tracemalloc

import pytest
import torch

from kvdrive.errors import CapacityError, KvdriveError
from kvdrive.storage.host import HostTier
from kvdrive.storage.io_buffers import FreeList
from kvdrive.storage.layout import ALIGN, GroupLayout

LAYOUT = GroupLayout(2, 2, 16, torch.float16, 4)  # 512 B group, 4 KiB slot


def test_arena_is_one_aligned_slab_within_budget():
    host = HostTier(LAYOUT, 10 * LAYOUT.slot_bytes + 100, pin=False)
    assert host.num_slots == 10
    assert host.bytes_capacity <= 10 * LAYOUT.slot_bytes + 100
    assert host.rows.data_ptr() % ALIGN == 0
    for s in range(10):
        assert host.rows[s].data_ptr() % ALIGN == 0
        assert len(host.buffer(s)) == LAYOUT.slot_bytes
    with pytest.raises(KvdriveError):
        HostTier(LAYOUT, LAYOUT.slot_bytes - 1)


def test_alloc_all_or_nothing_and_double_free():
    host = HostTier(LAYOUT, 4 * LAYOUT.slot_bytes, pin=False)
    a = host.alloc(3)
    with pytest.raises(CapacityError):
        host.alloc(2)
    assert host.num_free == 1
    host.free(a[:1])
    with pytest.raises(RuntimeError, match="double free"):
        host.free(a[:1])
    assert sorted(host.alloc(2) + a[1:]) == [0, 1, 2, 3]


def test_no_leak_over_a_million_cycles():
    host = HostTier(LAYOUT, 64 * LAYOUT.slot_bytes, pin=False)
    ptr = host.rows.data_ptr()
    held = host.alloc(32)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    fl_alloc, fl_free = host.alloc, host.free
    for _ in range(1_000_000):
        fl_free(fl_alloc(1))
    for _ in range(10_000):
        fl_free(fl_alloc(32))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 64 << 10, f"python heap grew {growth} B"
    host.free(held)
    assert host.num_free == host.num_slots == 64
    assert host.rows.data_ptr() == ptr  # the slab never moved or grew


def test_freelist_grow_hands_out_new_slots_lowest_first():
    fl = FreeList(2)
    assert fl.alloc(2) == [0, 1]
    fl.grow(3)
    assert fl.alloc(2) == [2, 3] and fl.num_free == 1


@pytest.mark.gpu
def test_pinned_arena_is_exactly_its_size_and_device_mapped():
    """Regression: torch's pinned allocator rounded each layer's arena up to a power of two
    (a 9.6 GiB arena of 30 layers held 15.7 GiB); registered memory is the size asked for."""
    import os

    from kvdrive.storage.gather import copy_rows

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    HostTier(LAYOUT, 4 * LAYOUT.slot_bytes, pin=True)  # CUDA's context and first registration: resident too
    nbytes = 4100 * LAYOUT.slot_bytes  # 16.02 MiB: the old allocator made it 32 MiB
    before = resident()
    host = HostTier(LAYOUT, nbytes, pin=True)
    assert host.rows.is_pinned() and host.rows.data_ptr() % ALIGN == 0
    assert resident() - before < 24 << 20  # registered pages are resident: ~16 MiB
    host.rows.copy_(torch.randint(0, 256, host.rows.shape, dtype=torch.uint8))
    on_gpu = host.rows.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), host.rows)
    words = host.rows.view(torch.int32)  # the fetch kernel reads host rows in place, through the mapping
    out = torch.zeros(3, words.shape[1], dtype=torch.int32, device="cuda")
    copy_rows(words, torch.tensor([5, 0, 4099], device="cuda"), out, torch.arange(3, device="cuda"), words.shape[1])
    assert torch.equal(out.cpu(), words[[5, 0, 4099]])
