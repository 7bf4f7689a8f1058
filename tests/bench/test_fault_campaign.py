"""The fault campaign, bounded (``pytest -m fault``; the long run with its figures is ``kvdrive
bench faults``, docs/reliability.md): every fault kind across prefix reuse and tiered decode
on SmolLM2, kill -9 in the middle of stores and evictions, processes contending for one
directory, a file system that fills up. Outputs equal the clean run's token for token, or
the trial surfaced one ``KvdriveError``; never a wrong output, never a file left behind."""

import pytest

from kvdrive.bench.reliability import crash, faults
from kvdrive.bench.reliability.workloads import Row

pytestmark = pytest.mark.fault


class _References(dict):
    """Each workload's clean outputs, made when a test first needs them."""

    def __init__(self, loaded):
        super().__init__()
        self.loaded = loaded

    def __missing__(self, workload):
        self[workload] = faults.reference(self.loaded, workload)
        return self[workload]


@pytest.fixture(scope="module")
def refs(smollm2):
    return _References(smollm2)


def run_trials(loaded, refs, workload, kind, seeds=(0,)) -> Row:
    row = Row(workload, kind)
    for seed in seeds:
        faults.trial(loaded, workload, kind, seed, refs[workload], row)
    assert row.wrong == 0 and row.leaked_bytes == 0, row
    return row


@pytest.mark.parametrize("kind", ["eio", "short", "torn", "flip", "latency", "vanish"])
def test_prefix_reuse_under_io_faults_gives_the_cold_outputs(smollm2, refs, kind):
    row = run_trials(smollm2, refs, "prefix", kind)
    assert row.identical == 1 and row.surfaced == 0 and row.fired > 0, row


@pytest.mark.parametrize("kind", ["enospc", "efbig"])
def test_prefix_reuse_on_a_disk_that_cannot_grow_gives_the_cold_outputs(smollm2, refs, kind):
    row = run_trials(smollm2, refs, "prefix", kind)
    assert row.identical == 1 and row.surfaced == 0 and row.fired > 0, row


def test_a_host_arena_that_cannot_be_allocated_is_one_surfaced_error(smollm2, refs):
    row = run_trials(smollm2, refs, "prefix", "nomem")
    assert row.surfaced == 1 and "host budget" in row.errors[0], row


def test_tenants_on_one_pool_under_faults_give_the_cold_outputs(smollm2, refs):
    row = run_trials(smollm2, refs, "tenants", "mixed")
    assert row.identical == 1 and row.fired > 0, row


@pytest.mark.parametrize("workload", ["tiered-wait", "tiered-defer"])
def test_tiered_decode_under_mixed_faults_never_serves_wrong_kv(smollm2, refs, workload):
    row = run_trials(smollm2, refs, workload, "mixed")
    assert row.identical + row.degraded == 1 and row.fired > 0, row


def test_tiered_decode_on_a_disk_that_cannot_grow_is_one_surfaced_error(smollm2, refs):
    row = run_trials(smollm2, refs, "tiered-wait", "enospc")
    assert row.surfaced == 1 and "free space on" in row.errors[0], row


def test_kill_9_in_stores_and_evictions(tmp_path):
    row = crash.kill_trials(4, str(tmp_path), seed=1)
    assert row.trials == row.identical == 4 and row.wrong == 0 and row.leaked_bytes == 0, row


def test_processes_sharing_a_directory_take_turns(tmp_path):
    row = crash.process_trials(3, str(tmp_path), rounds=3)
    assert row.identical == row.trials == 9 and row.wrong == 0, row


@pytest.mark.parametrize("workload", ["prefix", "tiered-wait"])
def test_a_file_system_that_fills_up(smollm2, workload):
    row = crash.full_filesystem(smollm2, workload, "2m" if workload == "prefix" else "1m")
    if row is None:
        pytest.skip("mounting a small tmpfs needs root")
    assert row.wrong == 0 and row.leaked_bytes == 0, row
    if workload == "prefix":
        assert row.identical == 1 and row.fired == 1, row  # it filled, and the outputs are the cold ones
    else:
        assert row.identical + row.surfaced == 1, row
