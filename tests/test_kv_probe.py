import argparse
import json
import os

from kvdrive.kv import probe


def test_measure_save_load(tmp_path):
    p = probe.measure(str(tmp_path), slot_bytes=64 << 10, probe_bytes=4 << 20, depth=4)
    assert p.direct and p.read_gbps > 0 and p.write_gbps > 0 and p.slot_bytes == 64 << 10
    probe.save(p)
    probe.save(probe.DeviceProbe(str(tmp_path), 16 << 10, True, 9.0, 9.0, 4, 1, "x"))
    assert probe.load(str(tmp_path), 60 << 10) == p  # nearest size
    assert probe.load(str(tmp_path), 8 << 10).read_gbps == 9.0
    assert probe.load(str(tmp_path / "nowhere"), 4096) is None
    assert [f for f in os.listdir(tmp_path) if not f.startswith(".kvdrive-probe")] == []  # test files removed


def test_probe_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    probe.add_parser(sub)
    args = parser.parse_args(["probe", str(tmp_path), "--mib", "2", "--depth", "2"])
    assert args.func(args) == 0
    assert "GB/s" in capsys.readouterr().out
    doc = json.loads((tmp_path / probe.PROBE_FILE).read_text())
    assert doc[str(64 << 10)]["read_gbps"] > 0
