import argparse
import json

from kvdrive.bench.reuse import ttft


def test_bench_ttft_runs_tiny_on_cpu(tmp_path):
    p = argparse.ArgumentParser()
    ttft.add_arguments(p)
    out = tmp_path / "ttft.json"
    paths = [str(tmp_path / "p0"), str(tmp_path / "p1")]
    assert ttft.run(p.parse_args(["--tiny", "--paths", *paths, "--host-gib", "0.01", "-o", str(out)])) == 0
    doc = json.loads(out.read_text())
    last = doc["results"][-1]
    for name in ("disk x1", "disk x2", "host + disk x1"):
        ours = last[name]["kvdrive"]
        assert ours["first_token_matches"] and last[name]["serial_buffered"]["first_token_matches"]
        assert ours["tokens_loaded"] == 144 and ours["read_gbps"] > 0
    assert last["host + disk x1"]["kvdrive"]["chunks_from_host"] > 0
    assert all(p["read_gbps"] > 0 for p in doc["config"]["probes"].values())


def test_bench_ttft_compares_storage_formats_in_one_run(tmp_path):
    p = argparse.ArgumentParser()
    ttft.add_arguments(p)
    out = tmp_path / "ttft.json"
    args = ["--tiny", "--paths", str(tmp_path / "p0"), "--kv-dtype", "bf16", "int4", "--no-serial", "-o", str(out)]
    assert ttft.run(p.parse_args(args)) == 0
    doc = json.loads(out.read_text())
    last = doc["results"][-1]
    assert "serial_buffered" not in last["disk x1"]
    bf16, int4 = last["disk x1"]["kvdrive"], last["disk x1 int4"]["kvdrive"]
    assert int4["tokens_loaded"] == bf16["tokens_loaded"] == 144
    assert int4["bytes_read"] < bf16["bytes_read"] / 3  # 4-bit codes and fp16 scales against fp32
    assert last["vs_bf16"]["disk x1 int4"]["load_over_bf16"] > 0
    assert doc["config"]["stored_slot_bytes"]["int4"] < doc["config"]["stored_slot_bytes"]["bf16"]
