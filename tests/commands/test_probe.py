import argparse
import json
import os

import numpy as np

from kvdrive.commands import probe as probe_command
from kvdrive.storage import probe


def test_measure_save_load(tmp_path):
    p = probe_command.measure(str(tmp_path), slot_bytes=64 << 10, probe_bytes=4 << 20, depth=4)
    assert p.direct and p.read_gbps > 0 and p.write_gbps > 0 and p.slot_bytes == 64 << 10
    assert 0 < p.read_latency_ms < 1e3
    probe.save(p)
    probe.save(probe.DeviceProbe(str(tmp_path), 16 << 10, True, 9.0, 9.0, 4, 1, "x"))
    assert probe.load(str(tmp_path), 60 << 10) == p  # nearest size
    assert probe.load(str(tmp_path), 8 << 10).read_gbps == 9.0
    assert probe.load(str(tmp_path / "nowhere"), 4096) is None
    # a probe file without read_latency_ms still loads
    old_dir = tmp_path.parent / f"{tmp_path.name}-old"
    old_dir.mkdir()
    old = {k: v for k, v in p.__dict__.items() if k != "read_latency_ms"}
    (old_dir / probe.PROBE_FILE).write_text(json.dumps({str(64 << 10): old}))
    assert probe.load(str(old_dir), 64 << 10).read_latency_ms is None
    assert [f for f in os.listdir(tmp_path) if not f.startswith(".kvdrive-probe")] == []  # test files removed


def test_probe_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    probe_command.add_parser(sub)
    args = parser.parse_args(["probe", str(tmp_path), "--mib", "2", "--depth", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "one read alone" in out
    doc = json.loads((tmp_path / probe.PROBE_FILE).read_text())
    assert doc[str(64 << 10)]["read_gbps"] > 0


def test_probe_command_warns_about_a_slow_disk(tmp_path, capsys, monkeypatch):
    """Every read is 'slow' at a threshold of 0 ms: the command says what that means and the fix."""
    monkeypatch.setattr(probe_command, "SLOW_READ_MS", 0.0)
    parser = argparse.ArgumentParser()
    probe_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["probe", str(tmp_path), "--mib", "2", "--depth", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "every layer that needs the disk" in out and "--host-gib" in out
    monkeypatch.setattr(probe_command, "SLOW_READ_MS", 1e9)
    assert args.func(args) == 0
    assert "every layer that needs the disk" not in capsys.readouterr().out


def test_measure_never_reads_two_slots_into_one_buffer_at_once(tmp_path, monkeypatch):
    """More slots than host buffers: every batch of reads targets distinct buffers, so no read's
    checksum sees bytes another read wrote, and the probe counts no read failure."""
    from kvdrive.storage.disk import DiskDevice

    batches, real_read = [], DiskDevice.read

    def read(self, slots, bufs, *a, **kw):
        ptrs = [np.frombuffer(b, dtype=np.uint8).ctypes.data for b in bufs]
        batches.append(len(ptrs))
        assert len(set(ptrs)) == len(ptrs)
        return real_read(self, slots, bufs, *a, **kw)

    monkeypatch.setattr(DiskDevice, "read", read)
    p = probe_command.measure(str(tmp_path), slot_bytes=64 << 10, probe_bytes=4 << 20, depth=4)  # 64 slots, 16 buffers
    assert p.read_gbps > 0 and sum(batches[:4]) == 64 and max(batches) == 16
