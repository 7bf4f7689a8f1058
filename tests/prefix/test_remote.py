"""The remote tier over a store in this process's memory: what is shared, what is refused, and
that a store that hangs or fails costs a request at most one deadline (tests/prefix/
test_remote_mooncake.py runs the same tier against a real Mooncake master in other processes)."""

import threading
import time
import types

import pytest
import torch
from factories import PREFIX_C, PREFIX_CFG, MemoryStore, filled_cache, prefix_pool, same_kv

from kvdrive.errors import KvdriveError
from kvdrive.prefix import PrefixConfig, PrefixPool, RemoteConfig
from kvdrive.prefix.remote_io import Breaker, Refused, Timeout, Worker

F32 = torch.float32
IDS = list(range(100, 117))  # 4 full chunks of 4 tokens + 1


@pytest.fixture
def store(monkeypatch):
    """One shared store: every pool opened in the test talks to it."""
    s = MemoryStore()
    monkeypatch.setattr("kvdrive.prefix.remote.open_store", lambda config: s)
    yield s
    s.release.set()


def remote(**kw) -> RemoteConfig:
    kw = {"admit_after": 1, "timeout_s": 0.3, "write_buffer_bytes": 1 << 20, **kw}
    return RemoteConfig(master="127.0.0.1:1", **kw)


def node(tmp_path=None, tenant="", **kw) -> PrefixPool:
    """A serving node's pool: remote only, or a disk (under ``tmp_path``) in front of the store."""
    if tmp_path is not None:
        return prefix_pool(tmp_path, remote=remote(**kw), tenant=tenant)
    return PrefixPool(
        PREFIX_CFG, F32, PrefixConfig(model="m", chunk_tokens=PREFIX_C, tenant=tenant, remote=remote(**kw))
    )


def load(pool, cache, seq):
    cache.add(seq, 64)
    return pool.load(None, cache, seq, IDS)


def test_a_chunk_stored_by_one_node_is_loaded_by_another_bit_exact(store):
    a, b = node(), node()
    cache = filled_cache(17)
    a.store(cache, 0, IDS)
    assert a.remote.flush(5)
    assert a.stats().remote.written == 4
    assert len(store.objects) == 4 * PREFIX_CFG.num_hidden_layers  # one object per (chunk, layer)
    done = load(b, cache, 1)
    assert done == 16 and b.last_load.chunks_from_remote == 4
    assert same_kv(cache, 0, 1, 16)
    assert b.stats().remote.hits == 4 and b.stats().remote.misses == {}
    a.close(), b.close()


def test_local_tiers_are_tried_first_and_the_store_only_for_what_they_lack(store, tmp_path):
    a = node(tmp_path)
    cache = filled_cache(17)
    a.store(cache, 0, IDS)
    a.remote.flush(5)
    before = store.calls["exists"]
    assert load(a, cache, 1) == 16
    assert a.last_load.chunks_from_disk == 4 and a.last_load.chunks_from_remote == 0
    assert store.calls["exists"] == before and store.calls["get_into"] == 0  # every chunk local: no call
    a.close(remove=True)


def test_a_chunk_is_written_on_its_second_sighting_on_any_node(store):
    a, b, c = node(admit_after=2), node(admit_after=2), node(admit_after=2)
    cache = filled_cache(17)
    assert load(a, cache, 1) == 0
    a.store(cache, 0, IDS)  # first sighting: a marker only
    a.remote.flush(5)
    assert a.stats().remote.written == 0 and a.stats().remote.marks == 4
    assert load(b, cache, 2) == 0  # b finds the markers (seen, not stored)
    b.store(cache, 0, IDS)  # second sighting, on another node: written
    b.remote.flush(5)
    assert b.stats().remote.written == 4
    assert load(c, cache, 3) == 16 and same_kv(cache, 0, 3, 16)
    for p in (a, b, c):
        p.close()


def test_a_corrupt_value_is_a_miss_recomputed_and_written_again(store):
    a, b = node(), node()
    cache = filled_cache(17)
    a.store(cache, 0, IDS)
    a.remote.flush(5)
    name = a.remote.name(a.lookup(IDS).keys[2], 1)  # chunk 2, layer 1
    value = bytearray(store.objects[name])
    value[100] ^= 0x40
    store.objects[name] = bytes(value)
    with pytest.warns(UserWarning, match="checksum, key or layout"):
        assert load(b, cache, 1) == 8  # chunks 0-1; chunk 2 is recomputed, never served
    assert same_kv(cache, 0, 1, 8)
    assert b.stats().remote.misses == {"corrupt": 2}  # chunk 2, and chunk 3 behind it
    b.store(cache, 0, IDS)  # the bad chunk is admitted again and replaced
    b.remote.flush(5)
    assert store.objects[name] != bytes(value)
    assert load(node(), cache, 2) == 16 and same_kv(cache, 0, 2, 16)
    a.close(), b.close()


def test_a_value_under_another_chunks_name_fails_its_check(store):
    a, b = node(), node()
    cache = filled_cache(17)
    a.store(cache, 0, IDS)
    a.remote.flush(5)
    keys = a.lookup(IDS).keys
    store.objects[a.remote.name(keys[1], 0)] = store.objects[a.remote.name(keys[0], 0)]  # intact bytes, wrong place
    with pytest.warns(UserWarning, match="checksum, key or layout"):
        assert load(b, cache, 1) == 4
    a.close(), b.close()


def test_tenants_never_hit_each_others_chunks(store):
    a, b = node(tenant="a"), node(tenant="b")
    cache = filled_cache(17)
    a.store(cache, 0, IDS)
    a.remote.flush(5)
    assert load(b, cache, 1) == 0
    assert b.stats().remote.chunks_present == 0
    assert load(node(tenant="a"), cache, 2) == 16
    a.close(), b.close()


def test_a_hung_store_costs_a_load_one_deadline_then_is_skipped(store):
    a, b = node(), node(retry_after_s=60)
    cache = filled_cache(17)
    a.store(cache, 0, IDS)
    a.remote.flush(5)
    store.hang.set()  # every call now blocks (like a client whose master died)
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="did not answer"):
        assert load(b, cache, 1) == 0
    assert time.monotonic() - t0 < 0.3 + 1.0  # one deadline (0.3 s) and polling, not the hang (30 s)
    assert b.stats().remote.breaker == "open"
    calls = sum(store.calls.values())
    t0 = time.monotonic()
    assert load(b, cache, 2) == 0  # skipped at once: the breaker is open
    assert time.monotonic() - t0 < 0.2 and sum(store.calls.values()) == calls
    b.store(cache, 0, IDS)  # the store is skipped too; the request goes on
    stats = b.stats().remote
    assert stats.failures == {"timeout": 1} and stats.skipped["breaker"] >= 1
    assert stats.write_skipped == {"breaker": 4}
    store.release.set()
    a.close(), b.close()


def test_the_breaker_lets_calls_through_again_after_retry_after(store):
    a, b = node(), node(retry_after_s=0.2)
    cache = filled_cache(17)
    a.store(cache, 0, IDS)
    a.remote.flush(5)
    store.down = True
    with pytest.warns(UserWarning, match="did not answer"):
        assert load(b, cache, 1) == 0
    assert b.stats().remote.failures == {"down": 1}
    store.down = False
    time.sleep(0.25)
    assert load(b, cache, 2) == 16
    a.close(), b.close()


def test_a_full_write_buffer_skips_the_rest_and_the_request_goes_on(store):
    big = node()
    rows = big.remote._ring.rows
    cache = filled_cache(17)
    job = big.remote.begin_write([bytes(16)] * (rows // PREFIX_CFG.num_hidden_layers))  # the ring held by a job
    big.store(cache, 0, IDS)
    assert big.stats().remote.write_skipped == {"buffer_full": 4}
    big.remote.cancel(job)
    big.close()


def test_a_write_buffer_smaller_than_one_object_is_refused_by_name(store):
    """An 8B-shape chunk of 256 tokens is 1 MiB a layer in bfloat16: a 1 MiB ring holds no object."""
    cfg = types.SimpleNamespace(**{**vars(PREFIX_CFG), "num_key_value_heads": 8, "head_dim": 128})
    with pytest.raises(KvdriveError, match="write_buffer_bytes .1048576. must hold at least one object"):
        PrefixPool(cfg, torch.bfloat16, PrefixConfig(model="m", chunk_tokens=256, remote=remote()))


def test_config_is_checked_by_field():
    with pytest.raises(KvdriveError, match="master must be host:port"):
        RemoteConfig(master="localhost")
    with pytest.raises(KvdriveError, match="protocol"):
        RemoteConfig(master="h:1", protocol="udp")
    with pytest.raises(KvdriveError, match="unknown setting.*mastr"):
        RemoteConfig.from_dict({"mastr": "h:1"})
    assert RemoteConfig.from_dict({"master": "h:1", "timeout_s": 2.0}).timeout_s == 2.0
    assert PrefixConfig(remote=RemoteConfig(master="h:1")).remote.master == "h:1"  # a remote-only pool


def test_worker_times_out_a_hung_call_and_refuses_until_it_returns():
    w, release = Worker("test"), threading.Event()
    hung = w.submit(lambda: release.wait(10), 0.1)
    cancelled = []
    queued = w.submit(lambda: 1, 1.0, on_cancel=lambda: cancelled.append(1))
    t0 = time.monotonic()
    with pytest.raises(Timeout):
        w.wait(hung)
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(Refused):
        w.wait(queued)
    assert cancelled == [1] and w.stuck
    with pytest.raises(Refused):
        w.wait(w.submit(lambda: 2, 1.0))
    release.set()
    assert w.idle(2)
    assert w.wait(w.submit(lambda: 3, 1.0)) == 3
    w.close(1)


def test_breaker_opens_on_failure_and_closes_after_retry_after():
    now = [0.0]
    b = Breaker(5.0, clock=lambda: now[0])
    assert b.allow()
    b.failure("x")
    assert not b.allow() and b.opens == 1
    now[0] = 5.0
    assert b.allow() and b.state == "closed"
