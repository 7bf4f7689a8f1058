import argparse
import json

from kvdrive.bench import io


def test_bench_io_runs_tiny_on_cpu(tmp_path, capsys):
    p = argparse.ArgumentParser()
    io.add_arguments(p)
    out = tmp_path / "io.json"
    args = p.parse_args(["--tiny", "--dir", str(tmp_path), "-o", str(out)])
    assert io.run(args) == 0
    doc = json.loads(out.read_text())
    r = doc["results"]
    assert r["b_disk"]["raw"]["seq_read_gbps"] > 0
    depth = r["b_disk"]["kvdrive"]["depths"]["4"]
    assert depth["pool_read_gbps"] > 0 and depth["pool_read_to_gbps"] > 0
    assert r["b_disk"]["kvdrive"]["write_gbps"] > 0
    assert r["c_pool_two_paths"]["kvdrive"]["paths"][0].endswith("kvdrive-pool-0")
    assert any("skipped" in n or "CUDA" in n for n in doc["notes"]) or "memcpy_h2d_gbps" in r["a_host_gpu"]
    assert "(b) raw seq read" in capsys.readouterr().out
