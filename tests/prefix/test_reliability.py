"""The prefix pool never serves another prompt's KV, never loses the stored cache to a
reopen, and lives with full disks, missing extents, dead owners and index failures."""

import errno
import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch
from factories import PREFIX_CHUNK_BYTES as CHUNK_BYTES
from factories import ROOT, child_env, filled_cache, run_python, same_kv
from factories import prefix_pool as open_pool

from kvdrive.errors import KvdriveError
from kvdrive.prefix.index import PrefixIndex, error_kind, index_error
from kvdrive.prefix.keys import bind_sums, chunk_keys
from kvdrive.prefix.pool import PrefixPoolWarning
from kvdrive.storage.io_engine import InjectedFaults


def files_digest(path) -> dict[str, str]:
    """Name -> SHA-256 of every kvdrive data file under ``path`` (locks left out)."""
    return {
        f: hashlib.sha256((path / f).read_bytes()).hexdigest()
        for f in sorted(os.listdir(path))
        if not f.endswith(".lock")
    }


# -- one owner per directory ----------------------------------------------------------------


def test_pools_of_one_directory_never_serve_each_others_kv(tmp_path):
    """Two pools that both believed they owned a directory handed out the same free slots; a
    third then loaded the second prompt's KV for the first prompt, with no checksum failure.
    Now the second opener is refused, and once the first is closed it sees the first's chunks."""
    a = open_pool(tmp_path)
    a.store(filled_cache(9, seed=5), 0, list(range(200, 209)))
    with pytest.raises(KvdriveError, match="in use by another owner in this process") as refused:
        open_pool(tmp_path)
    assert "share one pool" in str(refused.value) and "\n" not in str(refused.value)
    first, ids_a = filled_cache(9, seed=0), list(range(9))
    a.store(first, 0, ids_a)
    a.close()
    b = open_pool(tmp_path)
    b.store(filled_cache(9, seed=1), 0, list(range(100, 109)))  # takes free slots, not a's
    b.close()
    c = open_pool(tmp_path)
    try:
        first.add(1, 64)
        assert c.load(None, first, 1, ids_a) == 8 and same_kv(first, 0, 1, 8)
    finally:
        c.close(remove=True)


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, torch
        from factories import prefix_pool as open_pool
        pool = open_pool({str(tmp_path)!r})
        print("ready", flush=True)
        sys.stdin.read()
        pool.close()
    """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=child_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(KvdriveError, match=f"in use by process {holder.pid}"):
            open_pool(tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    open_pool(tmp_path).close(remove=True)  # its exit released the lock


def test_a_killed_owner_releases_the_directory(tmp_path):
    out = run_python(f"""
        import os, signal
        from factories import filled_cache, prefix_pool as open_pool
        pool = open_pool({str(tmp_path)!r})
        pool.store(filled_cache(9), 0, list(range(9)))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert out.returncode == -9
    pool = open_pool(tmp_path)
    try:
        assert pool.lookup(list(range(9))).chunks == 2
    finally:
        pool.close(remove=True)


# -- restore and checksums --------------------------------------------------------------------


def test_rows_claiming_one_slot_keep_only_the_first(tmp_path):
    """An index left by two writers names one slot in two rows: the first row keeps it, the
    second is dropped and its other slots freed; both prompts load correctly or not at all."""
    pool = open_pool(tmp_path)
    ca, a = filled_cache(5, seed=0), list(range(5))
    cb, b = filled_cache(5, seed=1), list(range(50, 55))
    pool.store(ca, 0, a)
    pool.store(cb, 0, b)
    ka, kb = chunk_keys(a, pool.namespace())[0], chunk_keys(b, pool.namespace())[0]
    row_a, row_b = pool.index.get([ka])[ka], pool.index.get([kb])[kb]
    pool.close()
    db = sqlite3.connect(tmp_path / "kvdrive-prefix.sqlite")
    slots_b = list(row_b.slots)
    slots_b[1] = row_a.slots[1]  # b's layer 1 now names a's slot
    with db:
        db.execute("UPDATE chunks SET slots = ? WHERE key = ?", (bytes(torch.tensor(slots_b).numpy().tobytes()), kb))
    db.close()
    pool = open_pool(tmp_path)
    try:
        assert pool.lookup(a).chunks == 1 and pool.lookup(b).chunks == 0
        ca.add(1, 64)
        assert pool.load(None, ca, 1, a) == 4 and same_kv(ca, 0, 1, 4)
        pool.store(cb, 0, b)  # stored again, in free slots
        cb.add(1, 64)
        assert pool.load(None, cb, 1, b) == 4 and same_kv(cb, 0, 1, 4)
    finally:
        pool.close(remove=True)


def test_a_row_naming_another_chunks_slots_fails_its_checksum(tmp_path):
    """Reads are checked against the chunk's own row, whose checksums bind its key: a row that
    names another chunk's intact slots (with that chunk's checksums) is never served."""
    pool = open_pool(tmp_path)
    ca, a = filled_cache(5, seed=0), list(range(5))
    pool.store(ca, 0, a)
    pool.store(filled_cache(5, seed=1), 0, list(range(50, 55)))
    ka, kb = chunk_keys(a, pool.namespace())[0], chunk_keys(list(range(50, 55)), pool.namespace())[0]
    row_b = pool.index.get([kb])[kb]
    pool.close()
    db = sqlite3.connect(tmp_path / "kvdrive-prefix.sqlite")
    with db:
        db.execute("DELETE FROM chunks WHERE key = ?", (ka,))
        db.execute("UPDATE chunks SET key = ? WHERE key = ?", (ka, kb))  # a's key, b's slots and sums
    db.close()
    pool = open_pool(tmp_path)
    try:
        assert pool.lookup(a).chunks == 1
        ca.add(1, 64)
        with pytest.warns(PrefixPoolWarning, match="recomputed"):
            assert pool.load(None, ca, 1, a) == 0
        assert pool.last_load.corrupt == 1 and pool.lookup(a).chunks == 0
        assert bind_sums(kb, bind_sums(kb, row_b.sums)) == row_b.sums
    finally:
        pool.close(remove=True)


# -- reopening keeps the data ----------------------------------------------------------------


@pytest.mark.parametrize("change", [{"budget": 2 * CHUNK_BYTES}, {"dtype": torch.float16}, {"extent_chunks": 2}])
def test_reopen_with_another_geometry_refuses_before_touching_anything(tmp_path, change):
    pool = open_pool(tmp_path, extent_chunks=4)
    cache, ids = filled_cache(21, seed=3), list(range(21))
    pool.store(cache, 0, ids)  # 5 chunks: two extents of 4 chunks
    pool.close()
    before = files_digest(tmp_path)
    with pytest.raises(KvdriveError, match="nothing was") as refused:
        open_pool(tmp_path, **{"extent_chunks": 4, **change})
    assert "\n" not in str(refused.value)
    assert files_digest(tmp_path) == before
    pool = open_pool(tmp_path, budget=4 << 20, extent_chunks=4)  # a larger budget keeps everything too
    try:
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 20 and same_kv(cache, 0, 1, 20)
    finally:
        pool.close(remove=True)


def test_a_short_budget_makes_a_short_last_extent_that_a_larger_budget_extends(tmp_path):
    pool = open_pool(tmp_path, budget=6 * CHUNK_BYTES, extent_chunks=4)  # extents of 4 and 2 chunks
    cache, ids = filled_cache(25, seed=4), list(range(25))
    assert pool.store(cache, 0, ids) == 6
    pool.close()
    sizes = sorted(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".extent"))
    assert sizes == [2 * CHUNK_BYTES, 4 * CHUNK_BYTES]
    pool = open_pool(tmp_path, budget=8 * CHUNK_BYTES, extent_chunks=4)
    try:
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 24 and same_kv(cache, 0, 1, 24)
        assert pool.stats().disk_physical_bytes == 8 * CHUNK_BYTES  # the short extent grew in place
    finally:
        pool.close(remove=True)


def test_a_missing_extent_between_others_is_created_again(tmp_path):
    """One extent gone from the middle: every later run failed with FileExistsError. Now it is
    created again, empty; the chunks it held are recomputed, the others still load."""
    pool = open_pool(tmp_path, extent_chunks=1)
    cache, ids = filled_cache(13, seed=2), list(range(13))
    pool.store(cache, 0, ids)  # 3 chunks, one extent each
    pool.close()
    os.unlink(tmp_path / "kvdrive-prefix-1.extent")
    with pytest.warns(UserWarning, match="was missing"):
        pool = open_pool(tmp_path, extent_chunks=1)
    try:
        assert pool.lookup(ids).chunks == 1  # chunk 1 is gone, so is the prefix through it
        assert pool.store(cache, 0, ids) == 1  # chunk 1 again (chunk 2 is still on disk)
        cache.add(1, 64)
        assert pool.load(None, cache, 1, ids) == 12 and same_kv(cache, 0, 1, 12)
    finally:
        pool.close(remove=True)


# -- recoverable states skip the store, count it and warn once ----------------------------------


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG])
def test_a_full_file_system_keeps_the_pool_to_the_space_it_has_and_warns_once(tmp_path, err):
    """A CapacityError used to escape ``store`` (and ``generate``). Now the disk stops growing
    and its LRU chunks make room, as under its budget."""
    pool = open_pool(tmp_path, extent_chunks=1)
    try:
        pool.store(filled_cache(5), 0, list(range(5)))  # the first extent: one chunk
        pool.pool.devices[0].faults = InjectedFaults().fail("fallocate", err, times=-1)
        last, ids = filled_cache(9, seed=2), list(range(300, 309))
        with pytest.warns(PrefixPoolWarning, match="cannot grow") as caught:
            assert pool.store(filled_cache(9, seed=1), 0, list(range(100, 109))) == 1  # 2 chunks, room for 1
            assert pool.store(last, 0, ids) == 1
        assert len([w for w in caught if issubclass(w.category, PrefixPoolWarning)]) == 1
        assert pool.stats().disk_physical_bytes == CHUNK_BYTES
        last.add(1, 64)
        assert pool.load(None, last, 1, ids) == 4 and same_kv(last, 0, 1, 4)
    finally:
        pool.close(remove=True)


def test_write_errors_skip_the_chunk_and_are_counted(tmp_path):
    pool = open_pool(tmp_path)
    try:
        pool.store(filled_cache(5), 0, list(range(5)))
        pool.pool.devices[0].faults = InjectedFaults().fail("write", errno.EIO, times=-1)
        with pytest.warns(PrefixPoolWarning, match="Input/output error|injected"):
            assert pool.store(filled_cache(9, seed=1), 0, list(range(100, 109))) == 0
        assert pool.stats().store_skipped == 2 and pool.lookup(list(range(100, 109))).chunks == 0
        pool.pool.devices[0].faults = InjectedFaults()
        assert pool.store(filled_cache(9, seed=1), 0, list(range(100, 109))) == 2  # the slots were given back
    finally:
        pool.close(remove=True)


def test_a_file_size_limit_never_fails_a_store_nor_serves_wrong_kv(tmp_path):
    """RLIMIT_FSIZE (EFBIG) below the extent size: the extent takes what the limit leaves, and
    whichever file hits the limit (an extent or the index's log), stores are skipped with one
    warning per cause, and what loads is the stored KV."""
    out = run_python(f"""
        import resource, warnings
        from factories import filled_cache, same_kv, prefix_pool as open_pool
        resource.setrlimit(resource.RLIMIT_FSIZE, (96 << 10, resource.RLIM_INFINITY))
        pool = open_pool({str(tmp_path)!r}, extent_chunks=16)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for s in range(8):
                ids = list(range(100 * s, 100 * s + 9))
                pool.store(filled_cache(9, seed=s), 0, ids)
            for s in range(8):
                ids, cache = list(range(100 * s, 100 * s + 9)), filled_cache(9, seed=s)
                cache.add(1, 64)
                n = pool.load(None, cache, 1, ids)
                assert same_kv(cache, 0, 1, n), s
        messages = [str(x.message) for x in w]
        assert messages and len(messages) == len(set(messages)), messages
        print(pool.stats().disk_physical_bytes < 96 << 10, messages)
        pool.close(remove=True)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True") and "cannot grow" in out.stdout


# -- the index ----------------------------------------------------------------------------------


def test_a_damaged_index_is_a_one_line_error_that_says_to_move_it(tmp_path):
    open_pool(tmp_path).close()
    (tmp_path / "kvdrive-prefix.sqlite").write_bytes(b"this is not a database" * 300)
    for suffix in ("-wal", "-shm"):
        if (tmp_path / f"kvdrive-prefix.sqlite{suffix}").exists():
            (tmp_path / f"kvdrive-prefix.sqlite{suffix}").unlink()
    with pytest.raises(KvdriveError, match="damaged: move it away") as err:
        open_pool(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(KvdriveError, match="damaged"):  # not "in use": the failed open released its lock
        open_pool(tmp_path)


@pytest.mark.parametrize(
    "message, kind",
    [
        ("database or disk is full", "full"),
        ("attempt to write a readonly database", "readonly"),
        ("unable to open database file", "readonly"),
        ("database disk image is malformed", "damaged"),
        ("file is not a database", "damaged"),
    ],
)
def test_index_errors_advise_moving_the_index_only_when_it_is_damaged(message, kind):
    err = sqlite3.OperationalError(message) if kind != "damaged" else sqlite3.DatabaseError(message)
    assert error_kind(err) == kind
    text = str(index_error("/data/kv/kvdrive-prefix.sqlite", err))
    assert ("move it away" in text) == (kind == "damaged") and "\n" not in text
    if kind != "damaged":
        assert "intact" in text


def test_an_index_damaged_while_serving_turns_the_disk_side_off(tmp_path, monkeypatch):
    pool = open_pool(tmp_path)
    try:
        cache, ids = filled_cache(9), list(range(9))
        pool.store(cache, 0, ids)

        def broken(*args):
            raise sqlite3.DatabaseError("database disk image is malformed")

        monkeypatch.setattr(PrefixIndex, "get", broken)
        cache.add(1, 64)
        with pytest.warns(PrefixPoolWarning, match="disk side turned off.*damaged"):
            assert pool.load(None, cache, 1, ids) == 0
        assert pool.stats().disk_off and pool.store(cache, 0, ids) == 0
    finally:
        pool.close()


def test_the_index_geometry_is_checked_reading_only(tmp_path):
    pool = open_pool(tmp_path)
    pool.close()
    index = str(tmp_path / "kvdrive-prefix.sqlite")
    before = files_digest(tmp_path)
    with pytest.raises(KvdriveError, match="geometry"):
        PrefixIndex.check_geometry(index, "other")
    PrefixIndex.check_geometry(index, _geometry(tmp_path))
    assert files_digest(tmp_path) == before


def _geometry(path) -> str:
    db = sqlite3.connect(path / "kvdrive-prefix.sqlite")
    try:
        return db.execute("SELECT v FROM meta WHERE k = 'geometry'").fetchone()[0]
    finally:
        db.close()
